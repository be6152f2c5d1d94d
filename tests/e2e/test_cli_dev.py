"""``azolla dev``: a server and a shepherd as child processes; Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from azolla.adapters.postgres.cluster import free_port

pytestmark = [pytest.mark.grpc, pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "fixtures" / "tasks_basic.py"
_SCRIPT = Path(sys.executable).parent / "azolla"
AZOLLA = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "from azolla.app.cli import main; main()"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("AZOLLA_") and k.upper() != "DATABASE_URL"}
    env["AZOLLA_LOG_LEVEL"] = "warning"
    return env


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_dev_runs_a_server_and_a_shepherd_until_ctrl_c() -> None:
    port = free_port()
    dev = subprocess.Popen(
        [*AZOLLA, "dev", "--store", "memory", "--port", str(port), "--tasks", str(TASKS),
         "--concurrency", "1"],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the server starts, then the shepherd connects
            listed = subprocess.run([*AZOLLA, "--server", url, "--json", "shepherds", "list"],
                                    capture_output=True, text=True, timeout=30,
                                    env=clean_env())
            if listed.returncode == 0 and json.loads(listed.stdout)["shepherds"]:
                break
            assert dev.poll() is None, dev.communicate()
            assert time.monotonic() < deadline, listed.stderr
            time.sleep(0.2)
        submitted = subprocess.run(
            [*AZOLLA, "--server", url, "--json", "submit", "add", "--args", "[2, 3]",
             "--wait", "--wait-timeout", "30"],
            capture_output=True, text=True, timeout=60, env=clean_env())
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["value"] == 5
        assert processes_mentioning(f"127.0.0.1:{port}")  # the shepherd names the server

        dev.send_signal(signal.SIGINT)
        _, err = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.communicate()
    assert dev.returncode == 0, err
    assert "server ready" in err
    assert not processes_mentioning(f"--port {port}")
    assert not processes_mentioning(f"127.0.0.1:{port}")


def test_dev_reports_a_server_that_cannot_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*AZOLLA, "dev", "--store", "memory", "--port", str(port), "--tasks", str(TASKS)],
            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "azolla: error: azolla-server exited with code 1" in result.stderr
