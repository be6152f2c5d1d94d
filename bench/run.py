"""System benchmarks: Azolla against PgQueuer and Procrastinate, side by side, in one run.

One command::

    .venv/bin/python bench/run.py --quick      # about 3-5 minutes
    .venv/bin/python bench/run.py              # the full run: 3 repeats, every worker config,
                                               # about an hour (add --wait-idle 300 on a
                                               # shared host)

It starts a private PostgreSQL cluster (fsync and synchronous_commit on, the peers' settings),
then measures, in this order:

1. baseline: a no-op grpc.aio unary round trip and bidi stream message pair, and a one-row
   durable commit (bench/baseline.py);
2. per repeat, interleaved: Azolla (pool mode, then process mode), PgQueuer, Procrastinate
   through the same harness (bench/peers/common.py): sequential single submits (latency
   percentiles and CPU per call), batch submits, concurrent single submits, and per worker
   config: end-to-end throughput of N no-op tasks (batch submits), the same with single
   submits from many callers, and submit-to-start latency paced at 50 % of the smallest of
   those capacities. Azolla runs as ``azolla-server`` plus ``azolla-shepherd`` subprocesses;
3. Azolla only: single submits from several client processes at once, 256 submit-then-wait
   loops through the plain API (the best pool config's shepherds), py-spy profiles of the
   orchestrator and a shepherd at peak load, orchestrator kill -9 + restart with 10k unfinished
   tasks, shepherd kill -9 with attempts running.

It prints one table (Azolla, each peer, the ratio, the target) and writes the raw results
under ``bench/results/raw/<stamp>/``. With ``--docs`` (default for the full run) it also
rewrites the "System benchmarks vs peers" section of docs/benchmarks.md, the plot under
docs/img/, the profiles under bench/profiles/ and bench/results/system_vs_peers.json.
Every process it starts is killed when it ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _infra, baseline, report, system  # noqa: E402

PEERS_DIR = ROOT / "bench" / "peers"
PEER_VENV = Path("/tmp/peerbench/venv")
PEER_PACKAGES = ["pgqueuer==1.6.0", "procrastinate==3.10.0", "psycopg[binary,pool]", "asyncpg"]

PROFILES = {
    "quick": {
        "repeats": 1, "n": 5000, "single": 1000, "concurrent": 128, "duration": 5.0,
        "configs": {"azolla-pool": "1x32", "azolla-process": "1x8", "pgqueuer": "1x50",
                    "procrastinate": "2x10"},
        "process_n": 500, "baseline_seconds": 1.5, "submitters": (2, 64, 2500),
        "waitloops": (256, 5000),
        "profile_seconds": 8.0, "recovery_unfinished": 10_000, "harness_timeout": 420,
    },
    "full": {
        "repeats": 3, "n": 20000, "single": 2000, "concurrent": 256, "duration": 10.0,
        "configs": {"azolla-pool": "1x16,1x32,1x64,2x16", "azolla-process": "1x8,1x16",
                    "pgqueuer": "1x10,2x10,1x50,1x0", "procrastinate": "1x10,2x10,1x50"},
        "process_n": 2000, "baseline_seconds": 3.0, "submitters": (4, 64, 5000),
        "waitloops": (256, 20000),
        "profile_seconds": 20.0, "recovery_unfinished": 10_000, "harness_timeout": 1500,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def host_busy(seconds: float = 2.0) -> float:
    """Host CPU busy % over ``seconds`` (all cores)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    a = sample()
    time.sleep(seconds)
    b = sample()
    return round(100 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)


