"""Benchmark of the EventStream write path (PostgresEventStore, group commit).

Runs against a private PostgreSQL cluster it starts in a temporary directory (LocalCluster,
``fsync=on``, ``synchronous_commit=on``) unless ``--dsn`` names a server; every run uses a fresh
database. Phases:

1. ``single``: one producer appends one event at a time, sequentially: commit latency of a lone
   append (one round trip + one WAL flush).
2. ``load``: ``--producers`` concurrent producers append one event per call until ``--events``
   events are committed: sustained events/s and per-call latency under load.
3. ``batch``: the same producers append ``--batch-events`` events per call.

Usage::

    .venv/bin/python bench/eventstream.py                  # defaults: 64 producers, 200k events
    .venv/bin/python bench/eventstream.py --dsn postgresql://... --events 500000 --json out.json

Prints one table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from azolla.adapters.postgres.cluster import LocalCluster, create_database, dsn_with_database
from azolla.adapters.postgres.event_store import PostgresEventStore
from azolla.domain.ports import NewEvent

PAYLOAD = json.dumps(
    {
        "name": "bench.noop",
        "args": [1, 2, 3],
        "kwargs": {"customer": "c-0042", "amount": 12.5},
        "retry": {"max_attempts": 3, "backoff": "exponential", "base": 1.0},
        "shepherd_group": "default",
        "priority": 0,
    }
)


@dataclass
class PhaseResult:
    """Figures of one phase."""

    phase: str
    producers: int
    events_per_call: int
    events: int
    seconds: float
    events_per_s: float
    calls_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    batches: int
    mean_batch_events: float
    python_cpu_pct: float
    pg_writer_cpu_pct: float
    python_cpu_us_per_event: float
    pg_writer_cpu_us_per_event: float
    wal_bytes_per_event: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def uuid7() -> uuid.UUID:
    """A time-ordered UUIDv7, like the orchestrator's task ids."""
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)
    raw[8] = 0x80 | (raw[8] & 0x3F)
    return uuid.UUID(bytes=bytes(raw))


ID_FACTORIES = {"uuid7": uuid7, "uuid4": uuid.uuid4}


def make_events(count: int, day: int, ids: str = "uuid7") -> Iterator[NewEvent]:
    """Fresh single-event task streams (version 1 of new streams)."""
    new_id = ID_FACTORIES[ids]
    for _ in range(count):
        yield NewEvent(new_id(), 1, "TaskSubmitted.v1", PAYLOAD, "bench", day)


