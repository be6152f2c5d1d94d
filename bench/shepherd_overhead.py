"""What a shepherd adds on top of running task code: executors, runtime, and the whole path.

Three measurements, each isolating one layer (no-op tasks throughout):

* ``executor``: :class:`ProcessExecutor` / :class:`PoolExecutor` called directly (no gRPC):
  sequential ``execute`` latency p50/p99, and attempts/s with ``--concurrency`` in flight.
* ``runtime``: :class:`ShepherdRuntime` against an in-memory orchestrator end and an executor
  that returns at once: the runtime's own cost per attempt (attempts/s on one core) and how it
  batches (results per stream message, acks sent).
* ``system``: ``azolla-server`` (memory store, so the database is out of the picture) and one
  ``azolla-shepherd`` process, driven by the Python client: submit -> result latency p50/p99
  one task at a time, and tasks/s for a burst; the shepherd's own counters (messages, batches,
  acks) are read from its log when it stops.

Usage::

    .venv/bin/python bench/shepherd_overhead.py                 # all three, both modes
    .venv/bin/python bench/shepherd_overhead.py --only runtime --json out.json

Numbers depend on the machine and on what else runs; quote them with ``machine`` from the
JSON output. This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import _infra  # noqa: E402

from azolla.adapters.grpc.pb import common_pb2 as cpb  # noqa: E402
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb  # noqa: E402
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest  # noqa: E402
from azolla.shepherd.connection import ConnectionLost  # noqa: E402
from azolla.shepherd.runtime import RuntimeConfig, ShepherdRuntime  # noqa: E402

TASKS = "bench.tasks_noop"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    if not ms:
        return {"n": 0}
    return {"p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


# -- executor ----------------------------------------------------------------------------------


async def bench_executor(mode: str, sequential: int, burst: int,
                         concurrency: int) -> dict[str, Any]:
    from azolla.adapters.subprocess import PoolExecutor, ProcessExecutor

    sys_path = [str(ROOT), *sys.path]
    executor: Any
    if mode == "pool":
        executor = PoolExecutor([TASKS], size=concurrency, sys_path=sys_path)
    else:
        executor = ProcessExecutor([TASKS], sys_path=sys_path)
    await executor.start()

    def request(_: int) -> ExecutionRequest:
        return ExecutionRequest(task_id=str(uuid.uuid4()), attempt=1, name="noop",
                                args="[]", kwargs="{}")

    try:
        for i in range(20):  # warm up
            await executor.execute(request(i))
        latencies = []
        for i in range(sequential):
            started = time.perf_counter()
            outcome = await executor.execute(request(i))
            latencies.append(time.perf_counter() - started)
            assert outcome.ok, outcome
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                outcome = await executor.execute(request(i))
                assert outcome.ok, outcome

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(burst)))
        elapsed = time.perf_counter() - started
    finally:
        await executor.close()
    return {"mode": mode, "sequential": summary_ms(latencies), "burst": burst,
            "concurrency": concurrency, "attempts_per_s": round(burst / elapsed, 1)}


# -- runtime -----------------------------------------------------------------------------------


class _NullExecutor:
    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        await asyncio.sleep(0)
        return ExecutionOutcome(request.task_id, request.attempt, True, "null")

    async def cancel(self, task_id: str, attempt: int) -> bool:
        return False

    async def close(self) -> None:
        return None


class _Link:
    """The orchestrator's end, in memory: pushes a new task for every result (full slots)."""

    def __init__(self, total: int, concurrency: int, batch: int) -> None:
        self.total = total
        self.concurrency = concurrency
        self.batch = batch
        self.incoming: asyncio.Queue[opb.ServerMsg | None] = asyncio.Queue()
        self.pushed = 0
        self.results = 0
        self.result_messages = 0
        self.done = asyncio.Event()

    def push(self, count: int) -> None:
        count = min(count, self.total - self.pushed)
        if count <= 0:
            return
        tasks = [cpb.Task(task_id=f"t{self.pushed + i}", name="noop", args="[]", kwargs="{}",
                          attempt_number=1) for i in range(count)]
        self.pushed += count
        for start in range(0, len(tasks), self.batch):
            self.incoming.put_nowait(opb.ServerMsg(tasks=opb.TaskBatch(
                tasks=tasks[start:start + self.batch])))

    async def send(self, message: opb.ClientMsg) -> None:
        kind = message.WhichOneof("kind")
        if kind == "hello":
            self.incoming.put_nowait(opb.ServerMsg(hello_ack=opb.HelloAck(
                heartbeat_interval_ms=2000)))
            self.push(self.concurrency)
        elif kind == "task_results":
            count = len(message.task_results.results)
            self.results += count
            self.result_messages += 1
            self.push(count)
            if self.results >= self.total:
                self.done.set()

    async def receive(self) -> opb.ServerMsg | None:
        message = await self.incoming.get()
        if message is None:
            raise ConnectionLost("closed")
        return message

    async def finish(self) -> None:
        self.incoming.put_nowait(None)

    async def close(self) -> None:
        self.incoming.put_nowait(None)


