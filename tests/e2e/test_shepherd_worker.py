"""``azolla.Worker`` end to end: a shepherd inside a Python program, real server and Postgres."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import grpc.aio
import pytest

from azolla import Client, Worker
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as opb_grpc
from azolla.worker import WorkerStartError
from support.procs import ROOT, ServerProc, clean_env

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.timeout(120)]

MODULE = "worker_e2e_tasks"
SOURCE = '''
from azolla import azolla_task


@azolla_task
async def greet_user(name: str, age: int) -> dict:
    return {"greeting": f"Hello {name}! You are {age} years old."}


@azolla_task
def shout(text: str) -> str:
    return text.upper()
'''


@pytest.fixture
def server(fresh_database_url: str) -> Iterator[ServerProc]:
    proc = ServerProc(fresh_database_url)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def tasks_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    return importlib.import_module(MODULE)


async def shepherd_ids(server: ServerProc) -> list[str]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await opb_grpc.AdminServiceStub(channel).ListShepherds(
            opb.ListShepherdsRequest(), timeout=5)
    return [s.shepherd_id for s in reply.shepherds]


@pytest.mark.parametrize("mode", ["process", "pool"])
async def test_worker_as_a_context_manager(server: ServerProc, tasks_module: ModuleType,
                                           mode: str) -> None:
    worker = Worker(server.url, tasks=[tasks_module.greet_user, MODULE], concurrency=2,
                    mode=mode)
    async with worker, Client.connect(server.url) as client:
        await worker.wait_connected(30)
        assert worker.connected
        assert worker.task_names == ["greet_user", "shout"]
        assert worker.shepherd_id in await shepherd_ids(server)
        handle = await client.submit_task(tasks_module.greet_user,
                                          {"name": "Alice", "age": 25}).submit()
        result = await asyncio.wait_for(handle.wait(), 60)
        assert result.value == {"greeting": "Hello Alice! You are 25 years old."}
        shouted = await asyncio.wait_for(
            (await client.submit_task("shout").args("hi").submit()).wait(), 60)
        assert shouted.value == "HI"
        status = await handle.status()
        assert [a.shepherd_id for a in status.attempts] == [worker.shepherd_id]
        shepherd_id = worker.shepherd_id
    assert not worker.connected
    assert worker.shepherd_id is None
    # The server learns of the closed stream asynchronously (its disconnect is a step of the
    # decision loop): give it a bounded moment.
    async with asyncio.timeout(10):
        while shepherd_id in await shepherd_ids(server):
            await asyncio.sleep(0.05)


async def test_a_task_module_that_fails_to_import_fails_start(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('no config here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    worker = Worker("http://127.0.0.1:1", tasks=["broken_tasks"])
    with pytest.raises(WorkerStartError, match="broken_tasks"):
        await worker.start()
    assert worker.runtime is None


def test_worker_run_in_a_script_drains_on_ctrl_c(server: ServerProc, tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f'''
        from azolla import Worker, azolla_task

        @azolla_task
        def double(n: int) -> int:
            return 2 * n

        if __name__ == "__main__":
            Worker({server.url!r}, tasks=[double], concurrency=1).run()
    '''))
    env = clean_env(PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        async def flow() -> int:
            deadline = time.monotonic() + 30
            while not await shepherd_ids(server):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the script's worker did not connect"
                await asyncio.sleep(0.05)
            async with Client.connect(server.url) as client:
                result = await asyncio.wait_for(
                    (await client.submit_task("double").args(21).submit()).wait(), 60)
                assert result.success, result.error
                return int(result.value)

        assert asyncio.run(flow()) == 42
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
