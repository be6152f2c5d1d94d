"""Azolla-only system measurements: many submitting clients, recovery, profiles at peak load.

Used by ``bench/run.py``; each function starts what it needs (server, shepherds) through
:mod:`bench._infra` and leaves nothing running. ``python -m bench.system submitter ...`` is the
client process of :func:`multi_client_submit`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from bench import _infra

TASK_STARTED = "TaskAttemptStarted.v1"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


async def _max_position(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM azolla_events"))


async def _poll(fn: Any, timeout: float, interval: float = 0.02) -> Any:
    """Call async ``fn`` until it returns something not None; bounded by ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = await fn()
        if value is not None:
            return value
        await asyncio.sleep(interval)
    return None


class Progress:
    """Terminal task events of one domain after a log position, counted incrementally."""

    def __init__(self, conn: asyncpg.Connection, domain: str, after: int) -> None:
        self.conn, self.domain, self.scanned, self.count = conn, domain, after, 0

    async def done(self) -> int:
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE terminal AND domain = $2) AS n, max(position) AS top"
            "  FROM azolla_events WHERE position > $1", self.scanned, self.domain)
        if row["top"] is not None:
            self.count += row["n"]
            self.scanned = row["top"]
        return self.count


# -- many submitting clients -------------------------------------------------------------------

async def _submitter(endpoint: str, domain: str, n: int, coroutines: int,
                     start_at: float) -> dict[str, Any]:
    from azolla import Client

    lat: list[float] = []
    async with Client.connect(endpoint, domain=domain, timeout=60) as client:
        await client.submit_task("noop").submit()  # warm the channel
        counter = iter(range(n))

        async def loop() -> None:
            for _ in counter:
                t = time.perf_counter()
                await client.submit_task("noop").submit()
                lat.append((time.perf_counter() - t) * 1000)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.time()
        await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(coroutines))), 300)
        t1 = time.time()
        stats = client.stats()
    return {"n": n, "t0": t0, "t1": t1, "lat": lat, "batches": stats.submit_batches,
            "largest_batch": stats.largest_submit_batch}


