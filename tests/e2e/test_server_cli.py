"""The ``azolla-server`` console script as a real process: health, signals, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc
from azolla.adapters.postgres.cluster import free_port

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(120)]

BIN = Path(sys.executable).parent


def command(name: str = "azolla-server") -> list[str]:
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "azolla.app.server_main"]  # pragma: no cover


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("AZOLLA_") and k.upper() != "DATABASE_URL"}
    # The server may not inherit the test harness' PostgreSQL binaries choice.
    for keep in ("AZOLLA_PG_BIN", "AZOLLA_PG_USER"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    env.update(extra)
    return env


class Server:
    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 name: str = "azolla-server") -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [*command(name), "--port", str(self.port), "--log-format", "json", *args],
            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited: {self.process.communicate()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1,
                                        wait_for_ready=True)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def log_events(stderr: str) -> list[dict[str, object]]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_memory_server_serves_and_exits_cleanly(servers: list[Server], signum: int) -> None:
    metrics_port = free_port()
    server = Server("--store", "memory", "--metrics-port", str(metrics_port))
    servers.append(server)
    server.wait_serving()
    with grpc.insecure_channel(server.address) as channel:
        client = orchestrator_pb2_grpc.ClientServiceStub(channel)
        created = client.CreateTask(pbo.CreateTaskRequest(name="t"), timeout=10)
        status = client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=created.task_id),
                                      timeout=10)
        assert status.state == "queued"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert 'azolla_tasks{domain="default",state="queued"} 1.0' in text
    assert 'azolla_queue_depth{domain="default"} 1.0' in text
    assert "azolla_commit_seconds_bucket" in text
    code, err = server.stop(signum)
    assert code == 0, err
    events = log_events(err)
    ready = [e for e in events if e.get("event") == "azolla-server ready"]
    assert ready
    assert ready[0]["address"] == server.address
    assert ready[0]["store"] == "memory"
    assert any(e.get("event") == "stopped" for e in events)
    assert "Traceback" not in err


def test_orchestrator_alias_and_help() -> None:
    done = subprocess.run([*command("azolla-orchestrator"), "--help"], capture_output=True,
                          text=True, timeout=60, env=clean_env())
    assert done.returncode == 0
    assert "--database-url" in done.stdout
    assert "--store" in done.stdout


def test_bad_environment_value_exits_2_in_one_line() -> None:
    done = subprocess.run([*command(), "--store", "memory"], capture_output=True, text=True,
                          timeout=60, env=clean_env(AZOLLA_PORT="not-a-port"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("azolla-server: error: invalid settings: port")


def test_port_in_use_exits_1_in_one_line(servers: list[Server]) -> None:
    first = Server("--store", "memory")
    servers.append(first)
    first.wait_serving()
    done = subprocess.run([*command(), "--store", "memory", "--port", str(first.port)],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("azolla-server:")]
    assert len(errors) == 1, done.stderr
    assert "could not start: cannot listen" in errors[0]
    assert "Traceback" not in done.stderr


def test_unreachable_database_exits_1(servers: list[Server]) -> None:
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing?connect_timeout=1"
    done = subprocess.run([*command(), "--database-url", url, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=90, env=clean_env())
    assert done.returncode == 1, done.stderr
    assert "could not start" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A folder outside pytest's base temp dir.

    When the tests run as root, PostgreSQL runs as another OS user and needs to traverse the
    data folder's ancestors; pytest resets its own base folder to mode 0700 whenever another
    pytest session starts, which would lock that user out mid-test.
    """
    root = Path(tempfile.mkdtemp(prefix="azolla-embedded-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_embedded_postgres_keeps_tasks_across_restarts(data_root: Path,
                                                       servers: list[Server]) -> None:
    data_dir = data_root / "pgdata"
    first = Server("--data-dir", str(data_dir))
    servers.append(first)
    first.wait_serving(timeout=120)
    with grpc.insecure_channel(first.address) as channel:
        client = orchestrator_pb2_grpc.ClientServiceStub(channel)
        task_id = client.CreateTask(pbo.CreateTaskRequest(name="keep", idempotency_key="k"),
                                    timeout=10).task_id
    code, err = first.stop()
    assert code == 0, err
    assert not (data_dir / "postmaster.pid").exists()  # we started it, so we stopped it

    second = Server("--data-dir", str(data_dir))
    servers.append(second)
    second.wait_serving(timeout=120)
    with grpc.insecure_channel(second.address) as channel:
        client = orchestrator_pb2_grpc.ClientServiceStub(channel)
        status = client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id), timeout=10)
        assert (status.name, status.state) == ("keep", "queued")
        again = client.CreateTask(pbo.CreateTaskRequest(name="keep", idempotency_key="k"),
                                  timeout=10)
        assert (again.task_id, again.deduplicated) == (task_id, True)
    code, err = second.stop()
    assert code == 0, err
