"""A small Jepsen for Azolla: record client operations, ledger real executions, check the log.

* :class:`Recorder` logs every client operation (invoke / ok / fail / unknown) with its
  idempotency key and, once known, the task id.
* The ledger (``chaos_tasks.record``) gets one line per real execution: task id, attempt, pid.
* :func:`check` reads the event log from PostgreSQL after a fault-free drain and reports:
  lost (acknowledged, never recorded), duplicate terminal outcomes, stale results accepted
  (a terminal outcome naming a superseded attempt), stuck (recorded, not terminal after the
  drain) and tasks executed more than once (with whether a fault window touched them).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from azolla import Client
from azolla.errors import AzollaError


@dataclass
class Op:
    """One client operation."""

    kind: str  # invoke | ok | fail | unknown
    key: str
    task_id: str | None
    at: float
    detail: str = ""


@dataclass
class Recorder:
    """Every client operation, in order."""

    ops: list[Op] = field(default_factory=list)

    def record(self, kind: str, key: str, task_id: str | None = None, detail: str = "") -> None:
        """Log one operation."""
        self.ops.append(Op(kind, key, task_id, time.time(), detail))

    def acknowledged(self) -> dict[str, str]:
        """Idempotency key → task id of every submit that was answered OK."""
        return {op.key: op.task_id for op in self.ops if op.kind == "ok" and op.task_id}

    def dump(self, path: Path) -> None:
        """Write the history as JSON lines."""
        path.write_text("".join(json.dumps(op.__dict__) + "\n" for op in self.ops))


@dataclass
class FaultWindow:
    """When a fault was active (for attributing duplicate executions)."""

    name: str
    start: float
    end: float = 0.0


@dataclass
class Report:
    """The checker's verdict and figures."""

    acknowledged: int
    lost: list[str]
    duplicate_terminal: list[str]
    stale_accepted: list[str]
    stuck: list[str]
    executed_more_than_once: int
    executed_more_than_once_touched_by_fault: int
    executions: int
    rejected_outcomes: int
    recovery_seconds: list[float]

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated, accepted stale or stuck."""
        return not (self.lost or self.duplicate_terminal or self.stale_accepted or self.stuck)

    def figures(self) -> dict[str, Any]:
        """The numbers to print and publish."""
        rec = sorted(self.recovery_seconds)

        def pct(p: float) -> float | None:
            return round(rec[min(int(p * len(rec)), len(rec) - 1)], 3) if rec else None

        return {
            "acknowledged": self.acknowledged, "lost": len(self.lost),
            "duplicate_terminal": len(self.duplicate_terminal),
            "stale_accepted": len(self.stale_accepted), "stuck": len(self.stuck),
            "executions": self.executions,
            "executed_more_than_once": self.executed_more_than_once,
            "of_which_touched_by_a_fault": self.executed_more_than_once_touched_by_fault,
            "rejected_late_outcomes": self.rejected_outcomes,
            "recovery_p50_s": pct(0.5), "recovery_p99_s": pct(0.99),
        }


def read_ledger(path: Path) -> list[tuple[str, int, int, str, float]]:
    """The ledger's lines: (task_id, attempt, pid, key, start time)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        task_id, attempt, pid, key, start = line.split()
        rows.append((task_id, int(attempt), int(pid), key, float(start)))
    return rows


async def check(database_url: str, recorder: Recorder, ledger: Path,
                faults: list[FaultWindow], recovery: list[float]) -> Report:
    """Compare the client history and the ledger with the event log."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT stream_id, type, payload, terminal FROM azolla_events "
                                "ORDER BY position")
    finally:
        await conn.close()
    submitted: set[str] = set()
    terminal: Counter[str] = Counter()
    last_started: dict[str, int] = {}
    stale: list[str] = []
    rejected = 0
    for row in rows:
        sid, kind = str(row["stream_id"]), row["type"]
        if kind == "TaskSubmitted.v1":
            submitted.add(sid)
        elif kind == "TaskAttemptStarted.v1":
            last_started[sid] = json.loads(row["payload"])["attempt"]
        elif kind == "AttemptOutcomeRejected.v1":
            rejected += 1
        if row["terminal"]:
            terminal[sid] += 1
            attempt = json.loads(row["payload"]).get("attempt")
            if kind != "TaskCancelled.v1" and attempt is not None \
                    and attempt != last_started.get(sid):
                stale.append(sid)
    acknowledged = recorder.acknowledged()
    lost = [tid for tid in acknowledged.values() if tid not in submitted]
    stuck = [tid for tid in acknowledged.values() if tid in submitted and not terminal[tid]]
    duplicates = [tid for tid, count in terminal.items() if count > 1]
    runs: defaultdict[str, list[float]] = defaultdict(list)
    entries = read_ledger(ledger)
    for task_id, _attempt, _pid, _key, start in entries:
        runs[task_id].append(start)
    multi = {tid: starts for tid, starts in runs.items() if len(starts) > 1}
    touched = sum(1 for starts in multi.values()
                  if any(w.start - 5 <= s <= (w.end or time.time()) + 5
                         for s in starts for w in faults))
    return Report(len(acknowledged), lost, duplicates, stale, stuck, len(multi), touched,
                  len(entries), rejected, recovery)


async def submit_all(client_url: str, recorder: Recorder, ledger: Path, count: int, rate: float,
                     *, sleep_ms: int = 0, seed: int = 0, deadline: float = 120.0,
                     prefix: str = "k") -> None:
    """Submit ``count`` ledger tasks at ``rate``/s; retry each (same key) until acknowledged."""
    rng = random.Random(seed)
    client = Client(orchestrator_endpoint=client_url, timeout=5)
    stop_at = time.monotonic() + deadline

    async def one(i: int) -> None:
        key = f"{prefix}-{seed}-{i}"
        delay = 0.05
        while time.monotonic() < stop_at:
            recorder.record("invoke", key)
            try:
                handle = await (client.submit_task("record", [str(ledger), key, sleep_ms])
                                .idempotency_key(key).submit())
            except AzollaError as exc:
                recorder.record("unknown" if "UNAVAILABLE" in repr(exc) else "fail", key,
                                detail=type(exc).__name__)
                await asyncio.sleep(delay * (1 + rng.random()))
                delay = min(delay * 2, 1.0)
                continue
            recorder.record("ok", key, handle.task_id)
            return

    tasks = []
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    await client.close()


async def drain(client_url: str, task_ids: list[str], timeout: float) -> list[str]:
    """Wait for every task; return the ids still not finished at the deadline."""
    client = Client(orchestrator_endpoint=client_url, timeout=10)
    pending = list(task_ids)
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            still: list[str] = []
            for task_id in pending:
                try:
                    status = await client.handle(task_id).status()
                except AzollaError:
                    still.append(task_id)
                    continue
                if status.state not in ("succeeded", "failed", "cancelled"):
                    still.append(task_id)
            pending = still
            if pending:
                await asyncio.sleep(0.2)
    finally:
        await client.close()
    return pending
