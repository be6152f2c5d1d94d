"""Hypothesis fuzzing of every request type through the real server (memory store, loopback).

Strategies are built from the protobuf descriptors, so every field of every request message
(nested messages, oneofs, repeated fields, presence) is covered without a hand-written list; the
strings are biased towards what breaks servers: ids of existing tasks, empty and huge text,
quotes, ``$1``, NUL, JSON fragments, 70-deep brackets. Each test runs one in-process server and
sends the drawn requests to it, as a foreign client would:

* ``ClientService`` and ``AdminService``: every answer is OK or a well-formed status from the
  documented set (never ``INTERNAL``/``UNKNOWN``, a message without a traceback);
* ``ClusterService``: interactive shepherd sessions -- a Hello (or not), then a drawn mix of
  arbitrary ``ClientMsg`` values and plausible acks/results for the attempts actually pushed
  (current, stale, future and zero attempt numbers), ended cleanly or by cancellation;
* raw bytes: ``INTERNAL`` only when the bytes do not parse as the request type (the code gRPC
  documents for "error parsing request proto"), otherwise as above.

After every example the event log must keep the domain's invariants (:func:`check_log`): at
most one terminal event per task, nothing after it, attempts numbered 1, 2, 3... within the
policy's limit, at most one end per attempt, one task per idempotency key; and the server stays
healthy. Deterministic (``derandomize=True``, no example database) and bounded
(``max_examples``, short deadlines on waiting calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import grpc
import grpc.aio
import pytest
from _server_harness import STEP, RunningServer, start_server
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from azolla.adapters.grpc.pb import common_pb2 as pbc
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc
from azolla.app.settings import Settings
from azolla.domain.events import TERMINAL_TYPES

pytestmark = [pytest.mark.grpc, pytest.mark.slow, pytest.mark.timeout(180)]

SERVICES = {name: pbo.DESCRIPTOR.services_by_name[name]
            for name in ("ClientService", "AdminService", "ClusterService")}
#: Statuses a servicer may answer to any request (INTERNAL and UNKNOWN are never right).
ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
#: Calls that may legitimately wait: a short client deadline ends them.
WAITING = frozenset({"WaitForTask", "WatchTask", "WatchTasks", "TailEvents"})
WAIT_DEADLINE = 0.25

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

#: Ids of tasks that exist on the server under test (filled before each test draws).
KNOWN_IDS: list[str] = []

INTERESTING = [
    "", "default", "other", " ", "*", "a\x00b", "'; DROP TABLE azolla_events; --", "$1",
    "%s%n{0}", "{}", "[]", '[1, "x", {"k": null}]', '{"k": [1, {"n": -0.0}]}', "null", "NaN",
    "[" * 70 + "]" * 70, '{"a":' * 70 + "1" + "}" * 70, "\u202e\u200b", "é𝄞", "x" * 300,
    "00000000-0000-0000-0000-000000000000", "queued", "failed", "running", "cancelled",
    "retry_wait", "succeeded", "InfrastructureError", "Timeout", "ValueError",
]

known_ids = st.integers(0, 10**6).map(
    lambda i: KNOWN_IDS[i % len(KNOWN_IDS)] if KNOWN_IDS else "")
strings = st.one_of(st.sampled_from(INTERESTING), st.text(max_size=24), known_ids)
#: Fields whose plausible values reach deeper into the server than arbitrary text does: two
#: draws in three are plausible.
PLAUSIBLE: dict[str, st.SearchStrategy[str]] = {
    "task_id": known_ids, "task_ids": known_ids, "task_instance_id": known_ids,
    "domain": st.sampled_from(["", "default", "other"]),
    "name": st.sampled_from(["a", "b", "seed-0"]),
    "args": st.sampled_from(["", "[]", "[1, 2]", '["x", {"k": null}]']),
    "kwargs": st.sampled_from(["", "{}", '{"k": [1]}']),
    "state": st.sampled_from(["", "queued", "failed", "cancelled"]),
    "idempotency_key": st.sampled_from(["key-0", "key-1", "fuzz-key"]),
}
#: Fields that are mostly left unset (setting them only selects an UNIMPLEMENTED branch).
RARELY_SET = frozenset({"flow_instance_id"})

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        plausible = PLAUSIBLE.get(field.name)
        return strings if plausible is None else st.one_of(plausible, plausible, strings)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 64 if kind == FieldDescriptor.TYPE_DOUBLE else 32
        return st.one_of(st.sampled_from([0.0, -1.0, 1e300, float("inf"), float("nan")]),
                         st.floats(width=width))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(-(2**31), 2**31 - 1))  # proto3 enums are open
    low, high = _INT_RANGES[kind]
    edges = sorted({low, high, 0, 1, 2, 3, min(high, 10_000), min(high, 10_001)}
                   | ({-1} if low < 0 else set()))
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Arbitrary messages of ``descriptor``: any subset of fields (at most one per oneof)."""
    message_class = GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class()
        groups: dict[str, list[FieldDescriptor]] = defaultdict(list)
        for field in descriptor.fields:
            key = field.containing_oneof.name if field.containing_oneof else field.name
            groups[key].append(field)
        for members in groups.values():
            chosen = draw(st.sampled_from([*members, None]))
            if chosen is None or (chosen.name in RARELY_SET and draw(st.integers(0, 9))):
                continue
            _fill(draw, message, chosen, depth)
        return message

    return build()


