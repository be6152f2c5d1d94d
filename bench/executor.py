"""Throughput and per-attempt overhead of the shepherd's executors, without any gRPC.

Drives :class:`~azolla.adapters.subprocess.PoolExecutor` and
:class:`~azolla.adapters.subprocess.ProcessExecutor` directly with no-op attempts (``noop`` from
``bench/tasks_noop.py``, which returns two floats), the way the shepherd runtime does: ``C``
coroutines each await ``execute`` in a loop until ``N`` attempts have run. Each configuration
runs on a fresh, warmed-up executor, ``--repeat`` times; the best and the median are printed.

Reported per configuration:

* ``attempts/s``: ``N`` / wall time;
* ``wall us/att``: wall time per attempt at that concurrency (1e6 / attempts/s);
* ``parent us``: CPU time (user + system) of this process per attempt: the shepherd side;
* ``workers us``: CPU time of the worker processes per attempt (pool: the workers; process:
  the fork server and the children it reaped), and for process mode ``of it fork server``:
  the fork server's own share (forking, reaping, its copy-on-write faults; the rest is spent
  in the children: start-up after ``fork()``, the task, exit);
* with ``--latency``: one attempt at a time, p50/p99 of ``execute`` in microseconds;
* ``cpu us/att``: the two together, all the CPU an attempt costs (on a shared host, compare
  this, not attempts/s);
* process mode, ``faults``: minor page faults per attempt of the fork server and of its
  children (copy-on-write copies, mostly; unlike CPU time they hardly depend on other load);
  and ``fork``: how the fork server forks (``libc``: without the Python-level at-fork hooks,
  ``os.fork``: with them; ``+warm``: its warm-up ran the worker's attempt path);
* at the end, the fork floor: CPU of a bare ``fork()`` + ``_exit(0)`` from a process that
  imported what the fork server imports (``--fork-floor N``), with ``os.fork()`` and with libc's
  ``fork()``, i.e. what no process-mode attempt can go below on this machine.

Usage::

    .venv/bin/python bench/executor.py                       # the defaults below
    .venv/bin/python bench/executor.py --attempts 20000 --concurrency 8,16,64 \\
        --pool-sizes 2,4,= --loops uvloop,asyncio --repeat 3 --json /tmp/executor.json

This is a benchmark, not a test: nothing asserts a speed. Quote figures with the machine line
it prints (CPU count, load average): on a shared 2-core machine they move with the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azolla.adapters.subprocess import PoolExecutor, ProcessExecutor  # noqa: E402
from azolla.domain.ports import ExecutionRequest  # noqa: E402

TASKS = "bench.tasks_noop"
TICK = os.sysconf("SC_CLK_TCK")
#: Pool mode: attempts queued in a busy worker's pipe (``--prefetch``).
PREFETCH = 1


@dataclass
class Result:
    """One measured configuration."""

    mode: str
    loop: str
    workers: int
    concurrency: int
    attempts: int
    runs: list[float]
    attempts_per_s: float
    median_attempts_per_s: float
    wall_us_per_attempt: float
    parent_cpu_us: float
    workers_cpu_us: float
    forkserver_cpu_us: float | None = None
    forkserver_faults: float | None = None
    child_faults: float | None = None
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    fork: str | None = None
    cpu_us_per_attempt_runs: list[float] | None = None


def proc_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds of ``pid`` (plus its reaped children when ``children``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def requests(count: int) -> list[ExecutionRequest]:
    return [
        ExecutionRequest(
            task_id=str(uuid.uuid4()), attempt=1, name="noop", args="[]", kwargs="{}", timeout=60
        )
        for _ in range(count)
    ]


Executor = PoolExecutor | ProcessExecutor


def make_executor(mode: str, workers: int) -> Executor:
    sys_path = [str(ROOT), *sys.path]
    if mode == "pool":
        return PoolExecutor([TASKS], size=workers, sys_path=sys_path, prefetch=PREFETCH)
    return ProcessExecutor([TASKS], sys_path=sys_path)


def proc_faults(pid: int) -> tuple[int, int]:
    """Minor page faults of ``pid`` and of its reaped children (copy-on-write faults, mostly)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0, 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[7]), int(fields[8])


class Run(NamedTuple):
    """One run of one configuration (CPU and faults per attempt)."""

    rate: float
    parent_us: float
    workers_us: float
    samples: list[float]
    forkserver_us: float
    forkserver_faults: float
    child_faults: float
    fork: str