class _Connector:
    description = "memory"

    def __init__(self, link: _Link) -> None:
        self.link = link

    async def open(self) -> _Link:
        return self.link


async def bench_runtime(total: int, concurrency: int, batch: int,
                        executor_kind: str = "null", prefetch: int = 1) -> dict[str, Any]:
    """The runtime against an in-memory orchestrator end (no gRPC).

    ``executor_kind`` ``null`` returns at once (the runtime's own cost); ``pool`` runs the
    no-op task on a :class:`PoolExecutor` of ``concurrency`` workers (offering
    ``concurrency * (1 + prefetch)`` slots, as ``azolla-shepherd --mode pool`` does): the
    shepherd's CPU per attempt without the stream, and its workers' (``workers_cpu_us``).
    """
    executor: Any = _NullExecutor()
    slots = concurrency
    if executor_kind == "pool":
        from azolla.adapters.subprocess import PoolExecutor

        # Without prefetch the argument is left out, so older trees can be measured too.
        extra: dict[str, Any] = {"prefetch": prefetch} if prefetch else {}
        executor = PoolExecutor([TASKS], size=concurrency, sys_path=[str(ROOT), *sys.path],
                                **extra)
        await executor.start()
        slots = concurrency * (1 + prefetch)
    link = _Link(total, slots, batch)
    runtime = ShepherdRuntime(executor, _Connector(link),
                              RuntimeConfig(concurrency=slots, drain_timeout=5))
    workers = _worker_cpu(executor)
    started = time.perf_counter()
    cpu = time.process_time()
    await runtime.start()
    await asyncio.wait_for(link.done.wait(), 300)
    elapsed = time.perf_counter() - started
    cpu_used = time.process_time() - cpu
    workers = _worker_cpu(executor) - workers
    stats = dict(runtime.stats)
    await runtime.stop(0)
    out = {"executor": executor_kind, "attempts": total, "concurrency": concurrency,
           "slots": slots, "push_batch": batch, "attempts_per_s": round(total / elapsed, 1),
           "cpu_us_per_attempt": round(cpu_used / total * 1e6, 1),
           "results_per_message": round(link.results / max(link.result_messages, 1), 1),
           "acks_sent": stats["acks_sent"]}
    if executor_kind == "pool":
        out["workers_cpu_us"] = round(workers / total * 1e6, 1)
    return out


def _worker_cpu(executor: Any) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in getattr(executor, "worker_pids", []):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            total += sum(int(x) for x in fh.read().rsplit(")", 1)[1].split()[11:13])
    return total / hz


# -- system ------------------------------------------------------------------------------------


def _switches(root: int) -> dict[str, int]:
    """Context switches (voluntary + involuntary) of ``root``'s threads and of its descendants.

    On a VM every sleep and wake-up of a process costs tens of microseconds of CPU, so these
    counts explain much of the CPU per task: ``shepherd_main`` is the event-loop thread,
    ``shepherd_threads`` the others (gRPC's poller), ``workers`` the fork server and workers.
    """
    def of(pid: int, task: str = "") -> int:
        path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
        total = 0
        with contextlib.suppress(OSError), open(path) as fh:
            for line in fh:
                if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                    total += int(line.split()[1])
        return total

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), \
                    open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
    descendants, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        descendants.extend(kids)
        todo.extend(kids)
    def cpu(pid: int) -> int:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            return sum(int(x) for x in fh.read().rsplit(")", 1)[1].split()[11:15])
        return 0

    threads = [t for t in os.listdir(f"/proc/{root}/task") if t != str(root)]
    return {"shepherd_main": of(root, str(root)),
            "shepherd_threads": sum(of(root, t) for t in threads),
            "workers": sum(of(p) for p in descendants),
            "cpu_ticks_shepherd": cpu(root),
            "cpu_ticks_workers": sum(cpu(p) for p in descendants)}


def _counters(log: str) -> dict[str, int]:
    lines = [line for line in log.splitlines() if "counters:" in line]
    if not lines:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("counters:")[1])}


