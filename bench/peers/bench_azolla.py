"""Azolla through the peer harness (same phases as bench_pgqueuer.py / bench_procrastinate.py).

Run it with Azolla's venv (not the peers' one)::

    PEERBENCH_PG=postgresql://postgres@127.0.0.1:PORT AZOLLA_BENCH_MODE=pool \\
        .venv/bin/python bench/peers/bench_azolla.py -n 5000 --configs 1x16

How the harness's surface maps onto Azolla:

* the producer is the client SDK (``azolla.Client``): ``enqueue_one`` = one awaited
  ``submit_task("noop", ...).submit()`` (concurrent callers are coalesced by the SDK),
  ``enqueue_batch`` = ``submit_many`` (one batch per 1,000 tasks); both travel on the SDK's
  ``SubmitTasks`` stream;
* a "worker" is one ``azolla-shepherd`` process (``--mode pool|process``, concurrency C) running
  ``bench.tasks_noop``; the harness's worker subprocess starts it, waits until the orchestrator
  lists it and its pool is idle, and stops it (SIGTERM, then SIGKILL) on SIGTERM;
* the server is ``azolla-server`` on database ``peerbench_azolla`` of the same cluster as the
  peers: started by ``bench/run.py`` (``AZOLLA_BENCH_ENDPOINT`` / ``AZOLLA_BENCH_SERVER_PID``)
  or, when that is unset, by this script itself;
* the event log is append-only, so ``clean()`` does not truncate: it moves the producer and the
  next shepherds to a fresh *domain*, and progress is counted from the log after the position
  reached at ``clean()`` (terminal task events of that domain, read incrementally by position);
* the end of e2e is the ``recorded_at`` of the last ``TaskSucceeded`` event (its commit's
  transaction time), as for the peers;
* latency pairs come from the recorded results: ``noop`` returns ``[submitted_at, started_at]``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: bench._infra

from bench import _infra
from common import main, percentiles

from azolla import Client

MODE = os.environ.get("AZOLLA_BENCH_MODE", "pool")
STATE = Path(os.environ.get("AZOLLA_BENCH_STATE", "/tmp/peerbench/run/azolla/state.json"))
PIDS = STATE.parent / "shepherd-pids"
TERMINAL_TYPES = ("TaskSucceeded.v1", "TaskFailed.v1", "TaskCancelled.v1")


def _git_rev() -> str:
    """Short commit of the tree, ``.dirty`` when src/ has uncommitted changes."""
    try:
        git = ["git", "-C", str(_infra.ROOT)]
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        return rev + (".dirty" if dirty and rev else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _write_state(state: dict) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state))


def _read_state() -> dict:
    return json.loads(STATE.read_text())


def _note_pid(proc: _infra.Proc) -> Path:
    """Record a shepherd's PID so bench/run.py can kill it should this process be killed."""
    PIDS.mkdir(parents=True, exist_ok=True)
    path = PIDS / str(proc.pid)
    path.write_text(" ".join(proc.argv))
    return path