def worker_cpu(executor: Executor) -> tuple[float, float]:
    """CPU seconds of the workers (process mode: fork server and children) and of the fork
    server alone (0 in pool mode)."""
    if isinstance(executor, PoolExecutor):
        return sum(proc_cpu(pid) for pid in executor.worker_pids), 0.0
    pid = executor.fork_server_pid
    if not pid:
        return 0.0, 0.0
    return proc_cpu(pid, children=True), proc_cpu(pid)


async def drive(executor: Executor, batch: list[ExecutionRequest], concurrency: int) -> int:
    pending = iter(batch)
    failures = 0

    async def runner() -> None:
        nonlocal failures
        for request in pending:
            outcome = await executor.execute(request)
            if not outcome.ok:
                failures += 1

    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return failures


async def measure_once(
    mode: str, workers: int, concurrency: int, attempts: int, latency: int
) -> Run:
    executor = make_executor(mode, workers)
    await executor.start()
    try:
        await drive(executor, requests(min(500, attempts)), concurrency)  # warm up
        batch = requests(attempts)
        fork_server = executor.fork_server_pid or 0
        cpu_parent, cpu_workers = self_cpu(), worker_cpu(executor)
        faults = proc_faults(fork_server)
        started = time.perf_counter()
        failures = await drive(executor, batch, concurrency)
        wall = time.perf_counter() - started
        parent = self_cpu() - cpu_parent
        after = worker_cpu(executor)
        workers_cpu = after[0] - cpu_workers[0]
        forkserver_cpu = after[1] - cpu_workers[1]
        faults_after = proc_faults(fork_server)
        if failures:
            raise RuntimeError(f"{failures} attempts failed")
        samples: list[float] = []
        for request in requests(latency):
            t0 = time.perf_counter()
            await executor.execute(request)
            samples.append((time.perf_counter() - t0) * 1e6)
        fork = executor.fork_method if isinstance(executor, ProcessExecutor) else ""
        return Run(
            attempts / wall,
            parent / attempts * 1e6,
            workers_cpu / attempts * 1e6,
            samples,
            forkserver_cpu / attempts * 1e6,
            (faults_after[0] - faults[0]) / attempts,
            (faults_after[1] - faults[1]) / attempts,
            fork,
        )
    finally:
        await executor.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_with(loop_name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(factory())
    return asyncio.run(factory())


def measure(
    mode: str,
    loop_name: str,
    workers: int,
    concurrency: int,
    attempts: int,
    repeat: int,
    latency: int,
) -> Result:
    runs: list[Run] = []
    for _ in range(repeat):
        runs.append(
            run_with(
                loop_name,
                lambda: measure_once(mode, workers, concurrency, attempts, latency),
            )
        )
    best = max(runs, key=lambda r: r.rate)
    samples = [s for r in runs for s in r.samples]
    return Result(
        mode=mode,
        loop=loop_name,
        workers=workers,
        concurrency=concurrency,
        attempts=attempts,
        runs=[round(r.rate) for r in runs],
        attempts_per_s=round(best.rate),
        median_attempts_per_s=round(statistics.median(r.rate for r in runs)),
        wall_us_per_attempt=round(1e6 / best.rate, 1),
        parent_cpu_us=round(best.parent_us, 1),
        workers_cpu_us=round(best.workers_us, 1),
        forkserver_cpu_us=round(best.forkserver_us, 1) if mode == "process" else None,
        forkserver_faults=round(best.forkserver_faults) if mode == "process" else None,
        child_faults=round(best.child_faults) if mode == "process" else None,
        latency_p50_us=round(percentile(samples, 50)) if samples else None,
        latency_p99_us=round(percentile(samples, 99)) if samples else None,
        fork=best.fork or None,
        cpu_us_per_attempt_runs=[round(r.parent_us + r.workers_us, 1) for r in runs],
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


_FORK_FLOOR = """
import gc, os, resource, sys
sys.path[:0] = [{root!r}, {src!r}]
import bench.tasks_noop
from azolla.adapters.subprocess import _child, _forkserver
gc.collect()
gc.freeze()
count = {count}

def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime

def floor(fork):
    before = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    for _ in range(count):
        pid = fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    parent = (cpu(resource.RUSAGE_SELF) - before[0]) / count * 1e6
    child = (cpu(resource.RUSAGE_CHILDREN) - before[1]) / count * 1e6
    return f"{{parent:.0f}} {{child:.0f}}"

import ctypes
libc_fork = ctypes.PyDLL(None).fork
rss = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS")][0]
print(floor(os.fork), floor(libc_fork), rss)
"""


def fork_floor(count: int) -> dict[str, float]:
    """CPU of ``fork()`` + ``_exit(0)`` from a process that imported what the fork server does.

    The floor under any process-mode attempt: the parent's share is the fork itself (copying
    page tables), the child's share is CPython's after-fork work (its at-fork hooks) and the
    exit (unmapping everything). Measured with ``os.fork()`` and with libc's ``fork()`` (no
    Python-level at-fork hooks, as the fork server forks when it can).
    """
    code = _FORK_FLOOR.format(root=str(ROOT), src=str(ROOT / "src"), count=count)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    return {
        "parent_us": float(out[0]),
        "child_us": float(out[1]),
        "libc_parent_us": float(out[2]),
        "libc_child_us": float(out[3]),
        "rss_kb": float(out[4]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=20000, help="attempts per pool run")
    parser.add_argument("--process-attempts", type=int, default=1000,
                        help="attempts per process-mode run (a fork each)")  # fmt: skip
    parser.add_argument("--concurrency", default="8,16,64")
    parser.add_argument(
        "--pool-sizes", default="2,4,=", help="pool sizes; '=' means as many as the concurrency"
    )
    parser.add_argument("--modes", default="pool,process")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="pool mode: attempts queued in a busy worker's pipe")
    parser.add_argument("--loops", default="uvloop,asyncio")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=int, default=200,
                        help="sequential attempts for latency percentiles (0: skip)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--fork-floor", type=int, default=300, metavar="N",
                        help="also time N bare fork()+_exit() of a fork-server-sized process "
                        "(0: skip)")  # fmt: skip
    options = parser.parse_args()
    global PREFETCH
    PREFETCH = options.prefetch

    concurrencies = [int(c) for c in options.concurrency.split(",")]
    before = machine()
    print(f"machine: {before}")
    header = (
        f"{'mode':8} {'loop':8} {'workers':>7} {'conc':>5} {'attempts':>8} "
        f"{'att/s best':>10} {'median':>8} {'wall us':>8} {'parent us':>9} {'workers us':>10} "
        f"{'of it fork server':>17} {'cpu us/att':>10} {'p50 us':>7} {'p99 us':>7} "
        f"{'faults: fs / child':>18} {'fork':>12}"
    )
    print(header)
    results: list[Result] = []
    for loop_name in options.loops.split(","):
        for mode in options.modes.split(","):
            sizes = options.pool_sizes.split(",") if mode == "pool" else ["0"]
            attempts = options.attempts if mode == "pool" else options.process_attempts
            for size in sizes:
                for concurrency in concurrencies:
                    workers = concurrency if size == "=" else int(size)
                    result = measure(
                        mode,
                        loop_name,
                        workers,
                        concurrency,
                        attempts,
                        options.repeat,
                        options.latency,
                    )
                    results.append(result)
                    faults = (
                        f"{result.forkserver_faults} / {result.child_faults}"
                        if mode == "process"
                        else "-"
                    )
                    print(
                        f"{mode:8} {loop_name:8} {workers or '-':>7} {concurrency:>5} "
                        f"{attempts:>8} {result.attempts_per_s:>10} "
                        f"{result.median_attempts_per_s:>8} {result.wall_us_per_attempt:>8} "
                        f"{result.parent_cpu_us:>9} {result.workers_cpu_us:>10} "
                        f"{result.forkserver_cpu_us or '-':>17} "
                        f"{round(result.parent_cpu_us + result.workers_cpu_us):>10} "
                        f"{result.latency_p50_us or '-':>7} {result.latency_p99_us or '-':>7} "
                        f"{faults:>18} {result.fork or '-':>12}",
                        flush=True,
                    )
    floor = fork_floor(options.fork_floor) if options.fork_floor else None
    if floor is not None:
        print(
            f"fork floor (fork + _exit of a {floor['rss_kb'] / 1024:.0f} MB process, "
            f"{options.fork_floor} times): os.fork(): parent {floor['parent_us']:.0f} us, "
            f"child {floor['child_us']:.0f} us per fork; libc fork(): parent "
            f"{floor['libc_parent_us']:.0f} us, child {floor['libc_child_us']:.0f} us"
        )
    after = machine()
    print(f"load average after: {after['load_average']}")
    if options.json:
        report = {
            "machine": before,
            "load_after": after["load_average"],
            "fork_floor": floor,
            "results": [asdict(r) for r in results],
        }
        options.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
