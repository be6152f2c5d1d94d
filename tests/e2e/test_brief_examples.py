"""The brief's examples, end to end: real server, real shepherd processes, real PostgreSQL.

``tests/fixtures/brief_example.py`` is the brief's Python example byte for byte; the test only
points it at this test's server port instead of 52710 (so runs never collide).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from azolla import Client
from support.procs import ServerProc, ShepherdProc, clean_env

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(180)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def server(fresh_database_url: str) -> Iterator[ServerProc]:
    proc = ServerProc(fresh_database_url)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("mode", ["process", "pool"])
def test_python_example_prints_the_greeting(server: ServerProc, mode: str,
                                            tmp_path: Path) -> None:
    shepherd = ShepherdProc(server.url, ["brief_tasks"], mode=mode, pythonpath=str(FIXTURES))
    try:
        source = (FIXTURES / "brief_example.py").read_text()
        script = tmp_path / "example.py"
        script.write_text(source.replace("http://localhost:52710",
                                         f"http://localhost:{server.port}"))
        done = subprocess.run([sys.executable, str(script)], env=clean_env(),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "✅" in done.stdout
        assert "Hello Alice! You are 25 years old." in done.stdout
    finally:
        shepherd.stop()


def test_rust_example_flow_by_name_with_positional_args(server: ServerProc) -> None:
    shepherd = ShepherdProc(server.url, ["brief_tasks"], mode="pool", pythonpath=str(FIXTURES))

    async def flow() -> str:
        async with Client.connect(server.url) as client:
            task = await client.submit_task("greet_user").args("Alice", 25).submit()
            result = await task.wait()
            assert result.success, result.error
            return str(result.value)

    try:
        value = asyncio.run(asyncio.wait_for(flow(), 60))
        assert "Hello Alice! You are 25 years old." in value
    finally:
        shepherd.stop()
