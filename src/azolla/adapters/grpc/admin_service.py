"""``azolla.orchestrator.AdminService``: operator RPCs used by the ``azolla`` CLI.

A thin translator like :mod:`azolla.adapters.grpc.client_service`: every call goes through an
orchestrator use case (or reads the committed log), so the CLI never bypasses the server's rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import grpc
import grpc.aio

from azolla.adapters.grpc import convert
from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc
from azolla.adapters.grpc.status import abort_for
from azolla.domain.errors import InvalidTaskSpec, TaskNotFound
from azolla.domain.values import DEFAULT_DOMAIN, TaskState

if TYPE_CHECKING:
    from azolla.app.model import TaskView
    from azolla.app.orchestrator import Orchestrator

__all__ = ["AdminService"]

Context = grpc.aio.ServicerContext[Any, Any]
TAIL_PAGE = 500
TAIL_WAIT_SECONDS = 1.0


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0


def _summary(view: TaskView) -> orchestrator_pb2.TaskSummary:
    message = orchestrator_pb2.TaskSummary(
        task_id=str(view.task_id), name=view.name, domain=view.domain, state=view.state.value,
        attempts=len(view.attempts), submitted_at_ms=_ms(view.submitted_at),
        ended_at_ms=_ms(view.attempts[-1].ended_at) if view.terminal and view.attempts else 0,
        shepherd_group=view.group)
    if view.error is not None:
        message.error.CopyFrom(convert.error_to_proto(view.error))
    return message


def _state(text: str) -> TaskState | None:
    if not text:
        return None
    try:
        return TaskState(text)
    except ValueError:
        names = ", ".join(s.value for s in TaskState)
        raise InvalidTaskSpec(f"unknown state {text!r}; use one of: {names}") from None


class AdminService(orchestrator_pb2_grpc.AdminServiceServicer):
    """Servicer of ``AdminService`` over an :class:`~azolla.app.orchestrator.Orchestrator`.

    Args:
        orchestrator: The running orchestrator.
    """

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def _list(self, request: orchestrator_pb2.ListTasksRequest,
              state: TaskState | None) -> tuple[list[TaskView], int]:
        return self.orchestrator.list_tasks(
            domain=request.domain or DEFAULT_DOMAIN, state=state, name=request.name or None,
            submitted_after=(request.submitted_after_ms / 1000
                             if request.submitted_after_ms else None),
            submitted_before=(request.submitted_before_ms / 1000
                              if request.submitted_before_ms else None),
            cursor=request.cursor, limit=request.limit or 100)

    async def ListTasks(self, request: orchestrator_pb2.ListTasksRequest,
                        context: Context) -> orchestrator_pb2.ListTasksResponse:
        """List tasks (unfinished and recent outcomes), filtered and paginated."""
        try:
            views, cursor = self._list(request, _state(request.state))
        except Exception as exc:
            await abort_for(context, exc, "ListTasks")
        return orchestrator_pb2.ListTasksResponse(tasks=[_summary(v) for v in views],
                                                  next_cursor=cursor)

    async def ListShepherds(self, request: orchestrator_pb2.ListShepherdsRequest,
                            context: Context) -> orchestrator_pb2.ListShepherdsResponse:
        """List connected shepherds with capacity and load."""
        return orchestrator_pb2.ListShepherdsResponse(shepherds=[
            orchestrator_pb2.ShepherdInfo(
                shepherd_id=s.shepherd_id, domain=s.domain, shepherd_group=s.group,
                capacity=s.capacity, running=s.running, version=s.version,
                connected_at_ms=_ms(s.connected_at), last_seen_ms=_ms(s.last_seen))
            for s in self.orchestrator.shepherds()
            if not request.domain or s.domain == request.domain])

    async def TailEvents(self, request: orchestrator_pb2.TailEventsRequest,
                         context: Context) -> AsyncIterator[orchestrator_pb2.EventRecord]:
        """Stream committed events after a position; with ``follow``, keep streaming."""
        store = self.orchestrator.store
        position = request.after_position
        sent = 0
        while True:
            page = await store.read_all(position, TAIL_PAGE)
            for event in page:
                position = event.position
                if request.domain and event.domain != request.domain:
                    continue
                yield orchestrator_pb2.EventRecord(
                    position=event.position, stream_id=str(event.stream_id),
                    version=event.version, type=event.type, payload=event.payload,
                    domain=event.domain, recorded_at_ms=_ms(event.recorded_at))
                sent += 1
                if request.limit and sent >= request.limit:
                    return
            if len(page) == TAIL_PAGE:
                continue
            if not request.follow:
                return
            await store.wait_for_events(position, TAIL_WAIT_SECONDS)

    async def RequeueTask(self, request: orchestrator_pb2.RequeueTaskRequest,
                          context: Context) -> orchestrator_pb2.RequeueTaskResponse:
        """Run a failed or cancelled task again as a new task."""
        try:
            task_id = _task_id(request.task_id)
            result = await self.orchestrator.requeue(request.domain or DEFAULT_DOMAIN, task_id)
        except Exception as exc:
            await abort_for(context, exc, "RequeueTask")
        return orchestrator_pb2.RequeueTaskResponse(task_id=str(result.task_id),
                                                    deduplicated=result.deduplicated)

    async def RequeueDeadLetters(self, request: orchestrator_pb2.ListTasksRequest,
                                 context: Context) -> orchestrator_pb2.RequeueDeadLettersResponse:
        """Requeue every failed task that matches the filter (all pages).

        The matching tasks are listed first and requeued afterwards, so copies that this very
        call creates (and that may fail again at once) are never requeued by it.
        """
        response = orchestrator_pb2.RequeueDeadLettersResponse()
        try:
            page_request = orchestrator_pb2.ListTasksRequest()
            page_request.CopyFrom(request)
            page_request.limit = 1000
            dead: list[TaskView] = []
            while True:
                views, cursor = self._list(page_request, TaskState.FAILED)
                dead.extend(views)
                if not cursor:
                    break
                page_request.cursor = cursor
            for view in dead:
                result = await self.orchestrator.requeue(view.domain, view.task_id)
                response.requeued.append(orchestrator_pb2.RequeueTaskResponse(
                    task_id=str(result.task_id), deduplicated=result.deduplicated))
        except Exception as exc:
            await abort_for(context, exc, "RequeueDeadLetters")
        return response


def _task_id(text: str) -> UUID:
    parsed = convert.parse_task_id(text)
    if parsed is None:
        raise TaskNotFound(f"task {text!r} not found")
    return parsed