def multi_client_submit(endpoint: str, processes: int, coroutines: int, n_per_process: int,
                        log_dir: Path, timeout: float = 300) -> dict[str, Any]:
    """``processes`` client processes, each ``coroutines`` concurrent single submitters."""
    domain = f"submitters-{os.getpid()}-{int(time.time())}"
    start_at = time.time() + 3.0  # every process connected and warm by then
    procs = []
    outs = []
    for i in range(processes):
        out = log_dir / f"submitter-{i}.json"
        out.unlink(missing_ok=True)
        outs.append(out)
        procs.append(_infra.Proc(f"submitter-{i}", [
            sys.executable, "-m", "bench.system", "submitter", "--endpoint", endpoint,
            "--domain", domain, "-n", str(n_per_process), "--coroutines", str(coroutines),
            "--start-at", repr(start_at), "--out", str(out)], log_dir / f"submitter-{i}.log"))
    try:
        deadline = time.time() + timeout
        for p in procs:
            p.popen.wait(max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        return {"error": f"submitters did not finish within {timeout:.0f} s"}
    finally:
        for p in procs:
            p.stop(timeout=5)
    parts = [json.loads(o.read_text()) for o in outs if o.exists()]
    if len(parts) != processes:
        return {"error": f"{processes - len(parts)} submitter(s) failed; see {log_dir}"}
    t0 = min(p["t0"] for p in parts)
    t1 = max(p["t1"] for p in parts)
    lat = [x for p in parts for x in p["lat"]]
    total = sum(p["n"] for p in parts)
    return {"processes": processes, "coroutines": coroutines, "tasks": total,
            "seconds": t1 - t0, "per_s": total / (t1 - t0),
            "lat_ms": {f"p{q}": _pct(lat, q) for q in (50, 95, 99)},
            "batches": sum(p["batches"] for p in parts),
            "largest_batch": max(p["largest_batch"] for p in parts)}


# -- submit-then-wait loops through the plain API (issue 7) -----------------------------------

async def submit_wait_loops(endpoint: str, log_dir: Path, shepherds: int, concurrency: int,
                            loops: int = 256, n: int = 20_000) -> dict[str, Any]:
    """``loops`` coroutines of one client, each ``await (await submit()).wait()`` in a loop.

    The plain API only (``submit_task(...).submit()`` then ``handle.wait()``), as an
    application would write it; the SDK coalesces the submits into batches and the waits onto
    one watch stream. ``shepherds`` pool shepherds of ``concurrency`` each run the tasks, in a
    domain of their own. Returns tasks/s (first submit to last result) and the loop latency.
    """
    from azolla import Client

    domain = f"waitloops-{os.getpid()}-{int(time.time())}"
    procs = [_infra.start_shepherd(endpoint, "pool", concurrency, domain, log_dir,
                                   name=f"waitloops-shepherd-{i}",
                                   extra=_infra.POOL_BENCH_OPTIONS)
             for i in range(shepherds)]
    lat: list[float] = []
    failed = 0
    try:
        await _infra.wait_shepherds(endpoint, domain, shepherds, procs, timeout=60)
        await _infra.wait_quiet([p.pid for p in procs], timeout=30)
        async with Client.connect(endpoint, domain=domain, timeout=60) as client:
            for _ in range(20):  # warm the channel, the watch stream and the workers
                await (await client.submit_task("noop").submit()).wait(timeout=60)
            counter = iter(range(n))

            async def loop() -> None:
                nonlocal failed
                for _ in counter:
                    t = time.perf_counter()
                    result = await (await client.submit_task("noop").submit()).wait(timeout=60)
                    lat.append((time.perf_counter() - t) * 1000)
                    failed += not result.success

            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(loops))), 300)
            elapsed = time.perf_counter() - t0
            stats = client.stats()
    finally:
        for proc in procs:
            proc.stop(timeout=15)
    return {"loops": loops, "tasks": n, "failed": failed, "seconds": elapsed,
            "per_s": n / elapsed, "shepherds": shepherds, "concurrency": concurrency,
            "lat_ms": {f"p{q}": _pct(lat, q) for q in (50, 95, 99)},
            "submit_batches": stats.submit_batches,
            "largest_batch": stats.largest_submit_batch}


# -- recovery: orchestrator kill -9 and restart ----------------------------------------------

