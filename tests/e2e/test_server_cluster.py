"""ClusterService end to end: raw shepherd streams against a real server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from _server_harness import RunningServer, start_server, store_settings, wait_state

from azolla.adapters.grpc.pb import common_pb2 as pbc
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def srv(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    server = await start_server(store_settings(request, request.param))
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def fast_srv(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    """A memory server with short heartbeats and pings."""
    server = await start_server(store_settings(
        request, "memory", heartbeat_interval_ms=100, heartbeat_timeout_ms=400,
        ping_interval_ms=100))
    try:
        yield server
    finally:
        await server.close()


async def create(srv: RunningServer, count: int = 1, **fields: Any) -> list[str]:
    response = await srv.client.CreateTasks(pbo.CreateTasksRequest(tasks=[
        pbo.CreateTaskRequest(name="t", **fields) for _ in range(count)]))
    return [t.task_id for t in response.tasks]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` (for facts the wire offers no stream for, e.g. an attempt's state)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def test_hello_must_come_first(srv: RunningServer) -> None:
    async def requests() -> AsyncIterator[pbo.ClientMsg]:
        yield pbo.ClientMsg(status=pbo.Status(current_load=0, available_capacity=1))

    call = srv.cluster.Stream(requests())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Hello" in (info.value.details() or "")


async def test_bad_hello_is_refused(srv: RunningServer) -> None:
    async def requests() -> AsyncIterator[pbo.ClientMsg]:
        yield pbo.ClientMsg(hello=pbo.Hello(shepherd_uuid="s", max_concurrency=0))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.cluster.Stream(requests()).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_concurrency" in (info.value.details() or "")


async def test_hello_ack_carries_heartbeat_settings(fast_srv: RunningServer) -> None:
    shepherd = await fast_srv.shepherd()
    assert shepherd.hello_ack is not None
    assert (shepherd.hello_ack.heartbeat_interval_ms,
            shepherd.hello_ack.heartbeat_timeout_ms) == (100, 400)
    assert list(shepherd.hello_ack.cancel) == []


async def test_batch_shepherd_gets_task_batches(srv: RunningServer) -> None:
    ids = await create(srv, 5)
    shepherd = await srv.shepherd(capacity=10, batches=True)
    message = await shepherd.recv()
    assert message.WhichOneof("kind") == "tasks"
    assert sorted(t.task_id for t in message.tasks.tasks) == sorted(ids)
    assert {t.attempt_number for t in message.tasks.tasks} == {1}


async def test_old_shepherd_gets_one_task_per_message_and_may_omit_attempts(
        srv: RunningServer) -> None:
    ids = await create(srv, 3)
    shepherd = await srv.shepherd(capacity=10, batches=False)
    messages = [await shepherd.recv() for _ in range(3)]
    assert [m.WhichOneof("kind") for m in messages] == ["task"] * 3
    for message in messages:  # no attempt number: matched to the current attempt
        shepherd.succeed(message.task, pbc.AnyValue(int_value=5), attempt=0)
    for task_id in ids:
        waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id,
                                                                   timeout_ms=5000))
        assert (waited.state, waited.success.result.int_value) == ("succeeded", 5)


async def test_capacity_is_respected(srv: RunningServer) -> None:
    await create(srv, 5)
    shepherd = await srv.shepherd(capacity=2)
    first = await shepherd.tasks(2)
    with pytest.raises(TimeoutError):
        await shepherd.recv(timeout=0.2)
    shepherd.succeed(first[0])
    [third] = await shepherd.tasks(1)
    assert third.task_id not in {t.task_id for t in first}


async def test_shepherds_only_get_their_domain_and_group(srv: RunningServer) -> None:
    [mine] = await create(srv, 1, domain="d2", shepherd_group="gpu")
    await create(srv, 2)  # default domain and group
    shepherd = await srv.shepherd(domain="d2", group="gpu")
    [task] = await shepherd.tasks(1)
    assert (task.task_id, task.domain) == (mine, "d2")
    with pytest.raises(TimeoutError):
        await shepherd.recv(timeout=0.2)


async def test_acks_mark_attempts_running(srv: RunningServer) -> None:
    ids = await create(srv, 2)
    shepherd = await srv.shepherd()
    tasks = await shepherd.tasks(2)
    shepherd.send(pbo.ClientMsg(ack=pbo.Ack(task_id=tasks[0].task_id, attempt_number=1)))
    shepherd.send(pbo.ClientMsg(acks=pbo.AckBatch(acks=[pbo.Ack(task_id=tasks[1].task_id,
                                                          attempt_number=1)])))

    async def all_running() -> bool:
        for task_id in ids:
            status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
            if status.attempts[0].state != "running":
                return False
        return True

    await eventually(all_running)


async def test_stale_attempt_number_is_rejected(srv: RunningServer) -> None:
    [task_id] = await create(srv)
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    shepherd.succeed(task, pbc.AnyValue(string_value="forged"), attempt=7)
    shepherd.send(pbo.ClientMsg(status=pbo.Status()))  # a round trip later, still running
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=200))
    assert waited.status_code == pbo.WAIT_FOR_TASK_STATUS_TIMEOUT
    shepherd.succeed(task, pbc.AnyValue(string_value="real"))
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.success.result.string_value == "real"


@pytest.mark.parametrize("leave", ["half_close", "cancel"])
async def test_stream_end_retries_on_another_stream(srv: RunningServer, leave: str) -> None:
    [task_id] = await create(srv)
    first = await srv.shepherd("shepherd-a")
    [attempt1] = await first.tasks(1)
    second = await srv.shepherd("shepherd-b")
    if leave == "half_close":
        first.half_close()
        await first.ended()
    else:
        first.cancel()
    [attempt2] = await second.tasks(1)
    assert (attempt2.task_id, attempt2.attempt_number) == (task_id, 2)
    second.succeed(attempt2, pbc.AnyValue(int_value=2))
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.success.result.int_value == 2
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert [(a.number, a.state, a.shepherd_id) for a in status.attempts] == [
        (1, "lost", "shepherd-a"), (2, "succeeded", "shepherd-b")]
    assert status.attempts[0].error.type == "InfrastructureError"
    assert attempt1.attempt_number == 1


async def test_late_result_of_superseded_attempt_is_rejected(srv: RunningServer) -> None:
    [task_id] = await create(srv)
    first = await srv.shepherd("shepherd-a")
    [attempt1] = await first.tasks(1)
    first.cancel()
    second = await srv.shepherd("shepherd-b")
    [attempt2] = await second.tasks(1)
    assert attempt2.attempt_number == 2
    # The old attempt's result arrives (over another stream) after it was superseded.
    second.succeed(attempt1, pbc.AnyValue(string_value="stale"))
    second.succeed(attempt2, pbc.AnyValue(string_value="fresh"))
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.success.result.string_value == "fresh"


async def test_silent_shepherd_is_closed_and_its_task_retried(fast_srv: RunningServer) -> None:
    [task_id] = await create(fast_srv)
    silent = await fast_srv.shepherd("silent")
    [attempt1] = await silent.tasks(1)
    await silent.ended(timeout=5)
    alive = await fast_srv.shepherd("alive")
    [attempt2] = await alive.tasks(1)
    assert (attempt1.attempt_number, attempt2.attempt_number) == (1, 2)
    alive.succeed(attempt2)
    await wait_state(fast_srv.client, task_id, "succeeded")
    status = await fast_srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert status.attempts[0].state == "lost"


async def test_heartbeats_keep_a_stream_alive_and_pings_arrive(fast_srv: RunningServer) -> None:
    shepherd = await fast_srv.shepherd()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0  # more than twice the heartbeat timeout
    pings = 0
    while loop.time() < deadline:
        shepherd.send(pbo.ClientMsg(status=pbo.Status(current_load=0, available_capacity=8)))
        try:
            message = await shepherd.recv(timeout=0.1, skip_pings=False)
        except TimeoutError:
            continue
        assert message.WhichOneof("kind") == "ping"
        assert message.ping.timestamp > 0
        pings += 1
    assert pings >= 3
    assert [s.shepherd_id for s in fast_srv.orchestrator.shepherds()] == ["shepherd-1"]


async def test_unknown_result_ids_are_ignored(srv: RunningServer) -> None:
    shepherd = await srv.shepherd()
    shepherd.send(pbo.ClientMsg(task_result=pbc.TaskResult(
        task_id="not-a-uuid", attempt_number=1, success=pbc.SuccessResult())))
    [task_id] = await create(srv)
    [task] = await shepherd.tasks(1)
    shepherd.succeed(task)
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.state == "succeeded"


async def test_reconnecting_shepherd_replaces_its_old_stream(srv: RunningServer) -> None:
    [task_id] = await create(srv)
    old = await srv.shepherd("same-id")
    [attempt1] = await old.tasks(1)
    new = await srv.shepherd("same-id")
    await old.ended()  # the new stream wins; the old one is closed
    [attempt2] = await new.tasks(1)
    assert (attempt1.attempt_number, attempt2.attempt_number) == (1, 2)
    new.succeed(attempt2)
    await wait_state(srv.client, task_id, "succeeded")


async def test_reconnect_over_a_live_stream_keeps_the_attempts_it_reports(
        srv: RunningServer) -> None:
    """A shepherd whose old stream is not dead yet (e.g. a partition) reconnects: the attempts
    it says it still runs move to the new stream instead of being lost and run twice."""
    [task_id] = await create(srv)
    old = await srv.shepherd("same-id")
    [attempt] = await old.tasks(1)
    new = await srv.shepherd("same-id", running=((task_id, 1),))
    assert new.hello_ack is not None
    assert list(new.hello_ack.cancel) == []
    await old.ended()
    with pytest.raises(TimeoutError):  # no second attempt anywhere
        await new.recv(timeout=0.3)
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert (status.state, [a.number for a in status.attempts]) == ("running", [1])
    new.succeed(attempt, pbc.AnyValue(int_value=1))
    await wait_state(srv.client, task_id, "succeeded")
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert [(a.number, a.state) for a in status.attempts] == [(1, "succeeded")]