def _fill(draw: st.DrawFn, message: Message, field: FieldDescriptor, depth: int) -> None:
    repeated = field.is_repeated
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 3:
            return
        sub = messages(field.message_type, depth + 1)
        if repeated:
            container = getattr(message, field.name)
            for item in draw(st.lists(sub, max_size=3)):
                container.add().CopyFrom(item)
        else:
            getattr(message, field.name).CopyFrom(draw(sub))
        return
    values = _scalar(field)
    if repeated:
        getattr(message, field.name).extend(draw(st.lists(values, max_size=3)))
    else:
        setattr(message, field.name, draw(values))


def methods(service: str) -> list[MethodDescriptor]:
    return list(SERVICES[service].methods)


# -- invariants --------------------------------------------------------------------------------


async def check_log(srv: RunningServer) -> None:
    """Assert the domain's invariants over the whole event log."""
    await srv.orchestrator.idle()
    events = await srv.orchestrator.store.read_all(0, 10**7)
    streams: dict[UUID, list[Any]] = defaultdict(list)
    for stored in events:
        streams[stored.stream_id].append(stored)
    keys: dict[tuple[str, str], UUID] = {}
    for stream_id, stream in streams.items():
        types = [e.type for e in stream]
        assert [e.version for e in stream] == list(range(1, len(stream) + 1)), stream_id
        terminal = [i for i, e in enumerate(stream) if e.terminal or e.type in TERMINAL_TYPES]
        assert len(terminal) <= 1, f"{stream_id}: {len(terminal)} terminal events {types}"
        if types[0] == "TaskSubmitted.v1":
            assert not terminal or terminal[0] == len(stream) - 1, f"{stream_id}: {types}"
            submitted = json.loads(stream[0].payload)
            attempts = [json.loads(e.payload)["attempt"] for e in stream
                        if e.type == "TaskAttemptStarted.v1"]
            assert attempts == list(range(1, len(attempts) + 1)), f"{stream_id}: {attempts}"
            limit = submitted["retry_policy"]["max_attempts"]
            assert limit is None or len(attempts) <= limit, f"{stream_id}: {attempts} > {limit}"
            key = submitted.get("idempotency_key")
            if key is not None:
                owner = keys.setdefault((stream[0].domain, key), stream_id)
                assert owner == stream_id, f"idempotency key {key!r} names two tasks"
        elif types[0] == "AttemptAssigned.v1":
            ended = types.count("AttemptEnded.v1")
            assert ended <= 1, f"attempt {stream_id} ended {ended} times"
            if ended:
                after = types[types.index("AttemptEnded.v1") + 1:]
                assert "AttemptRunning.v1" not in after, f"attempt {stream_id}: {types}"


async def check_healthy(srv: RunningServer) -> None:
    reply = await health_pb2_grpc.HealthStub(srv.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=STEP)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    created = await srv.client.CreateTask(pbo.CreateTaskRequest(name="still-serving"),
                                          timeout=STEP)
    await srv.client.GetTaskStatus(pbo.GetTaskStatusRequest(task_id=created.task_id),
                                   timeout=STEP)


def assert_well_formed(code: grpc.StatusCode, details: str, what: str,
                       allowed: frozenset[grpc.StatusCode] = ALLOWED) -> None:
    assert code in allowed, f"{what}: {code.name} {details[:300]!r}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{what}: {code.name} without a message"
        assert "Traceback" not in details, f"{what}: {details[:300]!r}"


# -- the server under test ---------------------------------------------------------------------


