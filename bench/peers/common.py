"""Shared harness for the side-by-side task-queue benchmarks (our own code).

A library script defines a small adapter class (see bench_pgqueuer.py, bench_azolla.py) and
calls ``main(Adapter)``.  The harness then runs, against the PostgreSQL server named by
``$PEERBENCH_PG`` (default ``postgresql://postgres@127.0.0.1:55433``):

  1. single enqueue : S jobs (default 2000), one awaited call each, no worker;
                      rate and per-call latency percentiles.
  2. batch enqueue  : N jobs (default 20000) through the library's batch API,
                      in chunks of B (default 1000), no worker; then ANALYZE
                      (unless --no-analyze) while the N jobs are queued.
  3. concurrent     : N single enqueues from K coroutines of one producer process
                      (``--concurrent K``, 0 = skip), no worker: the library's
                      throughput for many concurrent callers.
  4. per worker config "PxC" (P worker processes, concurrency C each):
     a. end-to-end  : workers started and idle, then N jobs are batch-enqueued;
                      time from the first enqueue call to the last job
                      completed (completion timestamp read back from the DB).
     b. e2e single  : (``--e2e-single M``) like a., but M jobs arrive as single
                      enqueues from the --concurrent coroutines;
     c. paced       : fresh workers, single enqueues paced at R jobs/s for D s
                      (R = ``--rate``, or ``--rate-frac`` x the smallest of the
                      config's e2e throughputs (batch and single enqueues) and
                      the concurrent single-enqueue rate);
                      each send is its own coroutine, started on an
                      absolute schedule, so the offered rate does not depend on
                      the enqueue latency; enqueue-to-start latency = handler
                      start - wall clock just before the enqueue call (carried in
                      the payload).

Workers always run as subprocesses of this script (``--worker``), so producer,
workers and Postgres are separate processes sharing the same cores.
Every phase is bounded by a timeout; tables are truncated between phases.

Optional adapter hooks (besides the surface in README.md):
  ``aux_pids() -> dict[str, int]``   processes whose CPU is reported per phase
                                     (e.g. Azolla's orchestrator);
  ``latency_pairs() -> list[(enqueued_at, started_at)]``
                                     start times read back by the adapter (used
                                     instead of the worker files when defined);
  ``async wait_workers_ready(procs)`` extra readiness wait after the workers said ready;
  ``async paced_details() -> dict``  extra figures of the paced phase (e.g. per-stage latency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
PG_BASE = os.environ.get("PEERBENCH_PG", "postgresql://postgres@127.0.0.1:55433").rstrip("/")
ADMIN_DSN = f"{PG_BASE}/postgres"
PHASE_TIMEOUT = float(os.environ.get("PEERBENCH_PHASE_TIMEOUT", "120"))  # cap (s) per phase
MAX_IN_FLIGHT = 1000  # paced sends outstanding at once (more = the producer is saturated)


def dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def dsn_for(db: str) -> str:
    return f"{PG_BASE}/{db}"


# ----------------------------------------------------------------- utilities
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def percentiles(values: list[float]) -> dict:
    return {f"p{p}": pct(values, p) for p in (50, 95, 99)} | {"max": max(values, default=None)}


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of one process (user + system)."""
    parts = _stat(pid)
    if parts is None:
        return float("nan")
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process and all its live descendants, plus their reaped children.

    Each live process counts utime+stime+cutime+cstime: a child's time moves into its parent's
    cutime when it is reaped, so nothing is counted twice and short-lived children are kept.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        parts = _stat(int(entry))
        if parts is None:
            continue
        stats[int(entry)] = parts
        children.setdefault(int(parts[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        parts = stats.get(pid)
        if parts is None:
            continue
        total += sum(int(x) for x in parts[11:15])
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _run_sync(coro):
    return asyncio.run(coro)


async def _admin(query: str, *args, dsn: str = ADMIN_DSN):
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def pg_server_version() -> str:
    return _run_sync(_admin("SHOW server_version"))[0][0]


def pg_settings() -> dict:
    names = ["synchronous_commit", "fsync", "full_page_writes", "shared_buffers",
             "wal_buffers", "max_wal_size", "max_connections"]

    async def go():
        return {n: (await _admin(f"SHOW {n}"))[0][0] for n in names}

    return _run_sync(go())


def pg_postmaster_pid() -> int | None:
    """The postmaster's PID when the server runs on this machine (for CPU accounting)."""
    if urlsplit(ADMIN_DSN).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None

    async def go():
        import asyncpg

        conn = await asyncpg.connect(ADMIN_DSN)
        try:  # read the backend's parent while the backend still exists
            parts = _stat(int(await conn.fetchval("SELECT pg_backend_pid()")))
        finally:
            await conn.close()
        return int(parts[1]) if parts else None

    return _run_sync(go())


def ensure_database(db: str) -> None:
    async def go():
        rows = await _admin("SELECT 1 FROM pg_database WHERE datname=$1", db)
        if not rows:
            await _admin(f'CREATE DATABASE "{db}"')

    _run_sync(go())


# ------------------------------------------------------------ worker processes
class Workers:
    """P worker subprocesses of the calling script; stopped by PID only."""

    def __init__(self, script: str, procs: int, conc: int, tag: str, outdir: Path):
        self.files, self.procs = [], []
        try:
            for i in range(procs):
                out = outdir / f"{tag}-w{i}.json"
                ready = outdir / f"{tag}-w{i}.ready"
                for f in (out, ready):
                    f.unlink(missing_ok=True)
                cmd = [sys.executable, script, "--worker", "--concurrency", str(conc),
                       "--out", str(out), "--ready", str(ready)]
                self.procs.append(subprocess.Popen(cmd))
                self.files.append((out, ready))
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not all(r.exists() for _, r in self.files):
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("worker failed to start")
            time.sleep(0.05)
        time.sleep(1.0)  # let each worker reach its LISTEN / first poll

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_s(self) -> float:
        return sum(tree_cpu_s(p.pid) for p in self.procs)

    def stop(self, timeout: float = 20.0) -> list[list[float]]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"worker {p.pid} ignored SIGTERM, killing it", file=sys.stderr)
                p.kill()
                p.wait(5)
        pairs = []
        for out, ready in self.files:
            if out.exists():
                pairs += json.loads(out.read_text())
            ready.unlink(missing_ok=True)
        return pairs


def worker_entry(adapter, conc: int, out: str, ready: str) -> None:
    """Runs inside a worker subprocess: record (enqueued_at, started_at) pairs."""
    started: list[tuple[float, float]] = []

    def on_start(enqueued_at: float | None) -> None:
        if enqueued_at is not None:
            started.append((enqueued_at, time.time()))

    try:
        asyncio.run(adapter.run_worker(conc, on_start, lambda: Path(ready).touch()))
    finally:
        Path(out).write_text(json.dumps(started))


class CpuMeter:
    """CPU seconds of the host, the producer, the workers, Postgres and the adapter's aux pids."""

    def __init__(self, adapter, workers: Workers | None, pg_pid: int | None):
        self.adapter, self.workers, self.pg_pid = adapter, workers, pg_pid

    def sample(self) -> dict:
        aux = getattr(self.adapter, "aux_pids", lambda: {})()
        return {"host": cpu_jiffies(), "self": self_cpu_s(),
                "workers": self.workers.cpu_s() if self.workers else 0.0,
                "pg": tree_cpu_s(self.pg_pid) if self.pg_pid else float("nan"),
                "aux": {k: tree_cpu_s(v) for k, v in aux.items()}}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        hz = os.sysconf("SC_CLK_TCK")
        busy = (b["host"][0] - a["host"][0]) / max(1, b["host"][1] - a["host"][1])
        out = {"host_cpu_busy_pct": round(100 * busy, 1),
               "host_cpu_busy_s": round((b["host"][0] - a["host"][0]) / hz, 2),
               "worker_cpu_s": round(b["workers"] - a["workers"], 2),
               "producer_cpu_s": round(b["self"] - a["self"], 2),
               "postgres_cpu_s": round(b["pg"] - a["pg"], 2)}
        for k in b["aux"]:
            out[f"{k}_cpu_s"] = round(b["aux"][k] - a["aux"].get(k, 0.0), 2)
        return out


# ------------------------------------------------------------------- phases
async def wait_done(adapter, workers: Workers, t0: float) -> dict:
    """Poll every 100 ms until no job is left; end time read back from the DB."""
    deadline = t0 + PHASE_TIMEOUT
    while True:
        left = await adapter.remaining()
        if left == 0 or time.time() > deadline or not workers.alive():
            break
        await asyncio.sleep(0.1)
    seen_at = time.time()
    done, failed, last = await adapter.completion()
    end = last if last is not None else seen_at
    return {"completed": done, "failed": failed, "left": left, "timed_out": left != 0,
            "e2e_s": end - t0, "e2e_poll_s": seen_at - t0,
            "throughput_jobs_s": done / (end - t0) if done else 0.0}


async def phase_single(adapter, s: int, pg_pid: int | None = None) -> dict:
    await adapter.clean()
    lat = []
    meter = CpuMeter(adapter, None, pg_pid)
    c0 = meter.sample()
    t0 = time.perf_counter()
    for _ in range(s):
        t = time.perf_counter()
        await adapter.enqueue_one(None)
        lat.append((time.perf_counter() - t) * 1000)
    dt = time.perf_counter() - t0
    cpu = CpuMeter.delta(c0, meter.sample())
    await adapter.clean()
    # CPU per call of each process (producer, Postgres, aux such as Azolla's server), in ms
    per_call = {k.removesuffix("_cpu_s"): round(v * 1000 / s, 3) for k, v in cpu.items()
                if k.endswith("_cpu_s") and k != "worker_cpu_s" and v == v}
    return {"jobs": s, "seconds": dt, "jobs_s": s / dt, "lat_ms": percentiles(lat),
            "cpu_ms_per_call": per_call}


async def enqueue_batches(adapter, n: int, b: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, n, b):
        await adapter.enqueue_batch(min(b, n - i))
    return time.perf_counter() - t0


async def analyze(dsn: str) -> None:
    await _admin("ANALYZE", dsn=dsn)


async def phase_batch(adapter, n: int, b: int, do_analyze: bool) -> dict:
    await adapter.clean()
    dt = await enqueue_batches(adapter, n, b)
    if do_analyze:
        # Column statistics survive TRUNCATE, so every later phase plans its queries
        # as on a long-lived, analyzed queue table instead of a never-analyzed one.
        await analyze(adapter.dsn)
    await adapter.clean()
    return {"jobs": n, "batch": b, "seconds": dt, "jobs_s": n / dt}


async def phase_concurrent(adapter, n: int, conc: int) -> dict:
    """``n`` single enqueues from ``conc`` coroutines (no worker)."""
    await adapter.clean()
    lat: list[float] = []
    counter = iter(range(n))

    async def producer() -> None:
        for _ in counter:
            t = time.perf_counter()
            await adapter.enqueue_one(None)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(producer() for _ in range(conc))), PHASE_TIMEOUT)
    dt = time.perf_counter() - t0
    await adapter.clean()
    return {"jobs": n, "coroutines": conc, "seconds": dt, "jobs_s": n / dt,
            "lat_ms": percentiles(lat)}