async def orchestrator_restart(server_dsn: str, log_dir: Path, unfinished: int = 10_000,
                               concurrency: int = 8, sleep_s: float = 0.05,
                               profile_dir: Path | None = None) -> dict[str, Any]:
    """kill -9 the orchestrator with ``unfinished`` tasks in the log, restart it at once.

    A pool shepherd (``concurrency`` slots) is connected and busy with ``sleepy`` tasks of
    ``sleep_s`` seconds when the server is killed, so almost all tasks are queued and a few are
    running. The server is restarted on the same port and database right after the kill; the
    shepherd reconnects on its own (its own backoff). Measured from the restart: health SERVING,
    first successful RPC, first dispatch committed (``TaskAttemptStarted`` after the kill) and
    first task code started after the kill; also the CPU time each server used until it served.
    """
    from azolla import Client

    dsn = await _infra.fresh_database(server_dsn, "azolla_recovery")
    port = _infra.free_port()
    domain = "recovery"
    # As from a pip install: the servers read azolla's .pyc instead of compiling its sources
    # (bench_env does not pass PYTHONDONTWRITEBYTECODE on).
    _infra.compile_bytecode()
    t_first_start = time.time()
    server, endpoint = _infra.start_server(dsn, log_dir, port, name="recovery-server")
    shepherd = None
    server2 = None
    conn = await asyncpg.connect(dsn)
    try:
        empty_start_s = await _infra.wait_serving(endpoint, server, timeout=60) - t_first_start
        empty_start_cpu_s = _infra.tree_cpu_s(server.pid)
        shepherd = _infra.start_shepherd(endpoint, "pool", concurrency, domain, log_dir,
                                         name="recovery-shepherd")
        await _infra.wait_shepherds(endpoint, domain, 1, [shepherd], timeout=60)
        await _infra.wait_quiet([shepherd.pid], timeout=30)
        async with Client.connect(endpoint, domain=domain, timeout=60) as client:
            now = time.time()
            handles = []
            for i in range(0, unfinished, 1000):
                k = min(1000, unfinished - i)
                handles += await client.submit_many("sleepy", [[sleep_s, now]] * k)
            probe = handles[-1].task_id
        await asyncio.sleep(0.5)
        t_kill = time.time()
        os.kill(server.pid, signal.SIGKILL)
        server.popen.wait(10)
        t_restart = time.time()
        server2, _ = _infra.start_server(dsn, log_dir, port, name="recovery-server-2")
        # The log as the dead server left it (a commit in flight at the kill has landed by
        # now: the new process needs far longer than this to import).
        await asyncio.sleep(0.05)
        pos_kill = await _max_position(conn)
        events_in_log = pos_kill
        done = int(await conn.fetchval(
            "SELECT count(*) FROM azolla_events WHERE terminal AND domain = $1", domain))

        cpu_at_serving: list[float] = []

        async def health() -> float | None:
            ok = await _infra.health_serving(endpoint, timeout=0.25)
            if ok and server2 is not None:
                cpu_at_serving.append(_infra.tree_cpu_s(server2.pid))
            return time.time() if ok else None

        async def first_rpc() -> float | None:
            import grpc.aio

            from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc

            async with grpc.aio.insecure_channel(endpoint.split("://", 1)[1]) as ch:
                stub = orchestrator_pb2_grpc.ClientServiceStub(ch)
                try:
                    await stub.GetTaskStatus(orchestrator_pb2.GetTaskStatusRequest(
                        task_id=probe, domain=domain), timeout=0.25)
                except grpc.aio.AioRpcError:
                    return None
                return time.time()

        async def first_dispatch() -> float | None:
            value = await conn.fetchval(
                "SELECT extract(epoch FROM min(recorded_at))::float8 FROM azolla_events"
                " WHERE position > $1 AND type = $2", pos_kill, TASK_STARTED)
            return float(value) if value is not None else None

        serving, rpc, dispatched = await asyncio.gather(
            _poll(health, 60, 0.01), _poll(first_rpc, 60, 0.01), _poll(first_dispatch, 60, 0.02))

        async def first_start() -> float | None:
            # Only attempts dispatched by the restarted server: the shepherd may still start
            # attempts it was given before the kill.
            rows = await conn.fetch(
                "SELECT s.payload::text AS p FROM azolla_events s JOIN azolla_events a"
                " ON a.stream_id = s.stream_id AND a.type = $2 AND a.position > $1"
                " AND (a.payload->>'attempt')::int = (s.payload->>'attempt')::int"
                " WHERE s.position > $1 AND s.type = 'TaskSucceeded.v1'", pos_kill, TASK_STARTED)
            starts = [json.loads(json.loads(r["p"])["result"])[1] for r in rows]
            return min(starts) if starts else None

        started = await _poll(first_start, 30, 0.1)

        def since(t: float | None) -> float | None:
            return None if t is None else t - t_restart

        result: dict[str, Any] = {
            "unfinished_at_kill": unfinished - done, "events_in_log": events_in_log,
            "start_to_serving_empty_db_s": empty_start_s,
            # CPU seconds the server used until it served: steadier than wall clock on a
            # shared host (a busy host stretches the wall clock, not the CPU much).
            "start_cpu_to_serving_empty_db_s": empty_start_cpu_s,
            "restart_cpu_to_serving_s": cpu_at_serving[0] if cpu_at_serving else None,
            "kill_to_restart_s": t_restart - t_kill,
            "restart_to_serving_s": since(serving), "restart_to_first_rpc_s": since(rpc),
            "restart_to_first_dispatch_s": since(dispatched),
            "restart_to_first_task_start_s": since(started),
            "shepherd": f"pool, concurrency {concurrency}, tasks sleep {sleep_s} s",
            "server_log": str(server2.log_path)}
        if profile_dir is not None:
            # Not timed: kill -9 again and restart under py-spy to see where start-up goes.
            os.kill(server2.pid, signal.SIGKILL)
            server2.popen.wait(10)
            result["startup_profile"] = await _profile_startup(
                dsn, port, endpoint, log_dir, profile_dir)
        return result
    finally:
        await conn.close()
        for proc in (shepherd, server2, server):
            if proc is not None:
                proc.stop(timeout=3)


