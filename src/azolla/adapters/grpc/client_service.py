"""``azolla.orchestrator.ClientService``: the gRPC face of the orchestrator for submitters.

A thin translator: each RPC converts its request (:mod:`azolla.adapters.grpc.convert`), calls
one orchestrator use case and converts the answer back; domain errors become gRPC statuses with
readable messages (:mod:`azolla.adapters.grpc.status`). Waiting RPCs are woken by the commit of
the task's terminal event (``Orchestrator.wait`` / ``on_outcome`` / ``watch``), never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

import grpc
import grpc.aio

from azolla.adapters.grpc import convert
from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc
from azolla.adapters.grpc.status import RefusedRequest, abort_for, status_for
from azolla.domain.errors import (
    AzollaDomainError,
    InvalidTaskSpec,
    StoreUnavailable,
    TaskAlreadyTerminal,
    TaskNotFound,
)

if TYPE_CHECKING:
    from azolla.adapters.memory.taskset import TaskRecord
    from azolla.app.model import SubmitRequest, SubmitResult, TaskOutcome, TaskView
    from azolla.app.orchestrator import Orchestrator

__all__ = ["ClientService"]

Context = grpc.aio.ServicerContext[Any, Any]

_log = logging.getLogger("azolla.grpc")
_SHUTTING_DOWN = "the server is shutting down"

_COMPLETED = orchestrator_pb2.WAIT_FOR_TASK_STATUS_COMPLETED
_TIMEOUT = orchestrator_pb2.WAIT_FOR_TASK_STATUS_TIMEOUT
_NOT_FOUND = orchestrator_pb2.WAIT_FOR_TASK_STATUS_TASK_NOT_FOUND
#: A wait longer than this (seconds) is treated as "no timeout".
MAX_WAIT_SECONDS = 366 * 86_400.0
#: Answer a wait this long (seconds) before the RPC deadline, so the caller gets TIMEOUT
#: rather than DEADLINE_EXCEEDED.
DEADLINE_MARGIN = 0.05
_FLOWS = ("flows are not implemented by this server (the original orchestrator never "
          "implemented them either)")


class ClientService(orchestrator_pb2_grpc.ClientServiceServicer):
    """Servicer of ``ClientService`` over an :class:`~azolla.app.orchestrator.Orchestrator`.

    Args:
        orchestrator: The running orchestrator.
        max_batch: Most tasks accepted in one ``CreateTasks`` request or ``SubmitTasks`` message.
        max_stream_in_flight: Most batches of one ``SubmitTasks`` stream in progress at once.
    """

    def __init__(self, orchestrator: Orchestrator, *, max_batch: int = 10_000,
                 max_stream_in_flight: int = 64) -> None:
        self.orchestrator = orchestrator
        self.max_batch = max_batch
        self.max_stream_in_flight = max_stream_in_flight
        #: Open long-lived client streams, told to finish by :meth:`drain`.
        self._submit_streams: set[_SubmitStream] = set()
        self._watches: set[_MultiWatch] = set()
        self._draining = False

    def drain(self) -> None:
        """Finish the long-lived client streams at shutdown, so that they do not hold it up.

        ``SubmitTasks`` streams stop reading: the batches already read are answered, then the
        stream ends ``UNAVAILABLE`` (a batch the client sent that was not read is, for the
        client, one whose answer was lost; it is sent again when it has an idempotency key).
        ``WatchTasks`` streams end ``UNAVAILABLE`` at once; clients reconnect and send their
        ids again. Streams opened from now on are refused ``UNAVAILABLE``.
        """
        self._draining = True
        for stream in list(self._submit_streams):
            stream.stop_reading()
        for watch in list(self._watches):
            watch.fail(StoreUnavailable(_SHUTTING_DOWN))

    # -- submit ------------------------------------------------------------------------------

    async def CreateTask(
        self, request: orchestrator_pb2.CreateTaskRequest, context: Context
    ) -> orchestrator_pb2.CreateTaskResponse:
        """Create one task; answers after its event is committed."""
        try:
            submit = convert.submit_request_from_proto(request)
            [result] = await self.orchestrator.submit([submit])
        except Exception as exc:
            await abort_for(context, exc, "CreateTask")
        return orchestrator_pb2.CreateTaskResponse(task_id=convert.uuid_text(result.task_id),
                                                   deduplicated=result.deduplicated)

    async def CreateTasks(
        self, request: orchestrator_pb2.CreateTasksRequest, context: Context
    ) -> orchestrator_pb2.CreateTasksResponse:
        """Create many tasks in one commit; all or nothing."""
        try:
            results = await self._begin_create(request.tasks, "a CreateTasks request")
        except Exception as exc:
            await abort_for(context, exc, "CreateTasks")
        response = orchestrator_pb2.CreateTasksResponse()
        _fill_created(response.tasks, results)
        return response

    async def SubmitTasks(
        self, request_iterator: AsyncIterator[orchestrator_pb2.SubmitTasksRequest],
        context: Context,
    ) -> AsyncIterator[orchestrator_pb2.SubmitTasksResponse]:
        """One long-lived stream of submit batches, each answered on its own.

        Every message is one ``CreateTasks`` (all or nothing, one commit) and gets one answer,
        carrying its ``batch_id`` and its own status, once its events are committed: a bad batch
        fails only itself. Up to ``max_stream_in_flight`` batches of a stream are in progress or
        waiting for their answer to be sent; beyond that the stream is not read, so a sender
        that does not read its answers, or sends faster than they are committed, is held back
        by flow control and the server's memory stays bounded.
        After the client half-closes, the stream ends once every batch has been answered. A
        message that does not parse ends the stream with ``INTERNAL`` (after the batches before
        it are answered), as it has no batch id to answer.
        """
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        await context.send_initial_metadata(())  # the client may now send more than one batch
        stream = _SubmitStream(self, self.max_stream_in_flight)
        reader = asyncio.create_task(stream.read(request_iterator), name="azolla-submit-in")
        stream.reader = reader
        self._submit_streams.add(stream)
        try:
            while True:
                answer = await stream.answers.get()
                if answer is None:
                    if stream.failure is not None:
                        await abort_for(context, stream.failure, "SubmitTasks")
                    return
                yield answer
                stream.slots.release()  # a batch holds its slot until its answer is sent
        finally:
            self._submit_streams.discard(stream)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _begin_create(self, tasks: Sequence[orchestrator_pb2.CreateTaskRequest],
                      what: str) -> asyncio.Future[list[SubmitResult]]:
        """Convert and validate ``tasks`` now; the future resolves once they are committed.

        Raises:
            AzollaDomainError: A task is invalid (the message names its index) or the
                orchestrator is stopping; nothing was queued.
        """
        if len(tasks) > self.max_batch:
            raise InvalidTaskSpec(f"{what} may hold at most {self.max_batch} tasks, got "
                                  f"{len(tasks)}")
        from_proto = convert.submit_request_from_proto
        submits: list[SubmitRequest] = []
        append = submits.append
        index = 0
        try:
            for item in tasks:
                append(from_proto(item))
                index += 1
        except AzollaDomainError as exc:
            exc.message = f"tasks[{index}]: {exc.message}"
            raise
        if not submits:
            done: asyncio.Future[list[SubmitResult]] = (
                asyncio.get_running_loop().create_future())
            done.set_result([])
            return done
        return self.orchestrator.submit_future(submits)

    # -- wait --------------------------------------------------------------------------------

    async def WaitForTask(
        self, request: orchestrator_pb2.WaitForTaskRequest, context: Context
    ) -> orchestrator_pb2.WaitForTaskResponse:
        """Wait for a task's outcome (``timeout_ms``: absent = until the deadline, 0 = check)."""
        task_id = convert.parse_task_id(request.task_id)
        if task_id is None:
            return orchestrator_pb2.WaitForTaskResponse(status_code=_NOT_FOUND)
        timeout: float | None = None
        if request.HasField("timeout_ms"):
            timeout = request.timeout_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            bound = max(remaining - DEADLINE_MARGIN, 0.0)
            timeout = bound if timeout is None else min(timeout, bound)
        if timeout is not None and timeout > MAX_WAIT_SECONDS:
            timeout = None
        try:
            outcome = await self.orchestrator.wait(convert.with_domain(request.domain), task_id,
                                                   timeout)
        except TaskNotFound:
            return orchestrator_pb2.WaitForTaskResponse(status_code=_NOT_FOUND)
        except Exception as exc:
            await abort_for(context, exc, "WaitForTask")
        if outcome is None:
            return orchestrator_pb2.WaitForTaskResponse(status_code=_TIMEOUT)
        return convert.outcome_to_wait_response(outcome)

    async def WatchTask(
        self, request: orchestrator_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[orchestrator_pb2.TaskUpdate]:
        """Stream the task's state changes until, and including, its terminal outcome."""
        domain = convert.with_domain(request.domain)
        task_id = convert.parse_task_id(request.task_id)
        if task_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        try:
            view = await self.orchestrator.status(domain, task_id)
        except Exception as exc:
            await abort_for(context, exc, "WatchTask")
        if view.terminal:
            yield convert.view_to_update(view)
            return
        updates: asyncio.Queue[orchestrator_pb2.TaskUpdate] = asyncio.Queue()
        last_attempt = [convert.attempt_of(view)]

        def changed(record: TaskRecord) -> None:
            if record.attempts:
                last_attempt[0] = record.attempts[-1].number
            if not record.terminal:
                updates.put_nowait(orchestrator_pb2.TaskUpdate(
                    task_id=str(record.task_id), state=record.state.value,
                    attempt_number=last_attempt[0]))

        def ended(outcome: TaskOutcome) -> None:
            update = orchestrator_pb2.TaskUpdate(task_id=str(outcome.task_id),
                                                 state=outcome.state.value,
                                                 attempt_number=last_attempt[0], terminal=True)
            convert.fill_result(update, outcome.state, outcome.result, outcome.error)
            updates.put_nowait(update)

        undo_watch = self.orchestrator.watch(task_id, changed)
        undo_outcome = self.orchestrator.on_outcome(task_id, ended)
        try:
            try:
                view = await self.orchestrator.status(domain, task_id)
            except Exception as exc:
                await abort_for(context, exc, "WatchTask")
            first = convert.view_to_update(view)
            sent = (first.state, first.attempt_number)
            yield first
            if first.terminal:
                return
            while True:
                update = await updates.get()
                key = (update.state, update.attempt_number)
                if key == sent and not update.terminal:
                    continue
                sent = key
                yield update
                if update.terminal:
                    return
        finally:
            undo_watch()
            undo_outcome()

    async def WatchTasks(
        self, request_iterator: AsyncIterator[orchestrator_pb2.WatchTasksRequest],
        context: Context,
    ) -> AsyncIterator[orchestrator_pb2.WatchTasksResponse]:
        """One stream for many waiters: answer each sent task id once its task has ended.

        Outcomes that become known together (one commit, or one request naming finished
        tasks) leave in one response. After the client half-closes, the stream ends once
        every id it sent has been answered.
        """
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        watch = _MultiWatch(self.orchestrator)
        reader = asyncio.create_task(watch.read(request_iterator), name="azolla-watch-tasks-in")
        self._watches.add(watch)
        try:
            while True:
                await watch.wake.wait()
                watch.wake.clear()
                if watch.failure is not None:
                    await abort_for(context, watch.failure, "WatchTasks")
                if watch.pending.outcomes:
                    batch, watch.pending = watch.pending, orchestrator_pb2.WatchTasksResponse()
                    yield batch
                if watch.input_done and not watch.watched:
                    return
        finally:
            self._watches.discard(watch)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            watch.close()

    # -- cancel and status -------------------------------------------------------------------

    async def CancelTask(
        self, request: orchestrator_pb2.CancelTaskRequest, context: Context
    ) -> orchestrator_pb2.CancelTaskResponse:
        """Cancel a task; ``cancelled`` is false when it had already ended."""
        domain = convert.with_domain(request.domain)
        task_id = convert.parse_task_id(request.task_id)
        try:
            if task_id is None:
                raise TaskNotFound(f"task {request.task_id} not found")
            try:
                state = await self.orchestrator.cancel(domain, task_id,
                                                       request.reason or "cancelled by a client")
            except TaskAlreadyTerminal:
                view = await self.orchestrator.status(domain, task_id)
                return orchestrator_pb2.CancelTaskResponse(cancelled=False,
                                                           state=view.state.value)
        except Exception as exc:
            await abort_for(context, exc, "CancelTask")
        return orchestrator_pb2.CancelTaskResponse(cancelled=True, state=state.value)

    async def GetTaskStatus(
        self, request: orchestrator_pb2.GetTaskStatusRequest, context: Context
    ) -> orchestrator_pb2.GetTaskStatusResponse:
        """Return a task's state, attempt history and (when ended) outcome."""
        task_id = convert.parse_task_id(request.task_id)
        try:
            if task_id is None:
                raise TaskNotFound(f"task {request.task_id} not found")
            view: TaskView = await self.orchestrator.status(convert.with_domain(request.domain),
                                                            task_id)
        except Exception as exc:
            await abort_for(context, exc, "GetTaskStatus")
        return convert.view_to_status_response(view)

    # -- not implemented ---------------------------------------------------------------------

    async def CreateFlow(
        self, request: orchestrator_pb2.CreateFlowRequest, context: Context
    ) -> orchestrator_pb2.CreateFlowResponse:
        """Not implemented: answers ``UNIMPLEMENTED``."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _FLOWS)

    async def WaitForFlow(
        self, request: orchestrator_pb2.WaitForFlowRequest, context: Context
    ) -> orchestrator_pb2.WaitForFlowResponse:
        """Not implemented: answers ``UNIMPLEMENTED``."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _FLOWS)

    async def PublishTaskEvent(
        self, request: orchestrator_pb2.PublishTaskEventRequest, context: Context
    ) -> orchestrator_pb2.PublishTaskEventResponse:
        """Not implemented: answers ``UNIMPLEMENTED``."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "PublishTaskEvent is not implemented by this server")

    async def PublishFlowEvent(
        self, request: orchestrator_pb2.PublishFlowEventRequest, context: Context
    ) -> orchestrator_pb2.PublishFlowEventResponse:
        """Not implemented: answers ``UNIMPLEMENTED``."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _FLOWS)


def _fill_created(into: Any, results: Sequence[SubmitResult]) -> None:
    add = into.add
    text = convert.uuid_text
    for result in results:
        add(task_id=text(result.task_id), deduplicated=result.deduplicated)


class _SubmitStream:
    """The state of one ``SubmitTasks`` stream: batches in progress and answers to send.

    A batch costs no asyncio task: it is validated as it is read, and the orchestrator's
    commit future answers it from a callback.
    """

    def __init__(self, service: ClientService, max_in_flight: int) -> None:
        self.service = service
        #: Answers in commit order; None once the input ended and every batch was answered.
        self.answers: asyncio.Queue[orchestrator_pb2.SubmitTasksResponse | None] = (
            asyncio.Queue())
        self.slots = asyncio.Semaphore(max_in_flight)
        self.in_progress = 0
        self.input_done = False
        #: Why reading stopped early; the stream ends with its status once all is answered.
        self.failure: BaseException | None = None
        self.reader: asyncio.Task[None] | None = None

    def stop_reading(self) -> None:
        """Read no more batches; end the stream ``UNAVAILABLE`` once those read are answered."""
        if self.failure is None:
            self.failure = StoreUnavailable(_SHUTTING_DOWN)
        if self.reader is not None:
            self.reader.cancel()

    async def read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                await self.slots.acquire()
                self._accept(request)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError:
            pass  # the client went away; the handler is being cancelled
        except AzollaDomainError as exc:  # e.g. a message that does not parse
            self.failure = exc
        except Exception as exc:
            _log.exception("reading a SubmitTasks stream failed")
            self.failure = exc
        finally:
            self.input_done = True
            if not self.in_progress:
                self.answers.put_nowait(None)

    def _accept(self, request: Any) -> None:
        if isinstance(request, RefusedRequest):
            self._refuse(request.request.batch_id, request.code, request.message)
            return
        batch_id = request.batch_id
        if not request.tasks:
            self._refuse(batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                         "a SubmitTasks message must hold at least one task")
            return
        try:
            future = self.service._begin_create(request.tasks, "a SubmitTasks message")
        except Exception as exc:
            self._refuse(batch_id, *status_for(exc, "SubmitTasks"))
            return
        self.in_progress += 1
        future.add_done_callback(lambda done: self._committed(batch_id, done))

    def _committed(self, batch_id: int, done: asyncio.Future[list[SubmitResult]]) -> None:
        self.in_progress -= 1
        if done.cancelled():
            self._refuse(batch_id, grpc.StatusCode.CANCELLED, "the submit was cancelled")
        elif (exc := done.exception()) is not None:
            self._refuse(batch_id, *status_for(exc, "SubmitTasks"))
        else:
            answer = orchestrator_pb2.SubmitTasksResponse(batch_id=batch_id)
            _fill_created(answer.tasks, done.result())
            self.answers.put_nowait(answer)
        if self.input_done and not self.in_progress:
            self.answers.put_nowait(None)

    def _refuse(self, batch_id: int, code: grpc.StatusCode, message: str) -> None:
        self.answers.put_nowait(orchestrator_pb2.SubmitTasksResponse(
            batch_id=batch_id, code=code.value[0], message=message))


class _MultiWatch:
    """The state of one ``WatchTasks`` stream: watched ids and outcomes not yet sent."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.watched: dict[UUID, Callable[[], None]] = {}
        #: The next response, filled in place as outcomes become known (no copies).
        self.pending = orchestrator_pb2.WatchTasksResponse()
        self.wake = asyncio.Event()
        self.input_done = False
        self.failure: BaseException | None = None

    async def read(self, requests: AsyncIterator[orchestrator_pb2.WatchTasksRequest]) -> None:
        try:
            async for request in requests:
                domain = convert.with_domain(request.domain)
                for text in request.task_ids:
                    await self._add(domain, text)
                if self.pending.outcomes:
                    self.wake.set()
        except asyncio.CancelledError:
            raise
        except grpc.RpcError:
            pass  # the client went away; the handler is being cancelled
        except Exception as exc:
            self.failure = exc
        finally:
            self.input_done = True
            self.wake.set()

    async def _add(self, domain: str, text: str) -> None:
        task_id = convert.parse_task_id(text)
        if task_id is None:
            self.pending.outcomes.add(task_id=text, status_code=_NOT_FOUND)
            return
        if task_id in self.watched:
            return
        try:
            outcome = await self.orchestrator.wait(domain, task_id, 0)
        except TaskNotFound:
            self.pending.outcomes.add(task_id=text, status_code=_NOT_FOUND)
            return
        if outcome is not None:
            convert.fill_task_outcome(self.pending.outcomes.add(), outcome)
            return

        def ended(result: TaskOutcome) -> None:
            self.watched.pop(task_id, None)
            convert.fill_task_outcome(self.pending.outcomes.add(), result)
            self.wake.set()

        self.watched[task_id] = lambda: None  # placeholder: on_outcome may call back at once
        undo = self.orchestrator.on_outcome(task_id, ended)
        if task_id in self.watched:
            self.watched[task_id] = undo

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error``'s status (see :meth:`ClientService.drain`)."""
        self.failure = error
        self.wake.set()

    def close(self) -> None:
        for undo in self.watched.values():
            undo()
        self.watched.clear()