async def phase_e2e(adapter, script, procs, conc, n, b, outdir, pg_pid) -> dict:
    await adapter.clean()
    w = Workers(script, procs, conc, "e2e", outdir)
    try:
        w.wait_ready()
        if hasattr(adapter, "wait_workers_ready"):
            await adapter.wait_workers_ready(procs)
        meter = CpuMeter(adapter, w, pg_pid)
        c0 = meter.sample()
        t0 = time.time()
        enq_s = await enqueue_batches(adapter, n, b)
        res = await wait_done(adapter, w, t0)
        c1 = meter.sample()
    finally:
        w.stop()
    wall = time.time() - t0
    res.update(enqueue_s=enq_s, wall_s=round(wall, 2), **CpuMeter.delta(c0, c1))
    await adapter.clean()
    return res


async def phase_e2e_single(adapter, script, procs, conc, n, coroutines, outdir, pg_pid) -> dict:
    """Like phase_e2e, but the jobs arrive as single enqueues from ``coroutines`` callers."""
    await adapter.clean()
    w = Workers(script, procs, conc, "e2e1", outdir)
    counter = iter(range(n))

    async def producer() -> None:
        for _ in counter:
            await adapter.enqueue_one(None)

    try:
        w.wait_ready()
        if hasattr(adapter, "wait_workers_ready"):
            await adapter.wait_workers_ready(procs)
        meter = CpuMeter(adapter, w, pg_pid)
        c0 = meter.sample()
        t0 = time.time()
        await asyncio.wait_for(asyncio.gather(*(producer() for _ in range(coroutines))),
                               PHASE_TIMEOUT)
        enq_s = time.time() - t0
        res = await wait_done(adapter, w, t0)
        c1 = meter.sample()
    finally:
        w.stop()
    res.update(enqueue_s=enq_s, coroutines=coroutines, **CpuMeter.delta(c0, c1))
    await adapter.clean()
    return res