class AzollaPeer:
    NAME = "azolla"
    DB = "peerbench_azolla"
    DEFAULT_CONFIGS = "1x16,1x32,1x64,2x16"

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.client: Client | None = None
        self.endpoint = os.environ.get("AZOLLA_BENCH_ENDPOINT", "")
        self.server: _infra.Proc | None = None
        self.server_pid = int(os.environ.get("AZOLLA_BENCH_SERVER_PID", "0") or 0)
        self.domain = ""
        self.base = 0          # log position at clean()
        self.scanned = 0       # position up to which terminal events were counted
        self.done = 0          # terminal task events of this domain since clean()
        self.expected = 0      # tasks submitted since clean()

    @staticmethod
    def version() -> str:
        rev = _git_rev()
        return version("azolla") + (f"+{rev}" if rev else "")

    @staticmethod
    def worker_settings(conc: int) -> dict:
        options = " ".join(_infra.POOL_BENCH_OPTIONS) if MODE == "pool" else ""
        return {"shepherd": f"azolla-shepherd --mode {MODE} --concurrency {conc} {options}".strip(),
                "mode": MODE, "tasks": "bench.tasks_noop (noop, a plain def)",
                "dispatch": "pushed over one ClusterService stream per shepherd"}

    def info(self) -> dict:
        return {"mode": MODE, "endpoint": self.endpoint, "server_pid": self.server_pid}

    def aux_pids(self) -> dict[str, int]:
        return {"orchestrator": self.server_pid} if self.server_pid else {}

    # -- producer side -------------------------------------------------------------------

    async def setup(self) -> None:
        if not self.endpoint:  # standalone: our own server on a fresh database
            server_dsn = self.dsn.rsplit("/", 1)[0] + "/postgres"
            await _infra.fresh_database(server_dsn, self.DB)
            log_dir = STATE.parent
            self.server, self.endpoint = _infra.start_server(self.dsn, log_dir)
            self.server_pid = self.server.pid
            await _infra.wait_serving(self.endpoint, self.server, timeout=60)
        self.conn = await asyncpg.connect(self.dsn)
        await self.clean()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.conn is not None:
            await self.conn.close()
        if self.server is not None:
            self.server.stop()

    async def clean(self) -> None:
        if self.client is not None:
            await self.client.close()
        self.domain = f"bench-{uuid.uuid4().hex[:8]}"
        _write_state({"endpoint": self.endpoint, "domain": self.domain, "dsn": self.dsn})
        assert self.conn is not None
        self.base = self.scanned = int(
            await self.conn.fetchval("SELECT coalesce(max(position), 0) FROM azolla_events"))
        self.done = self.expected = 0
        self.client = await Client.connect(self.endpoint, domain=self.domain, timeout=60)

    async def enqueue_one(self, ts: float | None) -> None:
        assert self.client is not None
        await self.client.submit_task("noop", None if ts is None else [ts]).submit()
        self.expected += 1

    async def enqueue_batch(self, k: int) -> None:
        assert self.client is not None
        await self.client.submit_many("noop", [[] for _ in range(k)])
        self.expected += k

    async def remaining(self) -> int:
        assert self.conn is not None
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE terminal AND domain = $2) AS n, max(position) AS top"
            "  FROM azolla_events WHERE position > $1", self.scanned, self.domain)
        if row["top"] is not None:
            self.done += row["n"]
            self.scanned = row["top"]
        return max(0, self.expected - self.done)

    async def completion(self) -> tuple[int, int, float | None]:
        assert self.conn is not None
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE type = 'TaskSucceeded.v1') AS ok,"
            "       count(*) FILTER (WHERE type <> 'TaskSucceeded.v1') AS bad,"
            "       extract(epoch FROM max(recorded_at) FILTER"
            "               (WHERE type = 'TaskSucceeded.v1'))::float8 AS last"
            "  FROM azolla_events WHERE position > $1 AND terminal AND domain = $2",
            self.base, self.domain)
        return row["ok"], row["bad"], row["last"]

    async def latency_pairs(self) -> list[tuple[float, float]]:
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT payload::text AS p FROM azolla_events"
            " WHERE position > $1 AND type = 'TaskSucceeded.v1' AND domain = $2",
            self.base, self.domain)
        pairs = []
        for row in rows:
            submitted, started = json.loads(json.loads(row["p"])["result"])
            if submitted is not None:
                pairs.append((submitted, started))
        return pairs

    async def paced_details(self) -> dict:
        """Where the paced latency goes, per task, from the event log's commit times.

        submit -> submitted: the submit call until its commit (``TaskSubmitted.recorded_at``);
        submitted -> dispatched: until the dispatch commit (``TaskAttemptStarted``);
        dispatched -> started: until the task code starts (push, shepherd, pool worker);
        started -> recorded: until the success is committed (``TaskSucceeded``).
        ``recorded_at`` is the commit's transaction start, a fraction of a ms before the commit.
        """
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT stream_id, type, extract(epoch FROM recorded_at)::float8 AS t,"
            "       CASE WHEN type = 'TaskSucceeded.v1' THEN payload::text END AS p"
            "  FROM azolla_events WHERE position > $1 AND domain = $2 AND type IN"
            "       ('TaskSubmitted.v1', 'TaskAttemptStarted.v1', 'TaskSucceeded.v1')",
            self.base, self.domain)
        by: dict = {}
        for row in rows:
            by.setdefault(row["stream_id"], {})[row["type"]] = (row["t"], row["p"])
        stages: dict[str, list[float]] = {
            "submit->submitted": [], "submitted->dispatched": [], "dispatched->started": [],
            "started->recorded": []}
        for ev in by.values():
            if len(ev) < 3:
                continue
            submitted, started = json.loads(json.loads(ev["TaskSucceeded.v1"][1])["result"])
            if submitted is None:
                continue
            t_sub, t_disp = ev["TaskSubmitted.v1"][0], ev["TaskAttemptStarted.v1"][0]
            stages["submit->submitted"].append((t_sub - submitted) * 1000)
            stages["submitted->dispatched"].append((t_disp - t_sub) * 1000)
            stages["dispatched->started"].append((started - t_disp) * 1000)
            stages["started->recorded"].append((ev["TaskSucceeded.v1"][0] - started) * 1000)
        return {"stages_ms": {k: percentiles(v) for k, v in stages.items()}}

    async def wait_workers_ready(self, procs: int) -> None:
        await _infra.wait_shepherds(self.endpoint, self.domain, procs, timeout=60)

    # -- worker side (runs in the harness's worker subprocess) -----------------------------

    async def run_worker(self, conc: int, on_start, ready) -> None:
        state = _read_state()
        log_dir = STATE.parent
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        shepherd = _infra.start_shepherd(
            state["endpoint"], MODE, conc, state["domain"], log_dir,
            name=f"shepherd-{os.getpid()}", die_with_parent=True,
            extra=_infra.POOL_BENCH_OPTIONS if MODE == "pool" else ())
        pid_file = _note_pid(shepherd)
        try:
            await _infra.wait_shepherds(state["endpoint"], state["domain"], 1, [shepherd],
                                        timeout=60)
            await _infra.wait_quiet([shepherd.pid], timeout=30)
            ready()
            while not stop.is_set() and shepherd.alive():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            shepherd.stop(timeout=15)
            pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    try:
        main(AzollaPeer)
    finally:
        _infra.kill_all()
