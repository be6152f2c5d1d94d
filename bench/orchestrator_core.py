"""The orchestrator's decision loop alone: no gRPC, no shepherd processes.

An :class:`~azolla.app.orchestrator.Orchestrator` on the real PostgreSQL event store (a private
cluster, fsync and synchronous_commit on) drives N no-op tasks end to end through in-process
shepherds that report every pushed batch as succeeded at once, in one message (what a
batching shepherd does). It prints tasks/s and this process's CPU per task (the orchestrator
plus the trivial shepherds; PostgreSQL's CPU is reported separately), so changes to the loop
can be measured without the noise of the rest of the system::

    .venv/bin/python bench/orchestrator_core.py --tasks 20000 --capacity 64 --repeat 3
    .venv/bin/python bench/orchestrator_core.py --store memory          # no database at all
    .venv/bin/python bench/orchestrator_core.py --profile /tmp/core.prof  # cProfile the loop
    .venv/bin/python bench/orchestrator_core.py --submit-only --shepherds 0  # accepting only
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from azolla.app.model import ReportedOutcome, ShepherdHello, SubmitRequest
from azolla.app.orchestrator import Orchestrator, ShepherdSession
from azolla.domain.ports import EventStore, ExecutionRequest


class EchoShepherd:
    """Reports each pushed batch as succeeded, in one ``report_results`` call."""

    def __init__(self, orchestrator: Orchestrator, index: int, capacity: int) -> None:
        self.orchestrator = orchestrator
        self.hello = ShepherdHello(shepherd_uuid=f"echo-{os.getpid()}-{index}", domain="bench",
                                   group="default", capacity=capacity, accepts_batches=True)
        self.session: ShepherdSession | None = None
        self.done = 0

    @property
    def shepherd_id(self) -> str:
        return self.hello.shepherd_uuid

    async def connect(self) -> None:
        self.session = await self.orchestrator.connect_shepherd(self.hello, self)

    async def push(self, tasks: Sequence[ExecutionRequest]) -> None:
        assert self.session is not None
        outcomes = [ReportedOutcome(t.task_id, t.attempt, True, "null") for t in tasks]
        asyncio.get_running_loop().create_task(
            self.orchestrator.report_results(self.session, outcomes))

    async def cancel(self, task_id: str, attempt: int, reason: str) -> None:
        return None

    async def close(self, reason: str) -> None:
        return None


async def _open_store(kind: str, dsn: str | None) -> EventStore:
    if kind == "memory":
        from azolla.adapters.memory.event_store import InMemoryEventStore
        return InMemoryEventStore()
    from azolla.adapters.postgres.event_store import PostgresEventStore
    assert dsn is not None
    return await PostgresEventStore.open(dsn)


class GcTimer:
    """Counts the garbage collector's passes and pause times (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.count += 1
        self.total += pause
        self.longest = max(self.longest, pause)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pg_cpu(pid: int | None) -> float:
    """CPU seconds of the PostgreSQL server's processes (children of the postmaster)."""
    if pid is None:
        return 0.0
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def run_once(args: argparse.Namespace, dsn: str | None, pg_pid: int | None,
                   profiler: cProfile.Profile | None) -> dict[str, Any]:
    store = await _open_store(args.store, dsn)
    orchestrator = Orchestrator(store)
    commit_seconds = [0.0]

    def observe(seconds: float, _events: int) -> None:
        commit_seconds[0] += seconds

    orchestrator.commit_observer = observe
    await orchestrator.start()
    shepherds = [EchoShepherd(orchestrator, i, args.capacity) for i in range(args.shepherds)]
    for shepherd in shepherds:
        await shepherd.connect()
    requests = [SubmitRequest(name="noop", args="[]", kwargs="{}", domain="bench")
                for _ in range(args.tasks)]
    remaining = args.tasks
    finished = asyncio.get_running_loop().create_future()

    def on_done(_outcome: Any) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not finished.done():
            finished.set_result(None)

    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    cpu0, pg0, t0 = _cpu(), _pg_cpu(pg_pid), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    batches = [requests[i:i + args.batch] for i in range(0, len(requests), args.batch)]
    submitted = await asyncio.gather(*(orchestrator.submit(b) for b in batches))
    if not args.submit_only:
        for results in submitted:
            for result in results:
                orchestrator.on_outcome(result.task_id, on_done)
        await asyncio.wait_for(finished, args.timeout)
    elapsed = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    cpu, pg = _cpu() - cpu0, _pg_cpu(pg_pid) - pg0
    gc.callbacks.remove(gc_timer)
    metrics = dict(orchestrator.metrics)
    await orchestrator.stop()
    await store.close()
    return {
        "tasks": args.tasks, "seconds": round(elapsed, 3),
        "tasks_per_s": round(args.tasks / elapsed),
        "cpu_us_per_task": round(cpu / args.tasks * 1e6, 1),
        "pg_cpu_us_per_task": round(pg / args.tasks * 1e6, 1),
        "commit_wait_s": round(commit_seconds[0], 3),
        "gc_passes": gc_timer.count, "gc_s": round(gc_timer.total, 3),
        "gc_longest_ms": round(gc_timer.longest * 1e3, 1),
        "commits": metrics["commits"], "events": metrics["events"],
        "events_per_commit": round(metrics["events"] / max(metrics["commits"], 1), 1),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    cluster = None
    dsn = args.dsn
    pg_pid: int | None = None
    tmp = None
    if args.store == "postgres" and dsn is None:
        from azolla.adapters.postgres.cluster import LocalCluster
        tmp = tempfile.mkdtemp(prefix="azolla-core-bench-")
        os.chmod(tmp, 0o777)
        cluster = LocalCluster(Path(tmp) / "pgdata")
        cluster.ensure_started()
        dsn = cluster.dsn()
        pg_pid = cluster.server_pid()
    profiler = cProfile.Profile() if args.profile else None
    results = []
    try:
        for _ in range(args.repeat):
            result = await run_once(args, dsn, pg_pid, profiler)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        if cluster is not None:
            cluster.stop("immediate")
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submit call")
    parser.add_argument("--capacity", type=int, default=64, help="slots per shepherd")
    parser.add_argument("--shepherds", type=int, default=1)
    parser.add_argument("--submit-only", action="store_true",
                        help="measure accepting the tasks only (use with --shepherds 0)")
    parser.add_argument("--store", choices=("postgres", "memory"), default="postgres")
    parser.add_argument("--dsn", help="use this database instead of a private cluster")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", help="write cProfile stats of the measured part here")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--gc-threshold", default="server",
                        help="gc.set_threshold for the run: 'server' (azolla-server's, the "
                             "default), 'default' (Python's) or e.g. 50000,20,100")
    args = parser.parse_args()
    if args.gc_threshold == "server":
        from azolla.app.server_main import SERVING_GC_THRESHOLD
        gc.set_threshold(*SERVING_GC_THRESHOLD)
    elif args.gc_threshold != "default":
        gc.set_threshold(*(int(part) for part in args.gc_threshold.split(",")))
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
