"""Process plumbing shared by the system benchmarks: PostgreSQL, azolla-server, shepherds.

Every process started here is registered in :data:`REGISTRY` and killed (its whole process
group) by :func:`kill_all`, which ``bench/run.py`` calls on exit, on failure and on signals.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
#: Settings of the benchmark cluster: the peers' cluster (bench/peers/pg_cluster.sh) plus
#: LocalCluster's fsync/synchronous_commit/full_page_writes = on.
PG_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_buffers": "16MB",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "work_mem": "8MB",
    "log_min_messages": "warning",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of child processes: the repo root on PYTHONPATH (for ``bench.tasks_noop``).

    ``PYTHONDONTWRITEBYTECODE`` is not passed on: a pip-installed azolla ships compiled
    bytecode (``.pyc``), so the servers and shepherds measured here read it too (see
    :func:`compile_bytecode`) instead of compiling azolla's sources at every start, as they
    would from this editable checkout in an environment that sets the variable.
    """
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.pop("DATABASE_URL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra or {})
    return env


def compile_bytecode() -> None:
    """Compile azolla's and the benchmark's sources to ``.pyc`` before anything is timed.

    A pip-installed azolla ships its bytecode; this editable checkout has none until something
    writes it (and an environment with ``PYTHONDONTWRITEBYTECODE`` never does), so every
    measured start would otherwise compile some 90 modules first (~0.13 s of a restart).
    Fresh ``.pyc`` files are left alone; files edited since are recompiled.
    """
    import compileall

    for folder in (ROOT / "src" / "azolla", ROOT / "bench"):
        compileall.compile_dir(str(folder), quiet=2, workers=1)


class Proc:
    """A subprocess in its own process group, logged to a file, killed by :func:`kill_all`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None, die_with_parent: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in wait/kill
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env or bench_env(), start_new_session=True,
                                      cwd=str(ROOT),
                                      preexec_fn=_die_with_parent if die_with_parent else None)
        self.pid = self.popen.pid
        self.started = time.time()
        REGISTRY.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process only (not its group)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the process and every child it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the group; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {self.name} (pid {self.pid}) ignored SIGTERM for {timeout:.0f} s; "
                  "killing it", file=sys.stderr)
        self.kill_group()  # children left behind, if any
        self._close_log()
        if self in REGISTRY:
            REGISTRY.remove(self)
        return self.popen.returncode

    def _close_log(self) -> None:
        with contextlib.suppress(Exception):
            self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


REGISTRY: list[Proc] = []


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def kill_all() -> None:
    """Kill every process still registered (whole groups); used on exit and failure."""
    for proc in list(REGISTRY):
        proc.kill_group()
        proc._close_log()
        REGISTRY.remove(proc)


# -- PostgreSQL ------------------------------------------------------------------------------

class BenchCluster:
    """A private PostgreSQL cluster in ``data_dir`` (LocalCluster) with :data:`PG_SETTINGS`."""

    def __init__(self, data_dir: Path) -> None:
        from azolla.adapters.postgres.cluster import LocalCluster

        self.cluster = LocalCluster(data_dir, settings=PG_SETTINGS, start_timeout=60)

    def start(self) -> str:
        """Start (initdb first if needed); returns the server DSN (database ``postgres``)."""
        return self.cluster.ensure_started()

    @property
    def base(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT`` (no database)."""
        return self.cluster.dsn("postgres").rsplit("/", 1)[0]

    def dsn(self, db: str) -> str:
        return self.cluster.dsn(db)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cluster.stop("fast")

    def server_version(self) -> str:
        out = subprocess.run([self.cluster.bin_dir.exe("postgres"), "--version"],
                             capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip()


async def fresh_database(server_dsn: str, name: str) -> str:
    """(Re)create database ``name``; return its DSN."""
    import asyncpg

    from azolla.adapters.postgres.cluster import dsn_with_database

    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_with_database(server_dsn, name)


# -- azolla-server -----------------------------------------------------------------------------

def server_argv(database_url: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [str(VENV_BIN / "azolla-server"), "--database-url", database_url,
            "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
            "--log-level", "warning", *extra]


def start_server(database_url: str, log_dir: Path, port: int | None = None,
                 extra: Sequence[str] = (), name: str = "azolla-server") -> tuple[Proc, str]:
    """Start ``azolla-server`` (no wait); returns the process and its endpoint URL."""
    port = port or free_port()
    proc = Proc(name, server_argv(database_url, port, extra), log_dir / f"{name}.log")
    return proc, f"http://127.0.0.1:{port}"


async def health_serving(endpoint: str, timeout: float = 0.5) -> bool:
    """One health check: True when the server answers SERVING."""
    import grpc
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = endpoint.split("://", 1)[-1]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_serving(endpoint: str, proc: Proc | None = None, timeout: float = 60.0,
                       interval: float = 0.02) -> float:
    """Poll the health service until SERVING; returns the wall clock when it was first seen.

    Raises:
        RuntimeError: Not serving within ``timeout``, or the process died.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{proc.log_tail()}")
        if await health_serving(endpoint, timeout=min(1.0, max(0.05, deadline - time.time()))):
            return time.time()
        await asyncio.sleep(interval)
    raise RuntimeError(f"{endpoint} not SERVING within {timeout:.0f} s"
                       + (f":\n{proc.log_tail()}" if proc else ""))


# -- shepherds ------------------------------------------------------------------------------

#: Extra ``azolla-shepherd`` options of the pool shepherds that the throughput and latency
#: phases run: prefetch (off by default; see docs/shepherd.md) pays for many short tasks.
POOL_BENCH_OPTIONS = ("--prefetch", "1")


def shepherd_argv(endpoint: str, mode: str, concurrency: int, domain: str,
                  extra: Sequence[str] = ()) -> list[str]:
    return [str(VENV_BIN / "azolla-shepherd"), "--orchestrator", endpoint,
            "--tasks", "bench.tasks_noop", "--mode", mode, "--concurrency", str(concurrency),
            "--domain", domain, "--log-level", "warning", *extra]


def start_shepherd(endpoint: str, mode: str, concurrency: int, domain: str, log_dir: Path,
                   name: str = "azolla-shepherd", extra: Sequence[str] = (),
                   die_with_parent: bool = False) -> Proc:
    return Proc(name, shepherd_argv(endpoint, mode, concurrency, domain, extra),
                log_dir / f"{name}.log", die_with_parent=die_with_parent)


async def list_shepherds(endpoint: str, domain: str, timeout: float = 2.0) -> list[Any]:
    """Connected shepherds of ``domain`` (AdminService.ListShepherds)."""
    import grpc.aio

    from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc

    target = endpoint.split("://", 1)[-1]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.AdminServiceStub(channel)
        reply = await stub.ListShepherds(orchestrator_pb2.ListShepherdsRequest(domain=domain),
                                         timeout=timeout)
        return list(reply.shepherds)


async def wait_shepherds(endpoint: str, domain: str, count: int, procs: Sequence[Proc] = (),
                         timeout: float = 60.0) -> None:
    """Wait until ``count`` shepherds of ``domain`` are connected.

    Raises:
        RuntimeError: Not within ``timeout``, or a shepherd process died.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                                   f"{proc.log_tail()}")
        with contextlib.suppress(Exception):
            if len(await list_shepherds(endpoint, domain)) >= count:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{count} shepherd(s) of domain {domain!r} not connected within "
                       f"{timeout:.0f} s")


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process tree (see bench/peers/common.py)."""
    hz = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
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
    return total / hz


async def wait_quiet(pids: Sequence[int], timeout: float = 20.0, threshold: float = 0.03,
                     interval: float = 0.25) -> bool:
    """Wait until the process trees of ``pids`` use < ``threshold`` CPU-s per ``interval``.

    Used after start-up so pool workers have finished importing before the clock starts.
    """
    deadline = time.time() + timeout
    last = sum(tree_cpu_s(p) for p in pids)
    quiet = 0
    while time.time() < deadline:
        await asyncio.sleep(interval)
        now = sum(tree_cpu_s(p) for p in pids)
        quiet = quiet + 1 if now - last < threshold else 0
        last = now
        if quiet >= 2:
            return True
    return False


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, kernel."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        text = Path("/proc/meminfo").read_text()
        m = re.search(r"MemTotal:\s+(\d+) kB", text)
        if m:
            info["memory_gb"] = round(int(m.group(1)) / 1024 / 1024, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    info["kernel"] = os.uname().release
    info["python"] = sys.version.split()[0]
    return info