async def _profile_startup(dsn: str, port: int, endpoint: str, log_dir: Path,
                           out_dir: Path) -> dict[str, Any]:
    """Start the server under ``py-spy record``; stop it (SIGKILL) 0.5 s after SERVING."""
    out = _profile_files(out_dir, ("orchestrator-restart",))["orchestrator-restart"]
    spy = _infra.Proc("py-spy-restart", [
        str(_infra.VENV_BIN / "py-spy"), "record", "--format", "raw", "--nonblocking",
        "--rate", "200", "--output", str(out), "--", *_infra.server_argv(dsn, port)],
        log_dir / "py-spy-restart.log")
    try:
        t0 = time.time()
        serving = await _infra.wait_serving(endpoint, spy, timeout=60)
        await asyncio.sleep(0.5)
        for child in _children(spy.pid):
            os.kill(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.popen.wait(30)
    finally:
        spy.stop(timeout=5)
    summary = _summary_or_error(out)
    summary["start_to_serving_under_py_spy_s"] = round(serving - t0, 3)
    return summary


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


# -- recovery: shepherd kill -9 ----------------------------------------------------------------

async def shepherd_death(server_dsn: str, log_dir: Path, running: int = 4) -> dict[str, Any]:
    """kill -9 a shepherd that runs ``running`` attempts; time until they run elsewhere.

    Shepherd A (pool, ``running`` slots) takes ``running`` long ``sleepy`` tasks; shepherd B (same
    domain, idle) is connected; A's process is killed with SIGKILL. Measured from the kill: the
    commit of the attempts' re-dispatch (``TaskAttemptStarted`` of attempt 2) and the start of
    attempt 2's code on B (first and last of the ``running`` tasks).
    """
    from azolla import Client

    dsn = await _infra.fresh_database(server_dsn, "azolla_shepherd_death")
    domain = "death"
    server, endpoint = _infra.start_server(dsn, log_dir, name="death-server")
    a = b = None
    conn = await asyncpg.connect(dsn)
    try:
        await _infra.wait_serving(endpoint, server, timeout=60)
        a = _infra.start_shepherd(endpoint, "pool", running, domain, log_dir,
                                  name="death-shepherd-a")
        await _infra.wait_shepherds(endpoint, domain, 1, [a], timeout=60)
        await _infra.wait_quiet([a.pid], timeout=30)
        async with Client.connect(endpoint, domain=domain, timeout=60) as client:
            await client.submit_many("sleepy", [[120.0, time.time()]] * running)

        async def all_running() -> bool | None:
            n = await conn.fetchval("SELECT count(*) FROM azolla_events WHERE domain = $1"
                                    " AND type = $2", domain, TASK_STARTED)
            return True if n >= running else None

        if await _poll(all_running, 30) is None:
            raise RuntimeError("the sleepy tasks did not start on shepherd A")
        b = _infra.start_shepherd(endpoint, "pool", running, domain, log_dir,
                                  name="death-shepherd-b")
        await _infra.wait_shepherds(endpoint, domain, 2, [a, b], timeout=60)
        await _infra.wait_quiet([b.pid], timeout=30)
        await asyncio.sleep(0.3)  # A's attempts have been running a while (acks sent)
        pos = await _max_position(conn)
        t_kill = time.time()
        os.kill(a.pid, signal.SIGKILL)

        async def redispatched() -> list[float] | None:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM recorded_at)::float8 AS t, payload::text AS p"
                "  FROM azolla_events WHERE position > $1 AND type = $2 AND domain = $3",
                pos, TASK_STARTED, domain)
            times = [r["t"] for r in rows if json.loads(r["p"]).get("attempt") == 2]
            return times if len(times) >= running else None

        async def second_starts() -> list[float] | None:
            rows = await conn.fetch(
                "SELECT payload::text AS p FROM azolla_events WHERE position > $1"
                " AND type = 'TaskSucceeded.v1' AND domain = $2", pos, domain)
            starts = [json.loads(json.loads(r["p"])["result"])[1] for r in rows]
            return starts if len(starts) >= running else None

        commits = await _poll(redispatched, 60)
        starts = await _poll(second_starts, 60)
        lost = await conn.fetchval(
            "SELECT count(*) FROM azolla_events WHERE position > $1 AND domain = $2"
            " AND type = 'TaskRetryScheduled.v1'", pos, domain)
        return {"attempts_running_at_kill": running, "retries_scheduled": lost,
                "kill_to_first_redispatch_s": min(commits) - t_kill if commits else None,
                "kill_to_all_redispatched_s": max(commits) - t_kill if commits else None,
                "kill_to_first_restart_of_code_s": min(starts) - t_kill if starts else None,
                "kill_to_all_restarted_s": max(starts) - t_kill if starts else None}
    finally:
        await conn.close()
        for proc in (a, b, server):
            if proc is not None:
                proc.stop(timeout=10)