@contextlib.contextmanager
def fuzz_server(**extra: Any) -> Iterator[tuple[asyncio.Runner, RunningServer]]:
    """A server (memory store) and the event loop its channel lives on, with seed tasks."""
    with asyncio.Runner() as runner:
        srv = runner.run(start_server(Settings(store="memory", port=0, **extra)))
        try:
            KNOWN_IDS[:] = runner.run(_seed(srv))
            yield runner, srv
            runner.run(check_log(srv))
            runner.run(check_healthy(srv))
        finally:
            KNOWN_IDS.clear()
            runner.run(srv.close())


async def _seed(srv: RunningServer) -> list[str]:
    """Tasks in every state, in two domains, some with idempotency keys."""
    client = srv.client
    ids = [(await client.CreateTask(pbo.CreateTaskRequest(
        name=f"seed-{i}", domain=domain, idempotency_key=f"key-{i}"), timeout=STEP)).task_id
           for i, domain in enumerate(["", "other", "default", ""])]
    shepherd = await srv.shepherd("seeder", capacity=4)
    tasks = await shepherd.tasks(3)
    shepherd.succeed(tasks[0])
    shepherd.fail(tasks[1], retriable=False)
    await client.CancelTask(pbo.CancelTaskRequest(task_id=tasks[2].task_id,
                                                  domain=tasks[2].domain), timeout=STEP)
    await srv.orchestrator.idle()
    shepherd.cancel()
    await srv.orchestrator.idle()
    ids.append((await client.CreateTask(pbo.CreateTaskRequest(name="seed-queued"),
                                        timeout=STEP)).task_id)
    return ids


