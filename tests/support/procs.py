"""Real processes for system tests: an ``azolla-server`` and ``azolla-shepherd`` s.

Every process is started with a clean environment (no ``AZOLLA_*``/``DATABASE_URL`` from the
test runner), in its own process group, and is killed (group-wide) when the test ends, even on
failure. Waits are bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from azolla.adapters.postgres.cluster import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    """Direct child process ids of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without Azolla settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("AZOLLA_") and k.upper() != "DATABASE_URL"}
    for keep in ("AZOLLA_PG_BIN", "AZOLLA_PG_USER"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a temp file, killed with its group on close."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"azolla-{name}-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group and reap."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.process.returncode


class ServerProc(Proc):
    """``azolla-server`` on a free port."""

    def __init__(self, database_url: str | None = None, *, port: int | None = None,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        store = ["--database-url", database_url] if database_url else ["--store", "memory"]
        argv = [str(BIN / "azolla-server"), "--port", str(self.port), *store, *extra]
        super().__init__(argv, clean_env(**(env or {})), "server")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Wait for the health check to say SERVING; return the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(self.address) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            time.sleep(0.02)
        raise TimeoutError(f"server not serving after {timeout} s:\n{self.output()[-3000:]}")


class ShepherdProc(Proc):
    """``azolla-shepherd`` serving task modules found on ``pythonpath``."""

    def __init__(self, orchestrator: str, tasks: list[str], *, mode: str = "pool",
                 concurrency: int = 4, pythonpath: str = "", extra: tuple[str, ...] = ()) -> None:
        argv = [str(BIN / "azolla-shepherd"), "--orchestrator", orchestrator, "--mode", mode,
                "--concurrency", str(concurrency)]
        for module in tasks:
            argv += ["--tasks", module]
        env = clean_env(PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p))
        super().__init__([*argv, *extra], env, "shepherd")
