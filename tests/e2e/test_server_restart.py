"""Server restart on the same database: state intact, running attempts reconciled."""

from __future__ import annotations

import asyncio

import pytest
from _server_harness import start_server, store_settings, wait_state

from azolla import Client
from azolla.adapters.grpc.pb import common_pb2 as pbc
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.app.settings import Settings

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.timeout(90)]


def _comparable(status: pbo.GetTaskStatusResponse) -> pbo.GetTaskStatusResponse:
    copy = pbo.GetTaskStatusResponse()
    copy.CopyFrom(status)
    return copy


async def test_restart_keeps_state_and_adopts_running_attempts(
        request: pytest.FixtureRequest) -> None:
    settings = store_settings(request, "postgres", reconnect_grace_seconds=30)
    first = await start_server(settings)
    try:
        client = first.client
        done = (await client.CreateTask(pbo.CreateTaskRequest(name="done", args="[1]"))).task_id
        shepherd = await first.shepherd("shepherd-r", capacity=1)
        [task] = await shepherd.tasks(1)
        shepherd.succeed(task, pbc.AnyValue(json_value='{"v": 1}'))
        await wait_state(client, done, "succeeded")
        running = (await client.CreateTask(pbo.CreateTaskRequest(name="long"))).task_id
        [long_task] = await shepherd.tasks(1)
        shepherd.send(pbo.ClientMsg(ack=pbo.Ack(task_id=running, attempt_number=1)))
        await wait_state(client, running, "running")
        keyed = await client.CreateTask(pbo.CreateTaskRequest(name="k", idempotency_key="key-1"))
        queued = (await client.CreateTask(pbo.CreateTaskRequest(name="q", priority=5))).task_id
        before = {t: _comparable(await client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=t)))
                  for t in (done, running, keyed.task_id, queued)}
    finally:
        await first.close()

    second = await start_server(settings)
    try:
        client = second.client
        for task_id, status in before.items():
            after = await client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
            assert after == status, task_id
        waited = await client.WaitForTask(pbo.WaitForTaskRequest(task_id=done, timeout_ms=0))
        assert waited.success.result.json_value == '{"v": 1}'
        again = await client.CreateTask(pbo.CreateTaskRequest(name="k", idempotency_key="key-1"))
        assert (again.task_id, again.deduplicated) == (keyed.task_id, True)
        # The shepherd comes back still running its attempt: the server adopts it.
        back = await second.shepherd("shepherd-r", capacity=3, running=((running, 1),))
        assert back.hello_ack is not None
        assert list(back.hello_ack.cancel) == []
        pushed = await back.tasks(2)
        assert {t.task_id for t in pushed} == {keyed.task_id, queued}
        back.succeed(long_task, pbc.AnyValue(int_value=42))
        waited = await client.WaitForTask(pbo.WaitForTaskRequest(task_id=running, timeout_ms=5000))
        assert waited.success.result.int_value == 42
        status = await client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=running))
        assert [(a.number, a.state) for a in status.attempts] == [(1, "succeeded")]
    finally:
        await second.close()


async def test_unclaimed_attempts_are_retried_after_the_grace(
        request: pytest.FixtureRequest) -> None:
    settings = store_settings(request, "postgres", reconnect_grace_seconds=0.3)
    first = await start_server(settings)
    try:
        task_id = (await first.client.CreateTask(pbo.CreateTaskRequest(name="t"))).task_id
        old = await first.shepherd("gone")
        [attempt1] = await old.tasks(1)
    finally:
        await first.close()
    second = await start_server(settings)
    try:
        fresh = await second.shepherd("fresh")
        [attempt2] = await fresh.tasks(1, timeout=10)
        assert (attempt1.attempt_number, attempt2.attempt_number) == (1, 2)
        fresh.succeed(attempt2)
        await wait_state(second.client, task_id, "succeeded")
        status = await second.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
        assert [(a.number, a.state) for a in status.attempts] == [(1, "lost"), (2, "succeeded")]
        # The old shepherd returns late, claiming the superseded attempt: told to stop it.
        late = await second.shepherd("gone", running=((task_id, 1),))
        assert late.hello_ack is not None
        assert [(c.task_id, c.attempt_number) for c in late.hello_ack.cancel] == [(task_id, 1)]
    finally:
        await second.close()


async def test_an_sdk_client_goes_on_submitting_across_a_server_restart(
        request: pytest.FixtureRequest) -> None:
    """The client's SubmitTasks stream breaks with the server; the next submits reopen it."""
    url = request.getfixturevalue("fresh_database_url")
    first = await start_server(Settings(store="postgres", database_url=url, port=0))
    port = first.server.port
    settings = Settings(store="postgres", database_url=url, port=port)
    async with Client(f"http://127.0.0.1:{port}", timeout=20) as client:
        second = None
        try:
            try:
                before = await client.submit_task("t", [1]).submit()
            finally:
                await first.close()
            # Submitted while no server listens: with a key it is safe to send again, and it
            # goes through once the server is back.
            keyed = asyncio.ensure_future(
                client.submit_task("t", [2]).idempotency_key("across-restart").submit())
            await asyncio.sleep(0.3)
            assert not keyed.done()
            second = await start_server(settings)
            during = await asyncio.wait_for(keyed, 30)
            after = await client.submit_task("t", [3]).submit()
            for handle, args in ((before, "[1]"), (during, "[2]"), (after, "[3]")):
                status = await second.client.GetTaskStatus(
                    pbo.GetTaskStatusRequest(task_id=handle.task_id))
                assert status.args == args
            again = await client.submit_task("t", [2]).idempotency_key("across-restart").submit()
            assert (again.task_id, again.deduplicated) == (during.task_id, True)
            assert client.stats().submit_streams_opened >= 2
        finally:
            if second is not None:
                await second.close()