async def call(srv: RunningServer, service: str, method: MethodDescriptor,
               requests: list[Message]) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with the drawn request(s); return the final status."""
    stub: Any = {"ClientService": srv.client,
                 "AdminService": orchestrator_pb2_grpc.AdminServiceStub(srv.channel)}[service]
    function = getattr(stub, method.name)
    deadline = WAIT_DEADLINE if method.name in WAITING else STEP
    try:
        if not method.client_streaming and not method.server_streaming:
            await function(requests[0], timeout=deadline)
        elif not method.client_streaming:
            stream = function(requests[0], timeout=deadline)
            for _ in range(3):
                if await stream.read() is grpc.aio.EOF:
                    break
            stream.cancel()
        else:
            stream = function(timeout=deadline)
            for request in requests:
                await stream.write(request)
            await stream.done_writing()
            while await stream.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name in WAITING:
            return grpc.StatusCode.OK, ""
        return code, details
    return grpc.StatusCode.OK, ""


def _requests_for(service: str) -> st.SearchStrategy[tuple[MethodDescriptor, list[Message]]]:
    return st.sampled_from(methods(service)).flatmap(
        lambda m: st.tuples(st.just(m), st.lists(messages(m.input_type), min_size=1,
                                                 max_size=3 if m.client_streaming else 1)))


# -- the tests ---------------------------------------------------------------------------------


def test_fuzz_client_service() -> None:
    with fuzz_server() as (runner, srv):

        @settings(FUZZ, max_examples=250)
        @given(drawn=_requests_for("ClientService"))
        def check(drawn: tuple[MethodDescriptor, list[Message]]) -> None:
            method, requests = drawn
            code, details = runner.run(call(srv, "ClientService", method, requests))
            event(f"{method.name}: {code.name}")  # see --hypothesis-show-statistics
            assert_well_formed(code, details, f"ClientService.{method.name}({requests[0]})")
            runner.run(check_log(srv))

        check()


def test_fuzz_admin_service() -> None:
    with fuzz_server() as (runner, srv):

        @settings(FUZZ, max_examples=120)
        @given(drawn=_requests_for("AdminService"))
        def check(drawn: tuple[MethodDescriptor, list[Message]]) -> None:
            method, requests = drawn
            code, details = runner.run(call(srv, "AdminService", method, requests))
            event(f"{method.name}: {code.name}")
            assert_well_formed(code, details, f"AdminService.{method.name}({requests[0]})")
            runner.run(check_log(srv))

        check()


@pytest.mark.parametrize("service", ["ClientService", "AdminService", "ClusterService"])
def test_fuzz_raw_bytes(service: str) -> None:
    """Arbitrary bytes: INTERNAL exactly when they do not parse as the request type."""
    with fuzz_server(hello_timeout_ms=200) as (runner, srv):

        @settings(FUZZ, max_examples=60)
        @given(method=st.sampled_from(methods(service)), payload=st.one_of(
            st.binary(max_size=48),
            st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\x10abc", b"\x08\x80\x80\x80\x80\x80"
                             b"\x80\x80\x80\x80\x80\x01", b"\xff" * 8])))
        def check(method: MethodDescriptor, payload: bytes) -> None:
            try:
                GetMessageClass(method.input_type).FromString(payload)
                parses = True
            except DecodeError:
                parses = False
            code, details = runner.run(_raw(srv, service, method, payload))
            what = f"{service}.{method.name}({payload!r})"
            if not parses:
                assert code == grpc.StatusCode.INTERNAL, f"{what}: {code.name} {details!r}"
                assert details.startswith(
                    f"the request is not a valid {method.input_type.full_name} message"), what
            else:
                cluster = ALLOWED | {grpc.StatusCode.DEADLINE_EXCEEDED}  # a Hello never came
                assert_well_formed(code, details, what,
                                   cluster if service == "ClusterService" else ALLOWED)

        check()


async def _raw(srv: RunningServer, service: str, method: MethodDescriptor,
               payload: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{SERVICES[service].full_name}/{method.name}"
    deadline = WAIT_DEADLINE if method.name in WAITING else STEP
    try:
        if not method.client_streaming and not method.server_streaming:
            await srv.channel.unary_unary(path)(payload, timeout=deadline)
        elif not method.client_streaming:
            stream: Any = srv.channel.unary_stream(path)(payload, timeout=deadline)
            for _ in range(3):
                if await stream.read() is grpc.aio.EOF:
                    break
            stream.cancel()
        else:
            limit = 0.5 if service == "ClusterService" else deadline
            stream = srv.channel.stream_stream(path)(timeout=limit)
            await stream.write(payload)
            if service != "ClusterService":
                await stream.done_writing()
            for _ in range(3):
                if await stream.read() is grpc.aio.EOF:
                    break
            stream.cancel()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name in WAITING:
            return grpc.StatusCode.OK, ""
        return code, exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- shepherd sessions ---------------------------------------------------------------------------

ACTIONS = ["arbitrary", "ack", "succeed", "fail", "fail-batch", "status", "pause"]
#: What grpc.aio's *client* reports (``set_internal_error``) when it writes into a
#: bidirectional call the server has already ended: not a status the server sent. The server
#: ends a shepherd stream mid-session on purpose (a second Hello, results it cannot record).
CLIENT_WRITE_RACE = "Internal error from Core"


class _Session:
    """One fuzzed ClusterService stream, written to message by message (no request iterator:
    cancelling a call whose iterator is waiting makes grpc close a running generator)."""

    def __init__(self, srv: RunningServer) -> None:
        self.call = srv.cluster.Stream(timeout=30)
        self.pushed: list[Any] = []
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self.answered = asyncio.Event()  # the first reply (HelloAck), or the end, came
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, message: pbo.ClientMsg) -> None:
        """Write a message; once the server has ended the stream, writes are dropped."""
        if self.ended is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.call.write(message)

    async def _read(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                assert isinstance(message, pbo.ServerMsg)
                self.answered.set()
                kind = message.WhichOneof("kind")
                if kind == "task":
                    self.pushed.append(message.task)
                elif kind == "tasks":
                    self.pushed.extend(message.tasks.tasks)
            self.ended = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as exc:
            self.ended = (exc.code(), exc.details() or "")
        finally:
            self.answered.set()

    async def finish(self, clean: bool) -> tuple[grpc.StatusCode, str]:
        """Half-close and wait for the server's end (``clean``), or cancel the call."""
        if clean and self.ended is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.call.done_writing()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), STEP)
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return self.ended or (grpc.StatusCode.CANCELLED, "cancelled by the test")


def _draw_step(data: st.DataObject) -> tuple[Any, ...]:
    """One step of a shepherd session: the same draws whatever the server does."""
    return (data.draw(st.sampled_from(ACTIONS), label="action"),
            data.draw(st.integers(0, 2**16), label="which pushed task"),
            data.draw(st.sampled_from([0, 0, 0, -1, 1, "zero"]), label="attempt"),
            data.draw(messages(pbo.ClientMsg.DESCRIPTOR), label="arbitrary message"),
            data.draw(st.lists(messages(pbc.AnyValue.DESCRIPTOR), min_size=2, max_size=2),
                      label="values"),
            data.draw(st.lists(messages(pbc.ErrorResult.DESCRIPTOR), min_size=2, max_size=2),
                      label="errors"))


