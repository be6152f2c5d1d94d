"""A TEST DOUBLE of the orchestrator's ClientService, for unit tests of the client SDK.

This is not the real server (that lives in ``azolla.app``; the client's end-to-end tests run
against it). It implements just enough of the wire contract, in memory, to observe what the
client sends: how many RPCs, which batch sizes, which metadata, and to inject failures. It
serves real gRPC on 127.0.0.1 (port 0), so the client's real channel, stubs and streams run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

pb = orchestrator_pb2
#: The ``calls`` / ``fail_next`` key of one batch sent on a SubmitTasks stream.
SUBMIT_BATCH = "SubmitTasks.batch"
COMPLETED = pb.WAIT_FOR_TASK_STATUS_COMPLETED
NOT_FOUND = pb.WAIT_FOR_TASK_STATUS_TASK_NOT_FOUND


@dataclass
class FakeTask:
    request: pb.CreateTaskRequest
    task_id: str
    state: str = "queued"
    success: Any = None
    error: common_pb2.ErrorResult | None = None
    updates: list[pb.TaskUpdate] = field(default_factory=list)


class _Break:
    """Queue sentinel: abort this stream with a status."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


class FakeClientService(orchestrator_pb2_grpc.ClientServiceServicer):
    """In-memory ClientService test double (see the module docstring)."""

    def __init__(self) -> None:
        self.url = ""
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.tasks: dict[str, FakeTask] = {}
        self.by_key: dict[tuple[str, str], str] = {}
        self.metadata: list[dict[str, str]] = []
        self.watch_requests: list[list[str]] = []
        #: Seconds CreateTask/CreateTasks take (a stand-in for the durable commit).
        self.create_delay = 0.0
        #: Complete each created task at once with this function of (args, kwargs), if set.
        self.auto_complete: Callable[[list[Any], dict[str, Any]], Any] | None = None
        #: Abort the next calls of a method with these codes (popped one per call).
        self.fail_next: dict[str, list[grpc.StatusCode]] = {}
        #: Reject (INVALID_ARGUMENT) any create request containing a task of these names.
        self.reject_names: set[str] = set()
        self.unimplemented: set[str] = set()
        self._streams: list[tuple[set[str], asyncio.Queue[list[pb.TaskOutcome] | _Break]]] = []
        self._changed = asyncio.Condition()
        self._submit_streams: list[asyncio.Queue[pb.SubmitTasksResponse | _Break | None]] = []

    # -- helpers ------------------------------------------------------------------------

    @property
    def submit_rpcs(self) -> int:
        """Submit round trips: CreateTask and CreateTasks calls plus SubmitTasks batches."""
        return self.calls["CreateTask"] + self.calls["CreateTasks"] + self.calls[SUBMIT_BATCH]

    def submit_key(self, size: int) -> str:
        """The ``calls`` / ``fail_next`` key a client batch of ``size`` tasks arrives under."""
        if "SubmitTasks" not in self.unimplemented:
            return SUBMIT_BATCH
        if size == 1 or "CreateTasks" in self.unimplemented:
            return "CreateTask"
        return "CreateTasks"

    async def until(self, condition: Callable[[], object], timeout: float = 5.0) -> None:
        """Wait until ``condition()`` holds; it is checked whenever the fake sees a request."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(condition)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls[method] += 1
        await self._notify()
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})  # type: ignore[misc]
        if method in self.unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        codes = self.fail_next.get(method)
        if codes:
            await context.abort(codes.pop(0), f"injected failure of {method}")

    def _create(self, request: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if request.HasField("idempotency_key"):
            existing = self.by_key.get((request.domain, request.idempotency_key))
            if existing is not None:
                return pb.CreateTaskResponse(task_id=existing, deduplicated=True)
        task_id = str(uuid.uuid4())
        self.tasks[task_id] = FakeTask(request=request, task_id=task_id)
        if request.HasField("idempotency_key"):
            self.by_key[(request.domain, request.idempotency_key)] = task_id
        if self.auto_complete is not None:
            args = json.loads(request.args or "[]")
            kwargs = json.loads(request.kwargs or "{}")
            self.succeed(task_id, self.auto_complete(args, kwargs))
        return pb.CreateTaskResponse(task_id=task_id)

    def _outcome(self, task: FakeTask) -> pb.TaskOutcome:
        outcome = pb.TaskOutcome(task_id=task.task_id, status_code=COMPLETED, state=task.state)
        if task.error is not None:
            outcome.error.CopyFrom(task.error)
        elif task.state == "succeeded":
            outcome.success.result.json_value = json.dumps(task.success)
        return outcome

    def _finish(self, task: FakeTask) -> None:
        outcome = self._outcome(task)
        for watched, queue in self._streams:
            if task.task_id in watched:
                watched.discard(task.task_id)
                queue.put_nowait([outcome])

    def succeed(self, task_id: str, value: Any) -> None:
        """Complete a task successfully with ``value``."""
        task = self.tasks[task_id]
        task.state, task.success = "succeeded", value
        self._finish(task)

    def fail(self, task_id: str, type_: str, message: str, *, retriable: bool = False) -> None:
        """Fail a task."""
        task = self.tasks[task_id]
        task.state = "failed"
        task.error = common_pb2.ErrorResult(
            type=type_, message=message, data='{"k": 1}', retriable=retriable
        )
        self._finish(task)

    def break_streams(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Abort every open WatchTasks stream."""
        for _, queue in self._streams:
            queue.put_nowait(_Break(code))

    def break_submit_streams(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Abort every open SubmitTasks stream (batches not yet answered get no answer)."""
        for answers in self._submit_streams:
            answers.put_nowait(_Break(code))

    @property
    def open_submit_streams(self) -> int:
        return len(self._submit_streams)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- the service ----------------------------------------------------------------------

    async def CreateTask(
        self, request: pb.CreateTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateTaskResponse:
        await self._enter("CreateTask", context)
        self.batch_sizes.append(1)
        if request.name in self.reject_names:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad task {request.name}")
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        return self._create(request)

    async def CreateTasks(
        self, request: pb.CreateTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateTasksResponse:
        await self._enter("CreateTasks", context)
        self.batch_sizes.append(len(request.tasks))
        bad = [t.name for t in request.tasks if t.name in self.reject_names]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad task {bad[0]}")
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        return pb.CreateTasksResponse(tasks=[self._create(t) for t in request.tasks])

    async def SubmitTasks(
        self,
        request_iterator: AsyncIterator[pb.SubmitTasksRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.SubmitTasksResponse]:
        """Each message is handled like a CreateTasks call, under the key ``SubmitTasks.batch``
        (``calls``, ``fail_next``, ``batch_sizes``); answers leave as each batch completes."""
        await self._enter("SubmitTasks", context)
        await context.send_initial_metadata(())
        answers: asyncio.Queue[pb.SubmitTasksResponse | _Break | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        self._submit_streams.append(answers)

        async def answer(request: pb.SubmitTasksRequest) -> None:
            reply = pb.SubmitTasksResponse(batch_id=request.batch_id)
            self.calls[SUBMIT_BATCH] += 1
            self.batch_sizes.append(len(request.tasks))
            await self._notify()
            codes = self.fail_next.get(SUBMIT_BATCH)
            bad = [t.name for t in request.tasks if t.name in self.reject_names]
            if codes:
                reply.code = codes.pop(0).value[0]
                reply.message = f"injected failure of {SUBMIT_BATCH}"
            elif bad:
                reply.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                reply.message = f"bad task {bad[0]}"
            else:
                if self.create_delay:
                    await asyncio.sleep(self.create_delay)
                reply.tasks.extend(self._create(t) for t in request.tasks)
            answers.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (reply := await answers.get()) is not None:
                if isinstance(reply, _Break):
                    await context.abort(reply.code, "injected stream failure")
                yield reply
        finally:
            reader.cancel()
            self._submit_streams.remove(answers)

    async def WatchTasks(
        self,
        request_iterator: AsyncIterator[pb.WatchTasksRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.WatchTasksResponse]:
        await self._enter("WatchTasks", context)
        watched: set[str] = set()
        queue: asyncio.Queue[list[pb.TaskOutcome] | _Break] = asyncio.Queue()
        entry = (watched, queue)
        self._streams.append(entry)
        await self._notify()

        async def read() -> None:
            async for request in request_iterator:
                self.watch_requests.append(list(request.task_ids))
                await self._notify()
                ready = []
                for task_id in request.task_ids:
                    task = self.tasks.get(task_id)
                    if task is None:
                        ready.append(pb.TaskOutcome(task_id=task_id, status_code=NOT_FOUND))
                    elif task.state in ("succeeded", "failed", "cancelled"):
                        ready.append(self._outcome(task))
                    else:
                        watched.add(task_id)
                if ready:
                    queue.put_nowait(ready)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Break):
                    await context.abort(item.code, "injected stream failure")
                outcomes = list(item)
                while not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, _Break):
                        queue.put_nowait(more)
                        break
                    outcomes.extend(more)
                yield pb.WatchTasksResponse(outcomes=outcomes)
        finally:
            reader.cancel()
            self._streams.remove(entry)

    async def WaitForTask(
        self, request: pb.WaitForTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WaitForTaskResponse:
        await self._enter("WaitForTask", context)
        task = self.tasks.get(request.task_id)
        if task is None:
            return pb.WaitForTaskResponse(status_code=NOT_FOUND)
        deadline = asyncio.get_running_loop().time() + request.timeout_ms / 1000
        while task.state not in ("succeeded", "failed", "cancelled"):
            if asyncio.get_running_loop().time() >= deadline:
                return pb.WaitForTaskResponse(status_code=pb.WAIT_FOR_TASK_STATUS_TIMEOUT)
            await asyncio.sleep(0.005)
        outcome = self._outcome(task)
        response = pb.WaitForTaskResponse(status_code=COMPLETED, state=task.state)
        if outcome.HasField("error"):
            response.error.CopyFrom(outcome.error)
        elif outcome.HasField("success"):
            response.success.CopyFrom(outcome.success)
        return response

    async def GetTaskStatus(
        self, request: pb.GetTaskStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTaskStatusResponse:
        await self._enter("GetTaskStatus", context)
        task = self.tasks.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id}")
        assert task is not None
        response = pb.GetTaskStatusResponse(
            task_id=task.task_id,
            name=task.request.name,
            domain=task.request.domain,
            state=task.state,
            created_at_ms=1_700_000_000_000,
            shepherd_group=task.request.shepherd_group or "default",
            args=task.request.args,
            kwargs=task.request.kwargs,
        )
        response.attempts.add(
            number=1,
            state="failed",
            shepherd_id="s1",
            started_at_ms=1_700_000_000_500,
            ended_at_ms=1_700_000_001_000,
            error=common_pb2.ErrorResult(type="ValueError", message="first try", data="{}"),
        )
        response.attempts.add(number=2, state="running", shepherd_id="s2", started_at_ms=1)
        return response

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelTaskResponse:
        await self._enter("CancelTask", context)
        task = self.tasks.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id}")
        assert task is not None
        if task.state in ("succeeded", "failed", "cancelled"):
            return pb.CancelTaskResponse(cancelled=False, state=task.state)
        task.state = "cancelled"
        self._finish(task)
        return pb.CancelTaskResponse(cancelled=True, state="cancelled")

    async def _unimplemented(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "flows are not implemented")

    async def CreateFlow(
        self, request: pb.CreateFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateFlowResponse:
        return await self._unimplemented(context)  # type: ignore[no-any-return]

    async def WaitForFlow(
        self, request: pb.WaitForFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WaitForFlowResponse:
        return await self._unimplemented(context)  # type: ignore[no-any-return]

    async def PublishTaskEvent(
        self, request: pb.PublishTaskEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishTaskEventResponse:
        return await self._unimplemented(context)  # type: ignore[no-any-return]

    async def PublishFlowEvent(
        self, request: pb.PublishFlowEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishFlowEventResponse:
        return await self._unimplemented(context)  # type: ignore[no-any-return]

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TaskUpdate]:
        await self._enter("WatchTask", context)
        task = self.tasks.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id}")
        assert task is not None
        yield pb.TaskUpdate(task_id=task.task_id, state="queued")
        yield pb.TaskUpdate(task_id=task.task_id, state="running", attempt_number=1)
        final = pb.TaskUpdate(
            task_id=task.task_id, state="succeeded", attempt_number=1, terminal=True
        )
        final.success.result.int_value = 42
        yield final
        yield pb.TaskUpdate(task_id=task.task_id, state="after-terminal")  # must be ignored


@asynccontextmanager
async def fake_orchestrator(
    *,
    credentials: grpc.ServerCredentials | None = None,
    service: FakeClientService | None = None,
    port: int = 0,
    submit_stream: bool = True,
) -> AsyncIterator[FakeClientService]:
    """Serve a :class:`FakeClientService` on 127.0.0.1; its ``url`` says where.

    Pass ``service`` and ``port`` to serve the same state again on the same port, as after an
    orchestrator restart. ``submit_stream=False`` answers SubmitTasks with UNIMPLEMENTED, like
    a server from before it (the client then submits with CreateTask / CreateTasks).
    """
    service = service if service is not None else FakeClientService()
    if not submit_stream:
        service.unimplemented.add("SubmitTasks")
    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_ClientServiceServicer_to_server(service, server)
    if credentials is None:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        service.url = f"http://127.0.0.1:{bound}"
    else:
        bound = server.add_secure_port(f"127.0.0.1:{port}", credentials)
        service.url = f"https://127.0.0.1:{bound}"
    await server.start()
    try:
        yield service
    finally:
        await server.stop(None)
