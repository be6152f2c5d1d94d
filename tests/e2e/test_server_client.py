"""ClientService end to end: a real server on loopback, driven with the raw generated stubs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import grpc
import grpc.aio
import pytest
from _server_harness import RunningServer, start_server, store_settings, wait_state
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from azolla import Client
from azolla.adapters.grpc.pb import common_pb2 as pbc
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as pbo_grpc

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def srv(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    server = await start_server(store_settings(request, request.param))
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def memory_srv(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    """For checks that do not depend on the store."""
    server = await start_server(store_settings(request, "memory"))
    try:
        yield server
    finally:
        await server.close()


async def create(srv: RunningServer, name: str = "greet", **fields: Any) -> str:
    response = await srv.client.CreateTask(pbo.CreateTaskRequest(name=name, **fields))
    return str(response.task_id)


async def expect_error(call: object, code: grpc.StatusCode, fragment: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert fragment in details
    assert "Traceback" not in details
    return details


# -- create, run, wait, status ---------------------------------------------------------------


async def test_create_run_wait_and_status(srv: RunningServer) -> None:
    task_id = await create(srv, args='["Alice", 25]', kwargs='{"x": 1}')
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    assert (task.task_id, task.name, task.attempt_number, task.domain) == (task_id, "greet", 1,
                                                                          "default")
    assert json.loads(task.args) == ["Alice", 25]
    shepherd.succeed(task, pbc.AnyValue(json_value='{"greeting": "hi"}'))
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.status_code == pbo.WAIT_FOR_TASK_STATUS_COMPLETED
    assert waited.state == "succeeded"
    assert json.loads(waited.success.result.json_value) == {"greeting": "hi"}
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert (status.state, status.status_code, status.name, status.domain) == (
        "succeeded", 3, "greet", "default")
    assert [(a.number, a.state, a.shepherd_id) for a in status.attempts] == [
        (1, "succeeded", "shepherd-1")]
    assert json.loads(status.args) == ["Alice", 25]
    assert status.created_at_ms > 0


async def test_scalar_results_use_their_own_fields(srv: RunningServer) -> None:
    ids = [await create(srv) for _ in range(3)]
    shepherd = await srv.shepherd()
    tasks = {t.task_id: t for t in await shepherd.tasks(3)}
    values = [pbc.AnyValue(int_value=7), pbc.AnyValue(string_value="s"),
              pbc.AnyValue(bool_value=True)]
    for task_id, value in zip(ids, values, strict=True):
        shepherd.succeed(tasks[task_id], value)
    fields = []
    for task_id in ids:
        waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id,
                                                                   timeout_ms=5000))
        fields.append(waited.success.result.WhichOneof("value"))
    assert fields == ["int_value", "string_value", "bool_value"]


async def test_failure_with_retries_and_history(srv: RunningServer) -> None:
    policy = pbc.RetryPolicy(version=1, stop=pbc.RetryPolicyStop(max_attempts=2),
                           wait=pbc.RetryPolicyWait(fixed=pbc.RetryPolicyFixedWait(delay=0.0)))
    task_id = await create(srv, retry_policy=policy)
    shepherd = await srv.shepherd()
    [first] = await shepherd.tasks(1)
    shepherd.fail(first, "ValueError")
    [second] = await shepherd.tasks(1)
    assert second.attempt_number == 2
    shepherd.fail(second, "ValueError")
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert waited.state == "failed"
    assert waited.error.type == "ValueError"
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert status.status_code == 6
    assert [(a.number, a.state, a.error.type) for a in status.attempts] == [
        (1, "failed", "ValueError"), (2, "failed", "ValueError")]


async def test_non_retriable_error_stops_retries(srv: RunningServer) -> None:
    task_id = await create(srv)
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    shepherd.fail(task, "ValueError", retriable=False)
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    assert (waited.state, waited.error.retriable) == ("failed", False)


# -- batches and idempotency -----------------------------------------------------------------


async def test_batch_create_is_one_call_in_order(srv: RunningServer) -> None:
    response = await srv.client.CreateTasks(pbo.CreateTasksRequest(tasks=[
        pbo.CreateTaskRequest(name="t", args=f"[{i}]") for i in range(50)]))
    assert len(response.tasks) == 50
    shepherd = await srv.shepherd(capacity=100)
    pushed = await shepherd.tasks(50)
    by_id = {t.task_id: json.loads(t.args)[0] for t in pushed}
    assert [by_id[r.task_id] for r in response.tasks] == list(range(50))


async def test_batch_is_all_or_nothing(srv: RunningServer) -> None:
    before = len(srv.orchestrator.taskset.tasks)
    call = srv.client.CreateTasks(pbo.CreateTasksRequest(tasks=[
        pbo.CreateTaskRequest(name="ok"), pbo.CreateTaskRequest(name="bad", args="{}")]))
    details = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "tasks[1]")
    assert "args" in details
    assert len(srv.orchestrator.taskset.tasks) == before


async def test_empty_batch(srv: RunningServer) -> None:
    response = await srv.client.CreateTasks(pbo.CreateTasksRequest())
    assert list(response.tasks) == []


async def test_idempotency_key_returns_the_same_task(srv: RunningServer) -> None:
    first = await srv.client.CreateTask(pbo.CreateTaskRequest(name="t", idempotency_key="order-7"))
    again = await srv.client.CreateTask(pbo.CreateTaskRequest(name="t", idempotency_key="order-7"))
    other = await srv.client.CreateTask(pbo.CreateTaskRequest(name="t", idempotency_key="order-7",
                                                            domain="elsewhere"))
    assert (first.deduplicated, again.deduplicated) == (False, True)
    assert again.task_id == first.task_id
    assert other.task_id != first.task_id
    batch = await srv.client.CreateTasks(pbo.CreateTasksRequest(tasks=[
        pbo.CreateTaskRequest(name="t", idempotency_key="order-7"),
        pbo.CreateTaskRequest(name="t", idempotency_key="order-8"),
        pbo.CreateTaskRequest(name="t", idempotency_key="order-8")]))
    assert [t.task_id == first.task_id for t in batch.tasks] == [True, False, False]
    assert batch.tasks[1].task_id == batch.tasks[2].task_id


# -- the SubmitTasks stream --------------------------------------------------------------------


def _batch(batch_id: int, *tasks: pbo.CreateTaskRequest) -> pbo.SubmitTasksRequest:
    return pbo.SubmitTasksRequest(batch_id=batch_id, tasks=tasks)


async def test_submit_stream_answers_each_batch_with_its_own_status(srv: RunningServer) -> None:
    before = len(srv.orchestrator.taskset.tasks)
    stream = srv.client.SubmitTasks()
    await stream.write(_batch(7, pbo.CreateTaskRequest(name="a", args="[1]"),
                              pbo.CreateTaskRequest(name="a", args="[2]")))
    await stream.write(_batch(8, pbo.CreateTaskRequest(name="ok"),
                              pbo.CreateTaskRequest(name="bad", args="{}")))
    await stream.write(_batch(9))
    await stream.write(_batch(10, pbo.CreateTaskRequest(name="k", idempotency_key="s-1"),
                              pbo.CreateTaskRequest(name="k", idempotency_key="s-1")))
    await stream.done_writing()
    answers = {answer.batch_id: answer async for answer in stream}
    assert await stream.code() == grpc.StatusCode.OK  # a bad batch does not end the stream
    assert sorted(answers) == [7, 8, 9, 10]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (answers[8].code, list(answers[8].tasks)) == (invalid, [])
    assert answers[8].message.startswith("tasks[1]: ")
    assert "args" in answers[8].message
    assert (answers[9].code, answers[9].message) == (
        invalid, "a SubmitTasks message must hold at least one task")
    assert [answers[7].code, answers[10].code] == [0, 0]
    assert [t.deduplicated for t in answers[10].tasks] == [False, True]
    assert answers[10].tasks[0].task_id == answers[10].tasks[1].task_id
    assert len(srv.orchestrator.taskset.tasks) == before + 3  # nothing of batch 8
    shepherd = await srv.shepherd(capacity=10)
    pushed = {t.task_id: json.loads(t.args) for t in await shepherd.tasks(3)}
    assert [pushed[t.task_id] for t in answers[7].tasks] == [[1], [2]]


async def test_submit_stream_serves_many_batches_in_flight(srv: RunningServer) -> None:
    stream = srv.client.SubmitTasks()
    batches = 150  # more than a stream may have in progress: reading pauses, nothing is lost

    async def send() -> None:
        for batch_id in range(batches):
            await stream.write(_batch(batch_id, *(
                pbo.CreateTaskRequest(name="m", args=f"[{batch_id}, {i}]") for i in range(4))))
        await stream.done_writing()

    sender = asyncio.ensure_future(send())
    answers = [answer async for answer in stream]
    await sender
    assert sorted(a.batch_id for a in answers) == list(range(batches))
    assert {a.code for a in answers} == {0}
    ids = [t.task_id for a in answers for t in a.tasks]
    assert len(set(ids)) == 4 * batches
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=ids[-1]))
    assert status.name == "m"


async def test_batches_over_the_size_limit_are_refused(request: pytest.FixtureRequest) -> None:
    server = await start_server(store_settings(request, "memory", max_batch=3))
    try:
        four = [pbo.CreateTaskRequest(name="t") for _ in range(4)]
        await expect_error(server.client.CreateTasks(pbo.CreateTasksRequest(tasks=four)),
                           grpc.StatusCode.INVALID_ARGUMENT,
                           "a CreateTasks request may hold at most 3 tasks, got 4")
        stream = server.client.SubmitTasks()
        await stream.write(_batch(1, *four))
        await stream.write(_batch(2, *four[:3]))
        await stream.done_writing()
        answers = {answer.batch_id: answer async for answer in stream}
        assert answers[1].message == "a SubmitTasks message may hold at most 3 tasks, got 4"
        assert (answers[2].code, len(answers[2].tasks)) == (0, 3)
        assert len(server.orchestrator.taskset.tasks) == 3
    finally:
        await server.close()


async def test_shutdown_ends_idle_client_streams_instead_of_waiting_out_its_grace(
        request: pytest.FixtureRequest) -> None:
    server = await start_server(store_settings(request, "memory", shutdown_grace_seconds=20))
    closed = False
    try:
        async with Client(f"http://{server.server.address}", timeout=10) as client:
            handle = await client.submit_task("t").submit()  # opens the SubmitTasks stream
            waiting = asyncio.ensure_future(handle.wait(timeout=60))  # and a WatchTasks one
            channel = grpc.aio.insecure_channel(server.server.address)  # not the harness's
            raw = pbo_grpc.ClientServiceStub(channel).SubmitTasks()
            await raw.write(_batch(1, pbo.CreateTaskRequest(name="late")))
            first = await raw.read()
            assert (first.batch_id, first.code) == (1, 0)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await server.close()
            closed = True
            # Before drain, the open streams held the shutdown for the whole grace (20 s).
            assert time.monotonic() - started < 5
            assert await raw.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (await raw.details() or "")
            await channel.close()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
    finally:
        if not closed:
            await server.close()


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"name": "t", "args": '{"a": 1}'}, "args must be a JSON array"),
        ({"name": "t", "args": "[1,"}, "args is not valid JSON"),
        ({"name": "t", "kwargs": "[1]"}, "kwargs must be a JSON object"),
        ({"name": ""}, "task name must not be empty"),
        ({"name": "x" * 300}, "task name is 300 characters long"),
        ({"name": "t", "args": "[" * 10_000 + "]" * 10_000}, "nests deeper"),
        ({"name": "t", "kwargs": '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}"}, "nests deeper"),
        ({"name": "t", "args": '["' + "x" * (1 << 20) + '"]'}, "larger than"),
        ({"name": "t", "timeout_ms": 0}, "timeout"),
        ({"name": "t", "idempotency_key": ""}, "idempotency key"),
        ({"name": "t", "retry_policy": pbc.RetryPolicy(stop=pbc.RetryPolicyStop(max_attempts=0))},
         "max_attempts"),
        ({"name": "t", "retry_policy": pbc.RetryPolicy(wait=pbc.RetryPolicyWait(
            exponential=pbc.RetryPolicyExponentialWait(initial_delay=1, multiplier=1e9,
                                                     max_delay=5)))}, "multiplier"),
        ({"name": "t", "retry_policy": pbc.RetryPolicy(version=9)}, "version"),
    ],
)
async def test_invalid_arguments(memory_srv: RunningServer, fields: dict[str, Any],
                                 fragment: str) -> None:
    details = await expect_error(memory_srv.client.CreateTask(pbo.CreateTaskRequest(**fields)),
                                 grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert len(details) < 500


async def test_flow_instance_is_unimplemented(memory_srv: RunningServer) -> None:
    await expect_error(memory_srv.client.CreateTask(pbo.CreateTaskRequest(name="t",
                                                                 flow_instance_id="f")),
                       grpc.StatusCode.UNIMPLEMENTED, "flows")


async def test_flow_rpcs_are_unimplemented(memory_srv: RunningServer) -> None:
    client = memory_srv.client
    await expect_error(client.CreateFlow(pbo.CreateFlowRequest(name="f", dag="{}")),
                       grpc.StatusCode.UNIMPLEMENTED)
    await expect_error(client.WaitForFlow(pbo.WaitForFlowRequest(flow_id="f")),
                       grpc.StatusCode.UNIMPLEMENTED)
    await expect_error(client.PublishTaskEvent(pbo.PublishTaskEventRequest(task_instance_id="t")),
                       grpc.StatusCode.UNIMPLEMENTED)
    await expect_error(client.PublishFlowEvent(pbo.PublishFlowEventRequest(flow_instance_id="f")),
                       grpc.StatusCode.UNIMPLEMENTED)


# -- unknown tasks ---------------------------------------------------------------------------


async def test_unknown_tasks(srv: RunningServer) -> None:
    known = await create(srv)
    for task_id, domain in ((str(uuid4()), ""), ("not-a-uuid", ""), (known, "other-domain")):
        waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id,
                                                                   domain=domain, timeout_ms=0))
        assert waited.status_code == pbo.WAIT_FOR_TASK_STATUS_TASK_NOT_FOUND
        await expect_error(srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(
            task_id=task_id, domain=domain)), grpc.StatusCode.NOT_FOUND, "not found")
        await expect_error(srv.client.CancelTask(pbo.CancelTaskRequest(
            task_id=task_id, domain=domain)), grpc.StatusCode.NOT_FOUND)
        watch = srv.client.WatchTask(pbo.WatchTaskRequest(task_id=task_id, domain=domain))
        await expect_error(watch.read(), grpc.StatusCode.NOT_FOUND)


# -- waiting ---------------------------------------------------------------------------------


async def test_wait_timeouts(srv: RunningServer) -> None:
    task_id = await create(srv)
    started = time.monotonic()
    check = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=0))
    assert check.status_code == pbo.WAIT_FOR_TASK_STATUS_TIMEOUT
    short = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=200))
    assert short.status_code == pbo.WAIT_FOR_TASK_STATUS_TIMEOUT
    assert time.monotonic() - started >= 0.2
    # No timeout: bounded by the deadline, answered TIMEOUT just before it.
    bounded = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id), timeout=0.5)
    assert bounded.status_code == pbo.WAIT_FOR_TASK_STATUS_TIMEOUT


async def test_wait_is_woken_by_the_commit(srv: RunningServer) -> None:
    task_id = await create(srv)
    waiter = asyncio.ensure_future(srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id)))
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    await asyncio.sleep(0.05)
    assert not waiter.done()
    shepherd.succeed(task, pbc.AnyValue(int_value=1))
    started = time.monotonic()
    waited = await asyncio.wait_for(waiter, 5)
    assert waited.success.result.int_value == 1
    assert time.monotonic() - started < 1.0


# -- cancel ----------------------------------------------------------------------------------


async def test_cancel_queued_then_again(srv: RunningServer) -> None:
    task_id = await create(srv)
    first = await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=task_id, reason="no need"))
    assert (first.cancelled, first.state) == (True, "cancelled")
    again = await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=task_id))
    assert (again.cancelled, again.state) == (False, "cancelled")
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=0))
    assert (waited.status_code, waited.state) == (pbo.WAIT_FOR_TASK_STATUS_COMPLETED, "cancelled")
    assert waited.error.type == "Cancelled"
    status = await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=task_id))
    assert (status.state, status.status_code) == ("cancelled", 6)


async def test_cancel_running_tells_the_shepherd(srv: RunningServer) -> None:
    task_id = await create(srv)
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    response = await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=task_id))
    assert response.cancelled
    message = await shepherd.recv()
    assert message.WhichOneof("kind") == "cancel"
    assert (message.cancel.task_id, message.cancel.attempt_number) == (task_id, 1)
    shepherd.succeed(task)  # too late: rejected, the task stays cancelled
    waited = await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=0))
    assert waited.state == "cancelled"


async def test_cancel_finished_task(srv: RunningServer) -> None:
    task_id = await create(srv)
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    shepherd.succeed(task)
    await srv.client.WaitForTask(pbo.WaitForTaskRequest(task_id=task_id, timeout_ms=5000))
    response = await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=task_id))
    assert (response.cancelled, response.state) == (False, "succeeded")


# -- watching --------------------------------------------------------------------------------


async def test_watch_task_streams_until_terminal(srv: RunningServer) -> None:
    task_id = await create(srv)
    updates: list[pbo.TaskUpdate] = []

    async def follow() -> None:
        async for update in srv.client.WatchTask(pbo.WatchTaskRequest(task_id=task_id)):
            updates.append(update)

    follower = asyncio.ensure_future(follow())
    await wait_state(srv.client, task_id, "queued")
    shepherd = await srv.shepherd()
    [task] = await shepherd.tasks(1)
    await wait_state(srv.client, task_id, "running")
    shepherd.succeed(task, pbc.AnyValue(string_value="done"))
    await asyncio.wait_for(follower, 5)
    assert [u.state for u in updates] == ["queued", "running", "succeeded"]
    assert [u.terminal for u in updates] == [False, False, True]
    assert updates[-1].attempt_number == 1
    assert updates[-1].success.result.string_value == "done"


async def test_watch_finished_task_sends_one_update(srv: RunningServer) -> None:
    task_id = await create(srv)
    await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=task_id))
    updates = [u async for u in srv.client.WatchTask(pbo.WatchTaskRequest(task_id=task_id))]
    assert [(u.state, u.terminal) for u in updates] == [("cancelled", True)]


async def test_watch_tasks_batches_outcomes(srv: RunningServer) -> None:
    done = await create(srv)
    await srv.client.CancelTask(pbo.CancelTaskRequest(task_id=done))
    pending = [await create(srv) for _ in range(3)]
    unknown = str(uuid4())
    requests: asyncio.Queue[pbo.WatchTasksRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[pbo.WatchTasksRequest]:
        while (request := await requests.get()) is not None:
            yield request

    call = srv.client.WatchTasks(outgoing())
    requests.put_nowait(pbo.WatchTasksRequest(task_ids=[done, unknown, *pending]))
    first = await asyncio.wait_for(call.read(), 5)
    assert isinstance(first, pbo.WatchTasksResponse)
    assert {(o.task_id, o.status_code) for o in first.outcomes} == {
        (done, pbo.WAIT_FOR_TASK_STATUS_COMPLETED),
        (unknown, pbo.WAIT_FOR_TASK_STATUS_TASK_NOT_FOUND)}
    shepherd = await srv.shepherd()
    tasks = {t.task_id: t for t in await shepherd.tasks(3)}
    # Two results in one message: one commit, so one response with both outcomes.
    shepherd.send(pbo.ClientMsg(task_results=pbo.TaskResultBatch(results=[
        pbc.TaskResult(task_id=t, attempt_number=1,
                     success=pbc.SuccessResult(result=pbc.AnyValue(int_value=i)))
        for i, t in enumerate(pending[:2])])))
    second = await asyncio.wait_for(call.read(), 5)
    assert isinstance(second, pbo.WatchTasksResponse)
    assert sorted(o.task_id for o in second.outcomes) == sorted(pending[:2])
    assert all(o.state == "succeeded" for o in second.outcomes)
    requests.put_nowait(None)  # half-close: the stream ends once the last id is answered
    shepherd.fail(tasks[pending[2]], retriable=False)
    third = await asyncio.wait_for(call.read(), 5)
    assert isinstance(third, pbo.WatchTasksResponse)
    assert [(o.task_id, o.state) for o in third.outcomes] == [(pending[2], "failed")]
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF


# -- health and reflection -------------------------------------------------------------------


async def test_health_and_reflection(memory_srv: RunningServer) -> None:
    srv = memory_srv
    health = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "azolla.orchestrator.ClientService",
                    "azolla.orchestrator.ClusterService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(ask()):
        names.update(s.name for s in response.list_services_response.service)
    assert {"azolla.orchestrator.ClientService", "azolla.orchestrator.ClusterService",
            "grpc.health.v1.Health"} <= names
