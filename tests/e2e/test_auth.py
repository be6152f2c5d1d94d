"""Token authentication and domain scoping over real gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from azolla.adapters.grpc.auth import Principal, TokenAuthInterceptor, hash_token
from azolla.adapters.grpc.pb import orchestrator_pb2 as pb
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as rpc
from azolla.adapters.grpc.server import GrpcServer, GrpcServerOptions
from azolla.adapters.memory.event_store import InMemoryEventStore
from azolla.app.orchestrator import Orchestrator

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(30)]

TOKENS = {
    hash_token("alpha-client"): Principal("alpha", frozenset({"alpha"}), frozenset({"client"})),
    hash_token("ops"): Principal("ops", frozenset({"*"}), frozenset({"client", "admin"})),
    hash_token("shepherd"): Principal("sh", frozenset({"alpha"}), frozenset({"shepherd"})),
}


@pytest.fixture
async def address() -> AsyncIterator[str]:
    orch = Orchestrator(InMemoryEventStore())
    await orch.start()
    server = GrpcServer(orch, GrpcServerOptions(port=0),
                        interceptors=[TokenAuthInterceptor(TOKENS)])
    await server.start()
    yield server.address
    await server.stop(0)
    await orch.stop()


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def test_missing_or_wrong_token_is_unauthenticated(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.ClientServiceStub(channel)
        request = pb.CreateTaskRequest(name="t", domain="alpha")
        assert await _code(stub.CreateTask(request)) is grpc.StatusCode.UNAUTHENTICATED
        bad = stub.CreateTask(request, metadata=_md("alpha-client-x"))
        assert await _code(bad) is grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.CreateTask(request, metadata=_md("alpha-client"))
        assert ok.task_id


async def test_foreign_domain_tasks_are_not_found(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.ClientServiceStub(channel)
        beta = await stub.CreateTask(pb.CreateTaskRequest(name="t", domain="beta"),
                                     metadata=_md("ops"))
        alpha = _md("alpha-client")
        status = stub.GetTaskStatus(pb.GetTaskStatusRequest(task_id=beta.task_id, domain="beta"),
                                    metadata=alpha)
        assert await _code(status) is grpc.StatusCode.NOT_FOUND
        cancel = stub.CancelTask(pb.CancelTaskRequest(task_id=beta.task_id, domain="beta"),
                                 metadata=alpha)
        assert await _code(cancel) is grpc.StatusCode.NOT_FOUND
        # Asking in its own domain for the other domain's id: the same answer as any unknown id.
        own = stub.GetTaskStatus(pb.GetTaskStatusRequest(task_id=beta.task_id, domain="alpha"),
                                 metadata=alpha)
        assert await _code(own) is grpc.StatusCode.NOT_FOUND
        create = stub.CreateTask(pb.CreateTaskRequest(name="t", domain="beta"), metadata=alpha)
        assert await _code(create) is grpc.StatusCode.PERMISSION_DENIED
        batch = stub.CreateTasks(pb.CreateTasksRequest(tasks=[
            pb.CreateTaskRequest(name="t", domain="alpha"),
            pb.CreateTaskRequest(name="t", domain="beta")]), metadata=alpha)
        assert await _code(batch) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_foreign_domain_batch_on_a_submit_stream_fails_only_itself(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.ClientServiceStub(channel)
        stream = stub.SubmitTasks(metadata=_md("alpha-client"))
        batches = {
            1: [pb.CreateTaskRequest(name="t", domain="alpha")],
            2: [pb.CreateTaskRequest(name="t", domain="alpha"),
                pb.CreateTaskRequest(name="t", domain="beta")],
            3: [pb.CreateTaskRequest(name="t", domain="alpha")],
        }
        for batch_id, tasks in batches.items():
            await stream.write(pb.SubmitTasksRequest(batch_id=batch_id, tasks=tasks))
        await stream.done_writing()
        answers = {a.batch_id: a async for a in stream}
        assert await stream.code() is grpc.StatusCode.OK
        assert answers[2].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "beta" in answers[2].message
        assert not answers[2].tasks
        assert [(answers[i].code, len(answers[i].tasks)) for i in (1, 3)] == [(0, 1), (0, 1)]
        # Refused when the stream opens, before any message (so none is written: the write
        # could race with the refusal).
        unauthenticated = stub.SubmitTasks(metadata=_md("nobody"))
        assert await _code(unauthenticated.read()) is grpc.StatusCode.UNAUTHENTICATED


async def test_roles_are_enforced_and_health_stays_open(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.ClientServiceStub(channel)
        call = stub.CreateTask(pb.CreateTaskRequest(name="t", domain="alpha"),
                               metadata=_md("shepherd"))
        assert await _code(call) is grpc.StatusCode.PERMISSION_DENIED
        stream = rpc.ClusterServiceStub(channel).Stream(metadata=_md("shepherd"))
        await stream.write(pb.ClientMsg(hello=pb.Hello(shepherd_uuid="s", max_concurrency=1,
                                                       domain="beta")))
        assert await _code(stream.read()) is grpc.StatusCode.PERMISSION_DENIED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