class ForeignLoad:
    """CPU used on this host by processes that are not part of the benchmark (shared host).

    Own processes: this process's tree (harness scripts, workers, shepherds, servers) and
    the PostgreSQL cluster's tree; everything else the host spent is "foreign".
    """

    def __init__(self) -> None:
        self.pg_pid: int | None = None
        self.hz = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / self.hz
        own = _infra.tree_cpu_s(os.getpid())
        if self.pg_pid:
            own += _infra.tree_cpu_s(self.pg_pid)
        return time.time(), busy, own

    def pct(self, a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        """Foreign CPU between two samples, in % of the whole machine."""
        wall = max(1e-6, b[0] - a[0])
        foreign = max(0.0, (b[1] - a[1]) - (b[2] - a[2]))
        return round(100 * foreign / ((os.cpu_count() or 1) * wall), 1)

    def wait_quiet(self, limit_s: float, threshold: float = 20.0) -> float:
        """Wait (at most ``limit_s``) until foreign load < ``threshold`` %; return the last %."""
        deadline = time.time() + limit_s
        while True:
            a = self.sample()
            time.sleep(3.0)
            load = self.pct(a, self.sample())
            if load < threshold or time.time() >= deadline:
                return load
            log(f"other processes use {load}% of the host; waiting (up to "
                f"{max(0.0, deadline - time.time()):.0f} s more)")


FOREIGN = ForeignLoad()


def _azolla_phase(results: dict[str, Any], key: str, phase: Coroutine[Any, Any, Any],
                  summary: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Run one Azolla-only phase; store its result (or its error) and the foreign load meanwhile
    under ``results[key]``, and log ``summary(result)`` when given."""
    before = FOREIGN.sample()
    try:
        results[key] = asyncio.run(phase)
        if summary is not None:
            log(f"  -> {summary(results[key])}")
    except Exception as exc:
        results[key] = {"error": repr(exc)}
        log(f"  !! {exc!r}")
    results[key]["foreign_load_pct"] = FOREIGN.pct(before, FOREIGN.sample())


def ensure_peer_venv(python: Path) -> None:
    if python.exists():
        return
    log(f"creating the peers' venv in {PEER_VENV} ({', '.join(PEER_PACKAGES)})")
    subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True, timeout=300)
    subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", *PEER_PACKAGES],
                   check=True, timeout=900)


def run_harness(name: str, python: str, script: Path, args: list[str], env: dict[str, str],
                out_dir: Path, timeout: float, wait_idle: float = 0.0) -> dict[str, Any]:
    """Run one harness script as a subprocess (own process group), echo its progress."""
    out = out_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    argv = [python, str(script), *args, "--json-out", str(out), "--results", str(out_dir)]
    if wait_idle:
        FOREIGN.wait_quiet(wait_idle)
    log(f"{name}: {' '.join(shlex.quote(a) for a in argv[1:])}")
    before = FOREIGN.sample()
    proc = _infra.Proc(name, argv, out_dir / f"{name}.log", env=env)
    deadline = time.time() + timeout
    seen = 0
    try:
        while proc.alive() and time.time() < deadline:
            time.sleep(0.5)
            seen = _echo_new(proc.log_path, seen, name)
        if proc.alive():
            log(f"{name}: timed out after {timeout:.0f} s; killing it")
    finally:
        proc.stop(timeout=25)
        _echo_new(proc.log_path, seen, name)
    foreign = FOREIGN.pct(before, FOREIGN.sample())
    log(f"{name}: other processes used {foreign}% of the host meanwhile")
    if not out.exists():
        return {"error": f"{name} wrote no result (exit code {proc.popen.returncode}); "
                         f"log: {proc.log_path}", "foreign_load_pct": foreign}
    result: dict[str, Any] = json.loads(out.read_text())
    result["foreign_load_pct"] = foreign
    return result


def _echo_new(path: Path, seen: int, name: str) -> int:
    try:
        with path.open("rb") as f:
            f.seek(seen)
            data = f.read()
    except OSError:
        return seen
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(("[", "  ->", "  !!", "Traceback", "worker ")) or "Error" in line:
            print(f"    {name}| {line}", flush=True)
    return seen + len(data)


def harness_args(p: dict[str, Any], lib: str, *, n: int | None = None,
                 skip_enqueue: bool = False, label: str = "") -> list[str]:
    n = n or p["n"]
    args = ["-n", str(n), "--single", str(p["single"]), "--concurrent",
            str(p["concurrent"]), "--configs", p["configs"][lib], "--duration",
            str(p["duration"]), "--rate-frac", "0.5", "--e2e-single", str(max(1, n // 2))]
    if skip_enqueue:
        args.append("--skip-enqueue")
    if label:
        args += ["--label", label]
    return args


async def start_azolla(cluster: _infra.BenchCluster, log_dir: Path,
                       name: str) -> tuple[_infra.Proc, str, str]:
    dsn = await _infra.fresh_database(cluster.dsn("postgres"), "peerbench_azolla")
    server, endpoint = _infra.start_server(dsn, log_dir, name=name)
    await _infra.wait_serving(endpoint, server, timeout=90)
    return server, endpoint, dsn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repeat, one config per library, "
                    "smaller N (about 4-5 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="harness repeats (medians)")
    ap.add_argument("--peers", default="pgqueuer,procrastinate",
                    help="comma separated; empty = Azolla only")
    ap.add_argument("--skip", default="", help="comma separated steps to skip: baseline, "
                    "process, submitters, waitloops, profile, recovery")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="update docs/benchmarks.md, the plot, bench/profiles/ and "
                         "bench/results/system_vs_peers.json (default: on for the full run)")
    ap.add_argument("--peer-python", default=str(PEER_VENV / "bin" / "python"))
    ap.add_argument("--data-dir", default="/tmp/azbench/pg",
                    help="PostgreSQL data directory (wiped and re-initialised)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the PostgreSQL data directory after the run")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before the run and before each library's run, wait up to S seconds "
                         "for other processes to use < 20%% of the host (shared machines)")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    p = dict(PROFILES[mode])
    if a.repeats:
        p["repeats"] = a.repeats
    docs = a.docs if a.docs is not None else (mode == "full")
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    peers = [s.strip() for s in a.peers.split(",") if s.strip()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = ROOT / "bench" / "results" / "raw" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "  ".join([".venv/bin/python bench/run.py", *sys.argv[1:]]).replace("  ", " ")

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    results: dict[str, Any] = {"command": command, "mode": mode, "profile": p,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "machine": _infra.machine_info(), "runs": []}
    cluster: _infra.BenchCluster | None = None
    try:
        if a.wait_idle:
            FOREIGN.wait_quiet(a.wait_idle)
        results["background_busy_pct_before"] = host_busy(2.0)
        log(f"{mode} run; host busy before start: {results['background_busy_pct_before']}% "
            f"(other processes); output in {out_dir}")
        if peers:
            ensure_peer_venv(Path(a.peer_python))

        data_dir = Path(a.data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        cluster = _infra.BenchCluster(data_dir)
        t = time.time()
        cluster.start()
        FOREIGN.pg_pid = cluster.cluster.server_pid()
        log(f"PostgreSQL up in {time.time() - t:.1f} s at {cluster.base} "
            f"({cluster.server_version()})")
        results["postgres"] = {"version": cluster.server_version(),
                               "settings": dict(_infra.PG_SETTINGS)}

        if "baseline" not in skip:
            log("baseline: no-op grpc.aio unary and bidi stream (echo server subprocess)")
            results["baseline"] = baseline.run_baseline(sys.executable, p["baseline_seconds"])
            b = results["baseline"]
            floor_dsn = asyncio.run(_infra.fresh_database(cluster.dsn("postgres"), "floor"))
            b["commit_seq"] = asyncio.run(baseline.commit_floor(floor_dsn,
                                                                p["baseline_seconds"]))
            log(f"  durable one-row commit p50 {b['commit_seq']['lat_ms']['p50']:.3f} ms, "
                f"{b['commit_seq']['per_s']:.0f}/s sequential")
            log(f"  unary p50 {b['unary_seq']['lat_ms']['p50']:.3f} ms, "
                f"{b['unary_seq']['per_s']:.0f}/s sequential, "
                f"{b['unary_conc']['per_s']:.0f}/s concurrent; stream pair p50 "
                f"{b['stream_pingpong']['lat_ms']['p50']:.3f} ms, "
                f"{b['stream_pipelined']['per_s']:.0f} pairs/s pipelined")

        env_common = {"PEERBENCH_PG": cluster.base, "PEERBENCH_PHASE_TIMEOUT": "120"}
        server: _infra.Proc | None = None
        endpoint = dsn = ""
        for rep in range(p["repeats"]):
            run: dict[str, Any] = {"repeat": rep + 1}
            results["runs"].append(run)
            if server is not None:
                server.stop()
            server, endpoint, dsn = asyncio.run(
                start_azolla(cluster, out_dir, f"azolla-server-r{rep + 1}"))
            azenv = _infra.bench_env({
                **env_common, "AZOLLA_BENCH_ENDPOINT": endpoint,
                "AZOLLA_BENCH_SERVER_PID": str(server.pid),
                "AZOLLA_BENCH_STATE": str(out_dir / "azolla-state.json")})
            script = PEERS_DIR / "bench_azolla.py"
            run["azolla-pool"] = run_harness(
                f"azolla-pool-r{rep + 1}", sys.executable, script,
                harness_args(p, "azolla-pool", label="pool"),
                {**azenv, "AZOLLA_BENCH_MODE": "pool"}, out_dir, p["harness_timeout"],
                a.wait_idle)
            if "process" not in skip:
                run["azolla-process"] = run_harness(
                    f"azolla-process-r{rep + 1}", sys.executable, script,
                    harness_args(p, "azolla-process", n=p["process_n"], skip_enqueue=True,
                                 label="process"),
                    {**azenv, "AZOLLA_BENCH_MODE": "process"}, out_dir, p["harness_timeout"],
                    a.wait_idle)
            for peer in peers:
                run[peer] = run_harness(
                    f"{peer}-r{rep + 1}", a.peer_python, PEERS_DIR / f"bench_{peer}.py",
                    harness_args(p, peer), _infra.bench_env(env_common), out_dir,
                    p["harness_timeout"], a.wait_idle)

        assert server is not None
        if "submitters" not in skip:
            procs, coroutines, per_proc = p["submitters"]
            log(f"azolla: single submits from {procs} client processes x {coroutines} "
                "coroutines")
            before = FOREIGN.sample()
            results["submitters"] = system.multi_client_submit(
                endpoint, procs, coroutines, per_proc, out_dir)
            results["submitters"]["foreign_load_pct"] = FOREIGN.pct(before, FOREIGN.sample())
            log(f"  -> {results['submitters'].get('per_s', 0):.0f} tasks/s")
        if "waitloops" not in skip:
            loops, n_wait = p["waitloops"]
            cfg = report.best_config(results, "azolla-pool") or "1x32"
            shepherds, conc = (int(x) for x in cfg.split("x"))
            log(f"azolla: {loops} submit-then-wait loops through the plain API, {n_wait} tasks, "
                f"pool shepherds {cfg}")
            _azolla_phase(results, "waitloops", system.submit_wait_loops(
                endpoint, out_dir, shepherds, conc, loops, n_wait),
                lambda r: f"{r['per_s']:.0f} tasks/s")
        prof_dir = (ROOT / "bench" / "profiles") if docs else (out_dir / "profiles")
        if "profile" not in skip:
            cfg = report.best_config(results, "azolla-pool") or "1x16"
            procs_, conc = (int(x) for x in cfg.split("x"))
            log(f"azolla: py-spy profiles at peak load ({p['profile_seconds']:.0f} s, pool, "
                f"concurrency {procs_ * conc})")
            _azolla_phase(results, "profiles", system.profile_peak(
                endpoint, server.pid, dsn, out_dir, prof_dir, "pool", procs_ * conc,
                p["profile_seconds"]))
        server.stop()
        server = None

        if "recovery" not in skip:
            log(f"azolla: orchestrator kill -9 + restart with {p['recovery_unfinished']} "
                "unfinished tasks")
            _azolla_phase(results, "restart", system.orchestrator_restart(
                cluster.dsn("postgres"), out_dir, p["recovery_unfinished"],
                profile_dir=None if "profile" in skip else prof_dir),
                lambda r: json.dumps(report.rounded(
                    {k: v for k, v in r.items() if k != "startup_profile"})))
            log("azolla: shepherd kill -9 with attempts running")
            _azolla_phase(results, "shepherd_death", system.shepherd_death(
                cluster.dsn("postgres"), out_dir), lambda r: json.dumps(report.rounded(r)))
        results["background_busy_pct_after"] = host_busy(2.0)
    except KeyboardInterrupt:
        log("interrupted")
        results["interrupted"] = True
    finally:
        _infra.kill_all()
        if cluster is not None:
            cluster.stop()
            if not a.keep_data:
                shutil.rmtree(a.data_dir, ignore_errors=True)
        _kill_stray_shepherds(out_dir / "shepherd-pids")
    results["elapsed_s"] = round(time.time() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    summary = report.summarize(results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print()
    print(report.table_text(summary))
    if docs and not results.get("interrupted"):
        report.write_docs(summary, results, ROOT)
        log("updated docs/benchmarks.md, docs/img/, bench/results/system_vs_peers.json")
    log(f"done in {results['elapsed_s']:.0f} s; raw results in {out_dir}")
    return 0


def _kill_stray_shepherds(pid_dir: Path) -> None:
    """Shepherds started by harness workers die with them (PDEATHSIG); belt and braces."""
    if not pid_dir.is_dir():
        return
    for f in pid_dir.iterdir():
        with contextlib.suppress(ValueError, OSError):
            pid = int(f.name)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "azolla-shepherd" in cmdline:
                os.killpg(pid, signal.SIGKILL)
        f.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