async def phase_paced(adapter, script, procs, conc, rate, dur, outdir, pg_pid) -> dict:
    await adapter.clean()
    w = Workers(script, procs, conc, "paced", outdir)
    total = max(1, int(rate * dur))
    behind = 0
    errors: list[str] = []
    pending: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def send() -> None:
        try:
            await adapter.enqueue_one(time.time())
        except Exception as e:  # recorded, the phase goes on
            errors.append(repr(e))
        finally:
            slots.release()

    try:
        w.wait_ready()
        if hasattr(adapter, "wait_workers_ready"):
            await adapter.wait_workers_ready(procs)
        meter = CpuMeter(adapter, w, pg_pid)
        c0 = meter.sample()
        t0 = time.time()
        for i in range(total):
            target = t0 + i / rate
            now = time.time()
            if now < target:
                await asyncio.sleep(target - now)
            elif now - target > 0.01:
                behind += 1
            await asyncio.wait_for(slots.acquire(), PHASE_TIMEOUT)
            task = asyncio.create_task(send())
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), PHASE_TIMEOUT)
        sent_s = time.time() - t0
        res = await wait_done(adapter, w, t0)
        c1 = meter.sample()
    finally:
        for task in pending:
            task.cancel()
        pairs = w.stop()
    if hasattr(adapter, "latency_pairs"):
        pairs = await adapter.latency_pairs()
    details = await adapter.paced_details() if hasattr(adapter, "paced_details") else None
    lat = [(s - e) * 1000 for e, s in pairs]
    res.update(rate=round(rate, 1), sent=total, send_s=round(sent_s, 3),
               achieved_rate=round(total / sent_s, 1), late_sends=behind,
               send_errors=len(errors), first_error=errors[0] if errors else None,
               latencies=len(lat), lat_ms=percentiles(lat), **CpuMeter.delta(c0, c1))
    if details:
        res["details"] = details
    await adapter.clean()
    return res


