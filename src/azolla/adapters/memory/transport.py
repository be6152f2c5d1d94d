"""In-process shepherd transport and runner, for unit tests and embedded use.

:class:`InProcessShepherd` connects to an :class:`~azolla.app.orchestrator.Orchestrator` in
the same event loop, receives pushed attempts through :class:`InProcessTransport` and runs
them as plain Python callables, reporting outcomes back in batches. No sockets, no processes:
the whole orchestrator can be driven in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from azolla.app.model import ReportedOutcome, ShepherdHello
from azolla.domain.ports import ExecutionRequest
from azolla.domain.values import ErrorInfo

if TYPE_CHECKING:
    from azolla.app.orchestrator import Orchestrator, ShepherdSession

__all__ = ["InProcessShepherd", "InProcessTransport"]

TaskFunction = Callable[..., Any]


class InProcessTransport:
    """A :class:`~azolla.domain.ports.ShepherdTransport` that queues messages in memory."""

    def __init__(self, shepherd_id: str) -> None:
        self._shepherd_id = shepherd_id
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed: str | None = None

    @property
    def shepherd_id(self) -> str:
        """The shepherd this transport reaches."""
        return self._shepherd_id

    async def push(self, tasks: Sequence[ExecutionRequest]) -> None:
        """Queue attempts for the shepherd."""
        self.inbox.put_nowait(("tasks", list(tasks)))

    async def cancel(self, task_id: str, attempt: int, reason: str) -> None:
        """Queue a cancel request."""
        self.inbox.put_nowait(("cancel", (task_id, attempt, reason)))

    async def close(self, reason: str) -> None:
        """Mark the connection closed."""
        self.closed = reason
        self.inbox.put_nowait(("close", reason))


class InProcessShepherd:
    """Runs pushed attempts as in-process Python callables.

    Args:
        orchestrator: The orchestrator to connect to.
        tasks: Task name → function (sync or async). A JSON array maps to positional
            arguments, a JSON object to keyword arguments.
        capacity: Attempts run at once.
        domain: Domain served.
        group: Group served.
        shepherd_id: Its id (a fresh UUID by default).
    """

    def __init__(self, orchestrator: Orchestrator, tasks: Mapping[str, TaskFunction], *,
                 capacity: int = 16, domain: str = "default", group: str = "default",
                 shepherd_id: str | None = None) -> None:
        self.orchestrator = orchestrator
        self.tasks = dict(tasks)
        self.capacity = capacity
        self.domain = domain
        self.group = group
        self.shepherd_id = shepherd_id or str(uuid.uuid4())
        self.transport = InProcessTransport(self.shepherd_id)
        self.session: ShepherdSession | None = None
        self.executions: list[tuple[str, int]] = []
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start serving."""
        hello = ShepherdHello(shepherd_uuid=self.shepherd_id, domain=self.domain,
                              group=self.group, capacity=self.capacity, accepts_batches=True)
        self.session = await self.orchestrator.connect_shepherd(hello, self.transport)
        self._loop = asyncio.create_task(self._serve())

    async def stop(self, *, disconnect: bool = True) -> None:
        """Stop serving; with ``disconnect`` tell the orchestrator the stream ended."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for task in self._running.values():
            task.cancel()
        if disconnect and self.session is not None:
            await self.orchestrator.disconnect_shepherd(self.session, "stopped")

    async def _serve(self) -> None:
        while True:
            kind, body = await self.transport.inbox.get()
            if kind == "tasks":
                for request in body:
                    key = (request.task_id, request.attempt)
                    self._running[key] = asyncio.create_task(self._run(request))
            elif kind == "cancel":
                running = self._running.pop((body[0], body[1]), None)
                if running is not None:
                    running.cancel()
            else:
                return

    async def _run(self, request: ExecutionRequest) -> None:
        self.executions.append((request.task_id, request.attempt))
        outcome = await self._execute(request)
        self._running.pop((request.task_id, request.attempt), None)
        assert self.session is not None
        with contextlib.suppress(Exception):
            await self.orchestrator.report_results(self.session, [outcome])

    async def _execute(self, request: ExecutionRequest) -> ReportedOutcome:
        function = self.tasks.get(request.name)
        if function is None:
            return ReportedOutcome(request.task_id, request.attempt, False, error=ErrorInfo(
                "TaskNotFound", f"no task named {request.name!r}", {}, False))
        try:
            args = json.loads(request.args)
            kwargs = json.loads(request.kwargs)
            value = function(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await _bounded(value, request.timeout)
            return ReportedOutcome(request.task_id, request.attempt, True, json.dumps(value))
        except TimeoutError:
            return ReportedOutcome(request.task_id, request.attempt, False, error=ErrorInfo(
                "TaskTimeout", "the attempt ran past its timeout", {}, True))
        except Exception as exc:
            retriable = bool(getattr(exc, "retriable", True))
            return ReportedOutcome(request.task_id, request.attempt, False, error=ErrorInfo(
                type(exc).__name__, str(exc), {}, retriable))


async def _bounded(value: Awaitable[Any], timeout: float | None) -> Any:
    return await asyncio.wait_for(value, timeout)