# -- profiles at peak load --------------------------------------------------------------------

async def profile_peak(endpoint: str, server_pid: int, dsn: str, log_dir: Path, out_dir: Path,
                       mode: str = "pool", concurrency: int = 16, seconds: float = 15.0,
                       backlog: int = 5000) -> dict[str, Any]:
    """py-spy the orchestrator and a shepherd while the system runs no-op tasks flat out.

    The producer keeps ``backlog`` tasks queued (submit_many of 1,000 whenever fewer are left)
    for ``seconds`` while ``py-spy record --nonblocking --gil --format raw`` samples the server
    and the shepherd (with ``--subprocesses``: its pool workers too). ``--gil`` keeps only
    samples of the thread holding the GIL, i.e. Python (and C extension code called from it)
    that is running, not threads waiting in epoll or a blocking read. Returns the top frames.
    """
    from azolla import Client

    pyspy = _infra.VENV_BIN / "py-spy"
    domain = f"profile-{int(time.time())}"
    files = _profile_files(out_dir)
    shepherd = _infra.start_shepherd(endpoint, mode, concurrency, domain, log_dir,
                                     name="profile-shepherd",
                                     extra=_infra.POOL_BENCH_OPTIONS if mode == "pool" else ())
    spies: list[_infra.Proc] = []
    submitted = 0
    try:
        await _infra.wait_shepherds(endpoint, domain, 1, [shepherd], timeout=60)
        await _infra.wait_quiet([shepherd.pid], timeout=30)
        conn0 = await asyncpg.connect(dsn)
        try:
            base = await _max_position(conn0)
        finally:
            await conn0.close()
        async with Client.connect(endpoint, domain=domain, timeout=60) as client:
            await client.submit_many("noop", [[]] * backlog)
            submitted += backlog
            for name, pid, extra in (("orchestrator", server_pid, []),
                                     ("shepherd", shepherd.pid, ["--subprocesses"])):
                spies.append(_infra.Proc(f"py-spy-{name}", [
                    str(pyspy), "record", "--pid", str(pid), "--format", "raw", "--output",
                    str(files[name]), "--duration", str(int(seconds)), "--nonblocking",
                    "--rate", "100", "--gil", *extra], log_dir / f"py-spy-{name}.log"))
            t0 = time.time()
            cpu0 = {n: _infra.tree_cpu_s(p) for n, p in (("orchestrator", server_pid),
                                                           ("shepherd", shepherd.pid))}
            conn = await asyncpg.connect(dsn)
            try:
                progress = Progress(conn, domain, base)
                while time.time() - t0 < seconds:
                    done = await progress.done()
                    if submitted - done < backlog:
                        await client.submit_many("noop", [[]] * 1000)
                        submitted += 1000
                    else:
                        await asyncio.sleep(0.05)
                done = await progress.done()
            finally:
                await conn.close()
            elapsed = time.time() - t0
            cpu = {n: round(_infra.tree_cpu_s(p) - cpu0[n], 2)
                   for n, p in (("orchestrator", server_pid), ("shepherd", shepherd.pid))}
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(seconds + 30)
    finally:
        for spy in spies:
            spy.stop(timeout=5)
        shepherd.stop(timeout=15)
    summary: dict[str, Any] = {"seconds": round(elapsed, 1), "mode": mode,
                               "concurrency": concurrency, "cpu_s": cpu,
                               "tasks_completed_approx": int(done)}
    for name, path in files.items():
        summary[name] = _summary_or_error(path)
    return summary