# --------------------------------------------------------------------- main
def main(adapter_cls) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="jobs for batch enqueue / end-to-end")
    ap.add_argument("--single", type=int, default=2000, help="jobs for single-enqueue rate")
    ap.add_argument("--batch", type=int, default=1000, help="jobs per batch-enqueue call")
    ap.add_argument("--concurrent", type=int, default=0,
                    help="coroutines for the concurrent single-enqueue phase (0 = skip)")
    ap.add_argument("--configs", default=None, help="worker configs PxC, comma separated")
    ap.add_argument("--rate", type=float, default=500.0, help="paced load, jobs/s")
    ap.add_argument("--rate-frac", type=float, default=0.0,
                    help="paced load as this fraction of the smallest of the config's e2e "
                         "throughputs and the concurrent single-enqueue rate (overrides "
                         "--rate when the e2e phase ran)")
    ap.add_argument("--max-rate", type=float, default=20000.0, help="cap of the paced rate")
    ap.add_argument("--duration", type=float, default=10.0, help="paced load, seconds")
    ap.add_argument("--e2e-single", type=int, default=0, metavar="N",
                    help="also run N jobs end to end as single enqueues from --concurrent "
                         "coroutines (0 = skip)")
    ap.add_argument("--skip-enqueue", action="store_true",
                    help="skip the single/batch/concurrent enqueue phases")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-paced", action="store_true")
    ap.add_argument("--no-analyze", action="store_true",
                    help="skip the ANALYZE after the batch phase (cold planner statistics)")
    ap.add_argument("--label", default="", help="free text stored with the result")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--json-out", default=None, help="write the result to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    a = ap.parse_args()

    adapter = adapter_cls(dsn_for(adapter_cls.DB))
    if a.worker:
        worker_entry(adapter, a.concurrency, a.out, a.ready)
        return

    ensure_database(adapter_cls.DB)
    outdir = Path(a.results)
    tmp = Path("/tmp/peerbench/run") / adapter_cls.NAME
    outdir.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    configs = [c for c in (a.configs or adapter_cls.DEFAULT_CONFIGS).split(",") if c]
    script = sys.argv[0]
    pg_pid = pg_postmaster_pid()
    result = {"library": adapter_cls.NAME, "version": adapter_cls.version(),
              "label": a.label, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "postgres": pg_server_version(), "pg_settings": pg_settings(),
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "n": a.n, "single_n": a.single, "batch": a.batch, "concurrent": a.concurrent,
              "e2e_single_n": a.e2e_single,
              "rate": a.rate, "rate_frac": a.rate_frac, "duration": a.duration,
              "analyzed_after_batch": not a.no_analyze, "configs": {}}
    name = adapter_cls.NAME

    async def run() -> None:
        await adapter.setup()
        if hasattr(adapter, "info"):
            result["adapter_info"] = adapter.info()
        try:
            if not a.skip_enqueue:
                print(f"[{name}] single enqueue x{a.single}", flush=True)
                r = result["enqueue_single"] = await phase_single(adapter, a.single, pg_pid)
                print(f"  -> {r['jobs_s']:.0f} jobs/s, p50 {r['lat_ms']['p50']:.2f} ms", flush=True)
                print(f"[{name}] batch enqueue x{a.n} (batch {a.batch})", flush=True)
                result["enqueue_batch"] = await phase_batch(adapter, a.n, a.batch, not a.no_analyze)
                print(f"  -> {result['enqueue_batch']['jobs_s']:.0f} jobs/s", flush=True)
                if a.concurrent:
                    print(f"[{name}] concurrent enqueue x{a.n} ({a.concurrent} coroutines)",
                          flush=True)
                    try:
                        r = result["enqueue_concurrent"] = await phase_concurrent(
                            adapter, a.n, a.concurrent)
                        print(f"  -> {r['jobs_s']:.0f} jobs/s", flush=True)
                    except Exception as e:
                        result["enqueue_concurrent"] = {"error": repr(e)}
                        print(f"  !! {e!r}", flush=True)
            for cfg in configs:
                procs, conc = (int(x) for x in cfg.lower().split("x"))
                r = result["configs"][cfg] = {"procs": procs, "concurrency": conc,
                                              "worker_settings": adapter.worker_settings(conc)}
                rate = a.rate
                caps: dict[str, float] = {}  # measured capacities this config's pacing uses
                single = dig(result, "enqueue_concurrent", "jobs_s")
                if single:
                    caps["concurrent enqueue"] = single
                if not a.skip_e2e:
                    print(f"[{name}] {cfg}: end-to-end x{a.n}", flush=True)
                    try:
                        r["e2e"] = await phase_e2e(adapter, script, procs, conc, a.n, a.batch,
                                                   tmp, pg_pid)
                        e = r["e2e"]
                        print(f"  -> {e['throughput_jobs_s']:.0f} jobs/s ({e['e2e_s']:.2f}s, "
                              f"cpu {e['host_cpu_busy_pct']}%)", flush=True)
                        if e["completed"]:
                            caps["e2e"] = e["throughput_jobs_s"]
                    except Exception as e:  # record and go on
                        r["e2e"] = {"error": repr(e)}
                        print(f"  !! {e!r}", flush=True)
                if a.e2e_single and not a.skip_e2e:
                    coroutines = a.concurrent or 64
                    print(f"[{name}] {cfg}: end-to-end x{a.e2e_single} as single enqueues "
                          f"({coroutines} coroutines)", flush=True)
                    try:
                        r["e2e_single"] = e1 = await phase_e2e_single(
                            adapter, script, procs, conc, a.e2e_single, coroutines, tmp, pg_pid)
                        print(f"  -> {e1['throughput_jobs_s']:.0f} jobs/s "
                              f"(cpu {e1['host_cpu_busy_pct']}%)", flush=True)
                        if e1["completed"]:
                            caps["e2e single"] = e1["throughput_jobs_s"]
                    except Exception as e:
                        r["e2e_single"] = {"error": repr(e)}
                        print(f"  !! {e!r}", flush=True)
                if a.rate_frac and "e2e" in caps:
                    # A fraction of the most this config sustains for the paced workload
                    # (single submits executed end to end): the smallest measured capacity.
                    r["paced_bound"] = min(caps, key=lambda k: caps[k])
                    rate = min(a.max_rate, a.rate_frac * caps[r["paced_bound"]])
                if a.skip_paced:
                    continue
                print(f"[{name}] {cfg}: paced {rate:.0f}/s for {a.duration}s", flush=True)
                try:
                    r["paced"] = await phase_paced(adapter, script, procs, conc, rate,
                                                   a.duration, tmp, pg_pid)
                    print(f"  -> latency ms {r['paced']['lat_ms']} "
                          f"(achieved {r['paced']['achieved_rate']}/s)", flush=True)
                except Exception as e:
                    r["paced"] = {"error": repr(e)}
                    print(f"  !! {e!r}", flush=True)
        finally:
            await adapter.close()

    asyncio.run(run())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"-{a.label}" if a.label else ""
    path = Path(a.json_out) if a.json_out else outdir / f"{name}{label}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