def backend_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by local processes (the writer's server backends); NaN if the
    server is not on this machine."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def wal_lsn(url: str) -> int:
    """The server's current WAL insert position, in bytes."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


async def run_phase(
    store: PostgresEventStore,
    url: str,
    phase: str,
    producers: int,
    per_call: int,
    total_events: int,
    day: int,
    ids: str = "uuid7",
) -> PhaseResult:
    """Run ``producers`` concurrent loops of ``append`` calls of ``per_call`` events each."""
    calls_per_producer = max(1, total_events // (producers * per_call))
    # Build the events first: the benchmark measures the store, not uuid4().
    work = [
        [list(make_events(per_call, day, ids)) for _ in range(calls_per_producer)]
        for _ in range(producers)
    ]
    latencies: list[float] = []
    batches_before = store.batches_committed
    events_before = store.events_committed
    clock = time.perf_counter

    async def producer(calls: list[list[NewEvent]]) -> None:
        record = latencies.append
        append = store.append
        for events in calls:
            started = clock()
            await append(events)
            record(clock() - started)

    lsn_before = await wal_lsn(url)
    pg_before = backend_cpu_seconds(store.writer_pids)
    py_before = time.process_time()
    started = clock()
    await asyncio.gather(*(producer(calls) for calls in work))
    seconds = clock() - started
    py_cpu = time.process_time() - py_before
    pg_cpu = backend_cpu_seconds(store.writer_pids) - pg_before
    wal_bytes = await wal_lsn(url) - lsn_before
    latencies.sort()
    events = producers * calls_per_producer * per_call
    batches = store.batches_committed - batches_before
    return PhaseResult(
        phase=phase,
        producers=producers,
        events_per_call=per_call,
        events=events,
        seconds=seconds,
        events_per_s=events / seconds,
        calls_per_s=len(latencies) / seconds,
        p50_ms=percentile(latencies, 0.50) * 1e3,
        p95_ms=percentile(latencies, 0.95) * 1e3,
        p99_ms=percentile(latencies, 0.99) * 1e3,
        max_ms=latencies[-1] * 1e3,
        batches=batches,
        mean_batch_events=(store.events_committed - events_before) / max(batches, 1),
        python_cpu_pct=100 * py_cpu / seconds,
        pg_writer_cpu_pct=100 * pg_cpu / seconds,
        python_cpu_us_per_event=1e6 * py_cpu / events,
        pg_writer_cpu_us_per_event=1e6 * pg_cpu / events,
        wal_bytes_per_event=wal_bytes / events,
    )


@contextlib.asynccontextmanager
async def database(dsn: str | None, keep: bool) -> AsyncIterator[tuple[str, str]]:
    """Yield (database URL, description of the server)."""
    root: Path | None = None
    cluster: LocalCluster | None = None
    try:
        if dsn is None:
            root = Path(tempfile.mkdtemp(prefix="azolla-bench-pg-"))
            root.chmod(0o755)
            cluster = LocalCluster(root / "data", settings={"max_connections": "100"})
            server = await asyncio.to_thread(cluster.ensure_started)
            where = f"private LocalCluster in {root}"
        else:
            server = dsn
            where = "given --dsn"
        name = f"azolla_bench_{uuid.uuid4().hex[:8]}"
        url = await create_database(server, name)
        try:
            yield url, where
        finally:
            if not keep:
                conn = await asyncpg.connect(dsn_with_database(server, "postgres"))
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                finally:
                    await conn.close()
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop, "fast")
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


async def server_facts(url: str) -> dict[str, str]:
    """Version and durability settings of the server."""
    conn = await asyncpg.connect(url)
    try:
        facts = {"version": str(await conn.fetchval("SHOW server_version"))}
        for name in (
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "full_page_writes",
            "shared_buffers",
            "commit_delay",
        ):
            facts[name] = str(await conn.fetchval(f"SHOW {name}"))
        return facts
    finally:
        await conn.close()


def print_table(results: list[PhaseResult]) -> None:
    """Print the results as a Markdown table."""
    print(
        "| phase | producers | events/call | events | events/s | calls/s "
        "| p50 ms | p95 ms | p99 ms | max ms | batches | events/batch "
        "| Python CPU µs/event (%) | PG writer(s) CPU µs/event (%) | WAL B/event |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.phase} | {r.producers} | {r.events_per_call} | {r.events} "
            f"| {r.events_per_s:,.0f} | {r.calls_per_s:,.0f} | {r.p50_ms:.3f} | {r.p95_ms:.3f} "
            f"| {r.p99_ms:.3f} | {r.max_ms:.1f} | {r.batches} | {r.mean_batch_events:.1f} "
            f"| {r.python_cpu_us_per_event:.1f} ({r.python_cpu_pct:.0f}) "
            f"| {r.pg_writer_cpu_us_per_event:.1f} ({r.pg_writer_cpu_pct:.0f}) "
            f"| {r.wal_bytes_per_event:.0f} |"
        )


async def main_async(args: argparse.Namespace) -> int:
    """Run the phases and print the results."""
    day = int(time.time() // 86400)
    load_before = f"{os.getloadavg()[0]:.2f}"
    async with database(args.dsn, args.keep) as (url, where):
        facts = await server_facts(url)
        store = await PostgresEventStore.open(
            url,
            max_batch=args.max_batch,
            max_linger=args.max_linger,
            queue_limit=max(args.queue_limit, args.producers * args.batch_events * 2),
            cross_process_lock=not args.no_lock,
            notify=not args.no_notify,
            listen=False,
            pipeline_depth=args.pipeline_depth,
        )
        results: list[PhaseResult] = []
        try:
            await run_phase(store, url, "warmup", 8, 1, 4000, day)
            for _ in range(args.repeat):
                if args.single:
                    results.append(
                        await run_phase(store, url, "single", 1, 1, args.single, day, args.ids)
                    )
                if args.events:
                    results.append(
                        await run_phase(
                            store, url, "load", args.producers, 1, args.events, day, args.ids
                        )
                    )
                if args.events and args.batch_events > 1:
                    results.append(
                        await run_phase(
                            store,
                            url,
                            "batch",
                            args.producers,
                            args.batch_events,
                            args.events,
                            day,
                            args.ids,
                        )
                    )
        finally:
            await store.close()
    print(
        f"# EventStream benchmark - {platform.node()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, loop {args.loop}, server: {where}, "
        f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}"
    )
    print("# server: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print(
        f"# store: max_batch={args.max_batch} max_linger={args.max_linger} "
        f"cross_process_lock={not args.no_lock} notify={not args.no_notify} "
        f"pipeline_depth={args.pipeline_depth} "
        f"stream ids={args.ids} payload={len(PAYLOAD)} B"
    )
    print_table(results)
    if args.json:
        report = {
            "server": facts,
            "where": where,
            "args": vars(args),
            "results": [asdict(r) for r in results],
            "median_events_per_s": {
                phase: statistics.median(r.events_per_s for r in results if r.phase == phase)
                for phase in sorted({r.phase for r in results})
            },
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="use this server instead of a private cluster")
    parser.add_argument("--events", type=int, default=200_000, help="events per load phase")
    parser.add_argument("--producers", type=int, default=64, help="concurrent producers")
    parser.add_argument("--single", type=int, default=3000, help="sequential single appends")
    parser.add_argument("--batch-events", type=int, default=10, help="events per call (batch)")
    parser.add_argument("--max-batch", type=int, default=1000)
    parser.add_argument("--max-linger", type=float, default=0.0)
    parser.add_argument("--queue-limit", type=int, default=20_000)
    parser.add_argument("--no-lock", action="store_true", help="no cross-process advisory lock")
    parser.add_argument("--no-notify", action="store_true", help="no NOTIFY per batch")
    parser.add_argument("--pipeline-depth", type=int, default=1, help="batches in flight")
    parser.add_argument("--repeat", type=int, default=1, help="run the phases this many times")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--ids", choices=sorted(ID_FACTORIES), default="uuid7", help="stream id kind"
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(main_async(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