def _summary_or_error(path: Path) -> dict[str, Any]:
    return summarize_profile(path) if path.exists() else {"error": f"no profile in {path}"}


def _profile_files(out_dir: Path, names: tuple[str, ...] = ("orchestrator", "shepherd")
                   ) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / f"{name}.raw.txt" for name in names}
    for path in files.values():
        path.unlink(missing_ok=True)
    return files


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]  # --subprocesses prefixes the pid
        if not frames:
            continue
        total += n
        self_count[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * k / total, 1)) for f, k in c.most_common(top)]

    return {"samples": total, "self_pct": share(self_count), "inclusive_pct": share(incl),
            "file": str(path)}


# -- command line (the submitter process) -----------------------------------------------------

def _restart_repeats(repeats: int, unfinished: int) -> None:
    """Run :func:`orchestrator_restart` ``repeats`` times on a private cluster; print each."""
    import tempfile

    keys = ("start_to_serving_empty_db_s", "restart_cpu_to_serving_s", "restart_to_serving_s",
            "restart_to_first_dispatch_s", "restart_to_first_task_start_s")
    with tempfile.TemporaryDirectory(prefix="azolla-restart-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o777)  # the cluster runs as the postgres user
        cluster = _infra.BenchCluster(work / "pg")
        cluster.start()
        try:
            for i in range(repeats):
                result = asyncio.run(orchestrator_restart(cluster.dsn("postgres"), work,
                                                          unfinished))
                print(json.dumps({"repeat": i + 1, **{k: result.get(k) for k in keys}}),
                      flush=True)
        finally:
            _infra.kill_all()
            cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Azolla system benchmark helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submitter", help="one client process of the many-clients phase")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--domain", required=True)
    s.add_argument("-n", type=int, required=True)
    s.add_argument("--coroutines", type=int, required=True)
    s.add_argument("--start-at", type=float, required=True)
    s.add_argument("--out", required=True)
    p = sub.add_parser("summarize-profile", help="top frames of a py-spy raw file")
    p.add_argument("file")
    r = sub.add_parser("restart", help="the orchestrator kill -9 + restart phase alone, "
                       "on a private cluster, --repeats times")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--unfinished", type=int, default=10_000)
    a = ap.parse_args()
    if a.cmd == "submitter":
        result = asyncio.run(_submitter(a.endpoint, a.domain, a.n, a.coroutines, a.start_at))
        Path(a.out).write_text(json.dumps(result))
    elif a.cmd == "restart":
        _restart_repeats(a.repeats, a.unfinished)
    else:
        print(json.dumps(summarize_profile(Path(a.file)), indent=1))


if __name__ == "__main__":
    main()
