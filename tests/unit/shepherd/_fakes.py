"""Test doubles for the shepherd runtime: an in-memory link/connector and a scripted executor.

``FakeConnector`` hands the runtime :class:`FakeLink` s; the test plays the orchestrator on the
other end (``link.from_shepherd`` / ``link.push``). ``ScriptedExecutor`` runs attempts as
coroutines whose behaviour is chosen by the task name, with hooks to release or fail them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from azolla.adapters.grpc.pb import common_pb2 as cpb
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest
from azolla.shepherd.connection import ConnectionLost

_END = object()


class FakeLink:
    """One in-memory stream; the test is the orchestrator."""

    def __init__(self) -> None:
        self._to_shepherd: asyncio.Queue[object] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._cursors: dict[str, int] = {}
        self.finished = asyncio.Event()
        self.closed = asyncio.Event()
        self.sent: list[opb.ClientMsg] = []

    # -- the runtime's side ---------------------------------------------------------------

    async def send(self, message: opb.ClientMsg) -> None:
        if self.closed.is_set() or self.finished.is_set():
            raise ConnectionLost("closed", "UNAVAILABLE")
        copy = opb.ClientMsg()
        copy.CopyFrom(message)
        self.sent.append(copy)
        self._arrived.set()

    async def receive(self) -> opb.ServerMsg | None:
        item = await self._to_shepherd.get()
        if item is _END:
            return None
        if isinstance(item, ConnectionLost):
            raise item
        assert isinstance(item, opb.ServerMsg)
        return item

    async def finish(self) -> None:
        # Like a well-behaved server: it reads to the end of the requests, then ends the call.
        self.finished.set()
        self.end()

    async def close(self) -> None:
        self.closed.set()

    # -- the orchestrator's side ----------------------------------------------------------

    def push(self, message: opb.ServerMsg) -> None:
        self._to_shepherd.put_nowait(message)

    def hello_ack(self, interval_ms: int = 2000,
                  cancel: list[tuple[str, int]] | None = None) -> None:
        ack = opb.HelloAck(heartbeat_interval_ms=interval_ms, heartbeat_timeout_ms=10_000)
        for task_id, number in cancel or []:
            ack.cancel.append(opb.RunningAttempt(task_id=task_id, attempt_number=number))
        self.push(opb.ServerMsg(hello_ack=ack))

    def push_tasks(self, *tasks: cpb.Task) -> None:
        self.push(opb.ServerMsg(tasks=opb.TaskBatch(tasks=list(tasks))))

    def end(self) -> None:
        """End the stream cleanly (orchestrator closed it)."""
        self._to_shepherd.put_nowait(_END)

    def break_(self, code: str = "UNAVAILABLE") -> None:
        """Fail the stream."""
        self._to_shepherd.put_nowait(ConnectionLost("broken", code))

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

    async def next_message(self, kind: str, timeout: float = 5.0) -> opb.ClientMsg:
        """The next message of ``kind`` not returned before (each kind has its own cursor)."""
        found: list[opb.ClientMsg] = []

        def ready() -> bool:
            of_kind = self.of_kind(kind)
            cursor = self._cursors.get(kind, 0)
            if len(of_kind) > cursor:
                self._cursors[kind] = cursor + 1
                found.append(of_kind[cursor])
                return True
            return False

        await self._wait_for(ready, timeout)
        return found[0]

    def all_results(self) -> list[cpb.TaskResult]:
        out: list[cpb.TaskResult] = []
        for message in self.sent:
            kind = message.WhichOneof("kind")
            if kind == "task_results":
                out.extend(message.task_results.results)
            elif kind == "task_result":
                out.append(message.task_result)
        return out

    async def results(self, count: int, timeout: float = 5.0) -> list[cpb.TaskResult]:
        """The next ``count`` results (from batched or single messages) not returned before."""
        cursor = self._cursors.get("results", 0)
        await self._wait_for(lambda: len(self.all_results()) >= cursor + count, timeout)
        self._cursors["results"] = cursor + count
        return self.all_results()[cursor:cursor + count]

    def of_kind(self, kind: str) -> list[opb.ClientMsg]:
        return [m for m in self.sent if m.WhichOneof("kind") == kind]


class FakeConnector:
    """Hands out :class:`FakeLink` s; ``refuse`` makes the next opens fail."""

    description = "fake://orchestrator"

    def __init__(self) -> None:
        self.links: asyncio.Queue[FakeLink] = asyncio.Queue()
        self.all_links: list[FakeLink] = []
        self.refuse = 0
        self.refuse_code = "UNAVAILABLE"
        self.attempts = 0
        self.attempt_times: list[float] = []

    async def open(self) -> FakeLink:
        self.attempts += 1
        self.attempt_times.append(asyncio.get_running_loop().time())
        if self.refuse > 0:
            self.refuse -= 1
            raise ConnectionLost("connection refused", self.refuse_code)
        link = FakeLink()
        self.all_links.append(link)
        self.links.put_nowait(link)
        return link

    async def accept(self, timeout: float = 5.0) -> tuple[FakeLink, opb.Hello]:
        """Wait for the next connection and its Hello."""
        async with asyncio.timeout(timeout):
            link = await self.links.get()
        hello = await link.next_message("hello", timeout)
        return link, hello.hello


def task(task_id: str, name: str = "ok", attempt: int = 1, args: Sequence[object] = (),
         timeout_ms: int | None = None) -> cpb.Task:
    message = cpb.Task(task_id=task_id, name=name, args=json.dumps(list(args)), kwargs="{}",
                       attempt_number=attempt, domain="default")
    if timeout_ms is not None:
        message.timeout_ms = timeout_ms
    return message


@dataclass
class ScriptedExecutor:
    """Runs attempts by name.

    Names: ``ok`` returns ``args[0]`` at once; ``wait`` blocks until :meth:`release` (or
    cancel); ``fail`` fails with a retriable ``ValueError``; ``sleep`` sleeps ``args[0]`` s.
    """

    started: list[tuple[str, int]] = field(default_factory=list)
    cancelled: list[tuple[str, int]] = field(default_factory=list)
    closed: bool = False
    running: int = 0
    peak: int = 0
    on_start: Callable[[ExecutionRequest], Awaitable[None]] | None = None
    _gates: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)
    _cancel_flags: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)
    _started_events: dict[str, asyncio.Event] = field(default_factory=dict)

    def gate(self, task_id: str, attempt: int = 1) -> asyncio.Event:
        return self._gates.setdefault((task_id, attempt), asyncio.Event())

    def release(self, task_id: str, attempt: int = 1) -> None:
        self.gate(task_id, attempt).set()

    def release_all(self) -> None:
        for key in list(self._cancel_flags):
            self.gate(*key).set()

    async def wait_started(self, task_id: str, timeout: float = 5.0) -> None:
        event = self._started_events.setdefault(task_id, asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        key = (request.task_id, request.attempt)
        self.started.append(key)
        self._started_events.setdefault(request.task_id, asyncio.Event()).set()
        cancel = self._cancel_flags.setdefault(key, asyncio.Event())
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.on_start is not None:
                await self.on_start(request)
            args = json.loads(request.args)
            if request.name == "ok":
                return ExecutionOutcome(request.task_id, request.attempt, True,
                                        json.dumps(args[0] if args else None))
            if request.name == "fail":
                return ExecutionOutcome(request.task_id, request.attempt, False,
                                        error_type="ValueError", error_message="boom")
            sleeper: asyncio.Future[object]
            if request.name == "sleep":
                sleeper = asyncio.ensure_future(asyncio.sleep(float(args[0]), True))
            else:
                sleeper = asyncio.ensure_future(self.gate(*key).wait())
            stopper = asyncio.ensure_future(cancel.wait())
            try:
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                stopper.cancel()
            if cancel.is_set():
                return ExecutionOutcome(request.task_id, request.attempt, False,
                                        error_type="Cancelled", error_message="cancelled",
                                        retriable=False)
            return ExecutionOutcome(request.task_id, request.attempt, True, '"done"')
        finally:
            self.running -= 1

    async def cancel(self, task_id: str, attempt: int) -> bool:
        self.cancelled.append((task_id, attempt))
        flag = self._cancel_flags.get((task_id, attempt))
        if flag is None:
            return False
        flag.set()
        return True

    async def close(self) -> None:
        self.closed = True
        for flag in self._cancel_flags.values():
            flag.set()


@dataclass
class SubmittingExecutor(ScriptedExecutor):
    """:class:`ScriptedExecutor` with the pool's ``submit``: an outcome callback, no awaiting.

    ``submit_error``, when set, is raised by ``submit`` itself (an executor bug).
    """

    submit_error: Exception | None = None
    _tasks: set[asyncio.Task[ExecutionOutcome]] = field(default_factory=set)

    def submit(self, request: ExecutionRequest,
               done: Callable[[ExecutionOutcome], None]) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        task = asyncio.ensure_future(self.execute(request))
        self._tasks.add(task)

        def finished(t: asyncio.Task[ExecutionOutcome]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is None:
                done(t.result())

        task.add_done_callback(finished)