async def _shepherd_session(srv: RunningServer, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(0, 3), label="new tasks")):
        request = data.draw(st.builds(pbo.CreateTaskRequest, name=st.sampled_from(["a", "b"]),
                                      domain=st.sampled_from(["", "other"]),
                                      timeout_ms=st.sampled_from([50, 60_000])), label="task")
        created = await srv.client.CreateTask(request, timeout=STEP)
        KNOWN_IDS.append(created.task_id)
    hello = st.builds(
        pbo.Hello,
        shepherd_uuid=st.one_of(st.sampled_from(["fz-1", "fz-2", "fz-3"]), strings),
        max_concurrency=st.one_of(st.sampled_from([1, 2, 3]), st.integers(0, 2**32 - 1)),
        domain=st.sampled_from(["", "default", "other"]), accepts_batches=st.booleans(),
        running=st.lists(st.builds(pbo.RunningAttempt, task_id=st.one_of(known_ids, strings),
                                   attempt_number=st.integers(0, 3)), max_size=2))
    first = data.draw(st.one_of(hello.map(lambda h: pbo.ClientMsg(hello=h)),
                                hello.map(lambda h: pbo.ClientMsg(hello=h)),
                                messages(pbo.ClientMsg.DESCRIPTOR)), label="first message")
    # Everything is drawn before the server says anything, so that the shape of the drawn
    # data never depends on the server (whether it refused the Hello, what it pushed):
    # Hypothesis replays the draws when shrinking and refuses data that changed shape.
    steps = [_draw_step(data) for _ in range(data.draw(st.integers(0, 8), label="steps"))]
    clean_end = data.draw(st.booleans(), label="clean end")
    session = _Session(srv)
    await session.send(first)
    # As a shepherd does, wait for the HelloAck (or the refusal) before saying more: writing
    # into a stream the server has already ended makes the *client* report "Internal error
    # from Core" instead of the server's status.
    await asyncio.wait_for(session.answered.wait(), STEP)
    if session.ended is not None:
        code, details = session.ended
        event(f"refused: {code.name} {details[:60]}")
        await session.finish(clean=False)
        assert_well_formed(code, details, f"ClusterService.Stream refusing {first}")
        assert code != grpc.StatusCode.OK or first.WhichOneof("kind") == "hello", first
        return
    for action, pick, offset, arbitrary, values, errors in steps:
        await asyncio.sleep(0.005)  # let pushed tasks arrive
        if action == "pause":
            await asyncio.sleep(0.03)
            continue
        if action == "status":
            await session.send(pbo.ClientMsg(status=pbo.Status(current_load=1)))
            continue
        if action == "arbitrary" or not session.pushed:
            await session.send(arbitrary)
            continue
        task = session.pushed[pick % len(session.pushed)]
        attempt = 0 if offset == "zero" else max(task.attempt_number + int(offset), 0)
        if action == "ack":
            await session.send(pbo.ClientMsg(ack=pbo.Ack(
                task_id=task.task_id, attempt_number=attempt)))
            continue
        results = [pbc.TaskResult(task_id=task.task_id, attempt_number=attempt)
                   for _ in range(2)]
        for result, value, error in zip(results, values, errors, strict=True):
            if action == "succeed":
                result.success.result.CopyFrom(value)
            else:
                result.error.CopyFrom(error)
        if action == "fail-batch":
            await session.send(pbo.ClientMsg(
                task_results=pbo.TaskResultBatch(results=results)))
        else:
            await session.send(pbo.ClientMsg(task_result=results[0]))
    code, details = await session.finish(clean=clean_end)
    event(f"session ended: {code.name} {details[:60]}")
    if (code, details) == (grpc.StatusCode.INTERNAL, CLIENT_WRITE_RACE):
        return  # the client wrote into a stream the server had ended (see CLIENT_WRITE_RACE)
    assert_well_formed(code, details, f"ClusterService.Stream after {first}",
                       ALLOWED | {grpc.StatusCode.CANCELLED})


def test_fuzz_cluster_service() -> None:
    with fuzz_server(heartbeat_interval_ms=100, heartbeat_timeout_ms=2000,
                     hello_timeout_ms=500) as (runner, srv):

        @settings(FUZZ, max_examples=80)
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            runner.run(_shepherd_session(srv, data))
            runner.run(check_log(srv))

        check()