async def bench_system(mode: str, sequential: int, burst: int, concurrency: int,
                       log_dir: Path) -> dict[str, Any]:
    from azolla import Client

    port = _infra.free_port()
    server = _infra.Proc("azolla-server", [
        str(_infra.VENV_BIN / "azolla-server"), "--store", "memory", "--port", str(port),
        "--log-format", "json", "--log-level", "warning"], log_dir / f"server-{mode}.log")
    endpoint = f"http://127.0.0.1:{port}"
    shepherd: _infra.Proc | None = None
    try:
        await _infra.wait_serving(endpoint, server)
        shepherd = _infra.Proc("azolla-shepherd", [
            *_infra.shepherd_argv(endpoint, mode, concurrency, "default",
                                  _infra.POOL_BENCH_OPTIONS if mode == "pool" else ()),
            "--log-level", "info"], log_dir / f"shepherd-{mode}.log")
        await _infra.wait_shepherds(endpoint, "default", 1, [shepherd])
        async with Client.connect(endpoint) as client:
            for _ in range(20):  # warm up
                await (await client.submit_task("noop").submit()).wait()
            latencies = []
            for _ in range(sequential):
                started = time.perf_counter()
                result = await (await client.submit_task("noop").submit()).wait()
                latencies.append(time.perf_counter() - started)
                assert result.success, result.error
            cpu0 = _infra.tree_cpu_s(shepherd.pid)
            switches0 = _switches(shepherd.pid)
            started = time.perf_counter()
            handles = await client.submit_many("noop", [[] for _ in range(burst)])
            results = await client.wait_many(handles)
            elapsed = time.perf_counter() - started
            shepherd_cpu = _infra.tree_cpu_s(shepherd.pid) - cpu0
            switches = {k: (v - switches0.get(k, 0)) / burst
                        for k, v in _switches(shepherd.pid).items()}
            hz = os.sysconf("SC_CLK_TCK")
            cpu_split = {k[10:]: round(switches.pop(k) / hz * 1e6, 1)
                         for k in ("cpu_ticks_shepherd", "cpu_ticks_workers")}
            switches = {k: round(v, 2) for k, v in switches.items()}
            assert all(r.success for r in results)
        shepherd.stop()
        counters = _counters(shepherd.log_path.read_text(errors="replace"))
        shepherd = None
    finally:
        if shepherd is not None:
            shepherd.stop()
        server.stop()
    messages = counters.get("result_messages", 0)
    return {"mode": mode, "concurrency": concurrency,
            "submit_to_result": summary_ms(latencies), "burst": burst,
            "tasks_per_s": round(burst / elapsed, 1),
            # The shepherd, its fork server and pool workers (process mode: reaped children too).
            "shepherd_cpu_us_per_task": round(shepherd_cpu / burst * 1e6, 1),
            "context_switches_per_task": switches,
            "cpu_us_per_task_split": cpu_split,
            "results_per_message": round(counters.get("results_sent", 0) / messages, 1)
            if messages else None,
            "acks_sent": counters.get("acks_sent"), "counters": counters}


# -- main --------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": _infra.machine_info(), "settings": vars(args)}
    modes = args.modes.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="azolla-bench-shepherd-"))
    if args.only in (None, "executor"):
        out["executor"] = [await bench_executor(m, args.sequential, args.burst,
                                                args.concurrency) for m in modes]
        print(json.dumps(out["executor"], indent=1), flush=True)
    if args.only in (None, "runtime"):
        out["runtime"] = [await bench_runtime(args.burst * 5, args.concurrency, b,
                                              args.runtime_executor, args.prefetch)
                          for b in (1, 64)]
        print(json.dumps(out["runtime"], indent=1), flush=True)
    if args.only in (None, "system"):
        out["system"] = [await bench_system(m, args.sequential, args.burst, args.concurrency,
                                            log_dir) for m in modes for _ in range(args.repeat)]
        print(json.dumps(out["system"], indent=1), flush=True)
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("executor", "runtime", "system"))
    parser.add_argument("--sequential", type=int, default=200,
                        help="one-at-a-time attempts for latency")
    parser.add_argument("--burst", type=int, default=2000, help="attempts for throughput")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", default="process,pool", help="comma separated")
    parser.add_argument("--runtime-executor", choices=("null", "pool"), default="null",
                        help="runtime measurement: an executor that returns at once, or a pool")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="pool: attempts queued in a busy worker's pipe (runtime measurement)")
    parser.add_argument("--repeat", type=int, default=1, help="system runs per mode")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    try:
        result = asyncio.run(main(args))
    finally:
        _infra.kill_all()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    with contextlib.suppress(Exception):
        os.sync()


if __name__ == "__main__":
    cli()
