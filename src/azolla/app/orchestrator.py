"""The orchestrator: use cases that drive the domain through the ports.

All state changes go through one *decision loop* (an actor). It takes every command that is
waiting (submissions, shepherd results, cancels, lease expiries, dispatch), applies them to the
in-memory aggregates in order, appends all resulting events in **one** atomic append, and only
after that commit updates the TaskSet, answers callers, pushes work to shepherds and wakes
waiters. Commands never interleave, so no locks are needed; a failed commit drops the touched
aggregates (they are reloaded from the log when next needed) and fails exactly the commands of
that batch. The loop batches adaptively and pipelines: while one batch's append is in flight,
the commands that arrived meanwhile are decided as the next batch, which is sent once the first
has committed (and fails with it if it fails). A task submitted when a shepherd of its group
has a free slot, with nothing waiting ahead of it, is started in the batch that accepts it.

Reads (status, wait, watch) are served from the TaskSet, i.e. from committed state only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from azolla.adapters.memory.taskset import TaskRecord, TaskSet
from azolla.app.model import (
    AttemptView,
    OutcomeHook,
    ReportedOutcome,
    ShepherdHello,
    ShepherdView,
    SubmitRequest,
    SubmitResult,
    TaskOutcome,
    TaskView,
)
from azolla.domain.attempt import Attempt
from azolla.domain.errors import (
    AzollaDomainError,
    InvalidTaskSpec,
    InvalidTransition,
    StaleAttempt,
    StoreUnavailable,
    TaskAlreadyTerminal,
    TaskNotFound,
)
from azolla.domain.events import encode_pending_with_payloads, rebuild
from azolla.domain.ports import (
    Clock,
    EventStore,
    ExecutionRequest,
    IdFactory,
    NewEvent,
    ShepherdTransport,
    StoredEvent,
)
from azolla.domain.retry import DEFAULT_POLICY
from azolla.domain.shepherd import Shepherd, ShepherdState
from azolla.domain.task import TIMEOUT_ERROR, Task
from azolla.domain.values import (
    AttemptState,
    ErrorInfo,
    SpecLimits,
    TaskState,
    attempt_stream_id,
    check_finite,
    check_json_array,
    check_json_object,
    check_name,
    parse_uuid,
    shepherd_stream_id,
    uuid_from_int,
    uuid_text,
)

__all__ = ["Orchestrator", "OrchestratorConfig", "ShepherdSession"]

#: Events per read while folding the log at start, and per slice folded between yields.
_FOLD_PAGE = 5_000
_FOLD_SLICE = 1_000

log = logging.getLogger("azolla.orchestrator")

MAX_FUTURE_SECONDS = 10 * 365 * 86_400.0
#: Longest pause of the decision loop after commits that keep failing (seconds).
MAX_COMMIT_BACKOFF = 1.0
#: Passes of the event loop the decision loop yields after sending a batch: one for the
#: append coroutine to queue it, one for the store's writer to hand it to a connection, one
#: for that connection's task to write it (``PostgresEventStore``; a test pins the overlap).
LOOP_PASSES_TO_SEND = 3


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    """Tunables of the orchestrator.

    Attributes:
        heartbeat_interval: How often shepherds must send a Status (seconds).
        heartbeat_timeout: Silence after which a shepherd's stream is closed (seconds).
        lease_grace: Extra time past a task's timeout before the orchestrator times the
            attempt out itself (seconds).
        reconnect_grace: After an orchestrator start, how long recovered running attempts wait
            for their shepherd to reconnect and claim them before they are declared lost.
        max_commands_per_batch: Upper bound on commands decided per commit.
        max_events_per_batch: A batch takes no further command once it holds this many
            events (one command may exceed it).
        domain_concurrency: Optional per-domain limit on running attempts.
        limits: Bounds on submissions.
        outcome_cache: Finished tasks kept in memory (older ones are read from the log).
    """

    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    lease_grace: float = 5.0
    reconnect_grace: float = 10.0
    max_commands_per_batch: int = 4096
    max_events_per_batch: int = 2000
    domain_concurrency: dict[str, int] = field(default_factory=dict)
    limits: SpecLimits = field(default_factory=SpecLimits)
    outcome_cache: int = 100_000


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        """Return ``time.time()``."""
        return time.time()


#: UUIDv7 layout: clear the version and variant bits, then set version 7 and variant 0b10.
_V7_KEEP = ((1 << 128) - 1) & ~(0xF << 76 | 0x3 << 62)
_V7_SET = 0x7 << 76 | 0x2 << 62


class RandomIds:
    """Time-ordered task ids (UUIDv7: 48-bit milliseconds, then random bits) and jitter.

    Ids sort by creation time, which keeps the log's stream index compact in PostgreSQL; the
    random bits come from :func:`os.urandom`, drawn in blocks to keep id creation cheap.
    """

    _BLOCK = 16 * 1024

    def __init__(self) -> None:
        self._random = random.Random()
        self._pool = b""
        self._offset = 0

    def new_task_id(self) -> UUID:
        """Return a fresh UUIDv7."""
        if self._offset + 10 > len(self._pool):
            self._pool = os.urandom(self._BLOCK)
            self._offset = 0
        millis = time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF
        rand = int.from_bytes(self._pool[self._offset:self._offset + 10], "big")
        self._offset += 10
        return uuid_from_int((millis << 80 | rand) & _V7_KEEP | _V7_SET)

    def random(self) -> float:
        """Return a uniform sample from [0, 1)."""
        return self._random.random()


@dataclass(eq=False)
class ShepherdSession:
    """One connected shepherd stream, as the orchestrator tracks it.

    Attributes:
        session_id: Unique per connection.
        shepherd: The aggregate.
        transport: Where to push work.
        accepts_batches: Whether it takes many tasks per message.
        connected_at: Connection time.
        last_seen: Last message time (heartbeat liveness, in memory only).
        cancel_on_connect: Reported attempts it must stop (superseded while it was away).
        closed: Set when the session has ended.
    """

    session_id: int
    shepherd: Shepherd
    transport: ShepherdTransport
    accepts_batches: bool
    connected_at: float
    last_seen: float
    cancel_on_connect: list[tuple[str, int]] = field(default_factory=list)
    closed: bool = False


# -- commands ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Command:
    future: asyncio.Future[Any] | None = None


@dataclass(eq=False)
class _Submit(_Command):
    requests: Sequence[SubmitRequest] = ()


@dataclass(eq=False)
class _Cancel(_Command):
    domain: str = ""
    task_id: UUID | None = None
    reason: str = ""


@dataclass(eq=False)
class _Results(_Command):
    session: ShepherdSession | None = None
    results: Sequence[ReportedOutcome] = ()


@dataclass(eq=False)
class _Acks(_Command):
    session: ShepherdSession | None = None
    acks: Sequence[tuple[str, int]] = ()


@dataclass(eq=False)
class _Connect(_Command):
    hello: ShepherdHello | None = None
    transport: ShepherdTransport | None = None


@dataclass(eq=False)
class _Drain(_Command):
    session: ShepherdSession | None = None


@dataclass(eq=False)
class _Disconnect(_Command):
    session: ShepherdSession | None = None
    reason: str = ""
    expired: bool = False


@dataclass(eq=False)
class _Batch:
    """What one pass of the decision loop produced."""

    events: list[NewEvent] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    touched_tasks: set[UUID] = field(default_factory=set)
    touched_attempts: set[UUID] = field(default_factory=set)
    touched_shepherds: set[str] = field(default_factory=set)
    new_keys: dict[tuple[str, str], UUID] = field(default_factory=dict)
    queued_groups: set[tuple[str, str]] = field(default_factory=set)
    claims: list[TaskRecord] = field(default_factory=list)
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    on_failure: list[Callable[[BaseException], None]] = field(default_factory=list)
    pushes: dict[int, tuple[ShepherdSession, list[ExecutionRequest]]] = field(
        default_factory=dict)
    cancels: list[tuple[ShepherdSession, str, int, str]] = field(default_factory=list)
    reservations: list[tuple[Shepherd, str, int]] = field(default_factory=list)
    released: list[tuple[Shepherd, str, int]] = field(default_factory=list)


    def add(self, encoded: list[tuple[NewEvent, dict[str, Any]]]) -> None:
        """Append encoded events (and their payload dicts)."""
        for event, payload in encoded:
            self.events.append(event)
            self.payloads.append(payload)


@dataclass(eq=False, slots=True)
class _Inflight:
    """A batch whose append has been sent and not yet answered."""

    batch: _Batch
    now: float
    append: asyncio.Future[list[int]]
    started: float


#: Commands decided only when no batch is in flight (see ``Orchestrator._step``).
_BARRIERS = (_Connect, _Disconnect, _Drain, _Cancel)


def _settle(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any] | None, exc: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(exc)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Wakeup:
    """The flag the decision loop sleeps on, with an optional deadline.

    ``asyncio.wait_for(event.wait(), timeout)`` makes a Task, two futures and a timer per
    sleep, and the loop sleeps twice per lone request (for the request, then for its commit);
    this makes one future (and a timer only when a deadline is due).
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Raise the flag and wake the sleeper, if any."""
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        """Lower the flag."""
        self._flag = False

    def is_set(self) -> bool:
        """Whether the flag is up."""
        return self._flag

    async def wait(self, timeout: float | None) -> bool:
        """Sleep until the flag is raised (True) or ``timeout`` seconds pass (False)."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _release, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self._flag


class Orchestrator:
    """Azolla's orchestrator core, independent of any transport.

    Args:
        store: The event log.
        taskset: The scheduling projection (filled from the log by :meth:`start`).
        clock: Wall clock.
        ids: Task ids and jitter.
        config: Tunables.
        hooks: Called with each terminal outcome after it is committed.
    """

    def __init__(
        self,
        store: EventStore,
        taskset: TaskSet | None = None,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        config: OrchestratorConfig | None = None,
        hooks: Iterable[OutcomeHook] = (),
    ) -> None:
        self.store = store
        self.config = config or OrchestratorConfig()
        self.taskset = taskset or TaskSet(outcome_cache=self.config.outcome_cache)
        self.clock = clock or SystemClock()
        self.ids = ids or RandomIds()
        self.hooks = list(hooks)
        self._tasks: dict[UUID, Task] = {}
        self._attempts: dict[UUID, Attempt] = {}
        self._recovered: dict[UUID, list[StoredEvent]] = {}
        self._sessions: dict[int, ShepherdSession] = {}
        self._by_shepherd: dict[str, ShepherdSession] = {}
        self._shepherds: dict[str, Shepherd] = {}
        self._orphans: dict[tuple[UUID, int], float] = {}
        self._pending_loads: set[UUID] = set()
        self._next_session = 1
        self._inbox: deque[_Command] = deque()
        self._wake = _Wakeup()
        self._dispatch_wanted = False
        self._waiters: dict[UUID, list[asyncio.Future[TaskOutcome]]] = {}
        self._watchers: dict[UUID, list[Callable[[TaskRecord], None]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._busy = False
        self._inflight: _Inflight | None = None
        self._failed_commits_in_a_row = 0
        self._needs_catch_up = False
        self._quiet = asyncio.Event()
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self.started_at = 0.0
        self.metrics: dict[str, float] = {
            "commits": 0, "events": 0, "dispatched": 0, "results": 0, "stale_results": 0,
            "commit_failures": 0, "last_commit_seconds": 0.0,
        }
        self.commit_observer: Callable[[float, int], None] | None = None
        self.dispatch_observer: Callable[[float], None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the TaskSet from the log, then start the decision loop."""
        now = self.clock.now()
        self.started_at = now
        self.taskset.advance(now)
        position = self.taskset.position
        pending: dict[UUID, list[StoredEvent]] = {}
        # The next page is read while this one is folded (the database's work and the
        # transfer overlap the fold; the fold yields between slices so the read progresses).
        fetch = asyncio.ensure_future(self.store.read_all(position, _FOLD_PAGE))
        try:
            while page := await fetch:
                fetch = asyncio.ensure_future(self.store.read_all(page[-1].position, _FOLD_PAGE))
                for first in range(0, len(page), _FOLD_SLICE):
                    await asyncio.sleep(0)
                    for stored in page[first:first + _FOLD_SLICE]:
                        self.taskset.apply(stored)
                        if stored.type.startswith(("Task", "Attempt")):
                            pending.setdefault(stored.stream_id, []).append(stored)
                            if stored.terminal:
                                pending.pop(stored.stream_id, None)
        finally:
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(BaseException):
                    await fetch
        # Keep the raw events of unfinished tasks and their attempts; aggregates are built
        # lazily from them on first use.
        for task_id, record in self.taskset.tasks.items():
            if record.terminal:
                continue
            events = pending.get(task_id)
            if events:
                self._recovered[task_id] = events
            for attempt in record.attempts:
                sid = attempt_stream_id(task_id, attempt.number)
                if sid in pending:
                    self._recovered[sid] = pending[sid]
            if record.state is TaskState.RUNNING and record.current_attempt is not None:
                self._orphans[(task_id, record.current_attempt)] = (
                    now + self.config.reconnect_grace)
        self.taskset.advance(self.clock.now())
        self._dispatch_wanted = True
        self._loop_task = asyncio.create_task(self._run(), name="azolla-decision-loop")

    async def stop(self) -> None:
        """Stop taking commands, finish the current batch and stop the loop.

        Running attempts are left as they are; the next start reconciles them.
        """
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._loop_task, timeout=10)
            self._loop_task = None
        for cmd in self._inbox:
            _fail(cmd.future, StoreUnavailable("the orchestrator is shutting down"))
        self._inbox.clear()
        for waiters in self._waiters.values():
            for fut in waiters:
                fut.cancel()
        self._waiters.clear()

    def tick(self) -> None:
        """Wake the decision loop to re-check timers (used with a manual clock in tests)."""
        self._dispatch_wanted = True
        self._wake.set()

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until the decision loop has nothing left to do (for tests and shutdown)."""
        async with asyncio.timeout(timeout):
            while self._inbox or self._dispatch_wanted or self._busy or self._inflight:
                self._quiet.clear()
                await self._quiet.wait()
            await asyncio.sleep(0.005)  # let pushes scheduled by the last step run

    # -- client use cases ------------------------------------------------------------------

    def validate(self, request: SubmitRequest) -> SubmitRequest:
        """Validate a submission; return it with normalised args/kwargs.

        Raises:
            InvalidTaskSpec: With a message naming the field.
        """
        limits = self.config.limits
        check_name(request.name, "task name", limits)
        check_name(request.domain, "domain", limits)
        check_name(request.group, "shepherd group", limits)
        args = check_json_array(request.args, "args", limits)
        kwargs = check_json_object(request.kwargs, "kwargs", limits)
        if len(args.encode()) + len(kwargs.encode()) > limits.max_payload_bytes:
            raise InvalidTaskSpec(f"args and kwargs together exceed {limits.max_payload_bytes}"
                                  " bytes")
        key = request.idempotency_key
        if key is not None and (not key or len(key) > limits.max_idempotency_key_length):
            raise InvalidTaskSpec("idempotency key must be 1 to "
                                  f"{limits.max_idempotency_key_length} characters")
        if not -(2**31) <= request.priority < 2**31:
            raise InvalidTaskSpec("priority must fit in 32 bits")
        check_finite(request.timeout, "timeout", 0.001, MAX_FUTURE_SECONDS)
        check_finite(request.not_before, "not_before", 0.0, self.clock.now() + MAX_FUTURE_SECONDS)
        if args is request.args and kwargs is request.kwargs:
            return request
        return SubmitRequest(
            name=request.name, args=args, kwargs=kwargs, domain=request.domain,
            group=request.group, policy=request.policy, idempotency_key=key,
            priority=request.priority, not_before=request.not_before, timeout=request.timeout,
            task_id=request.task_id,
        )

    async def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitResult]:
        """Create tasks (all or nothing); returns once their events are committed.

        Raises:
            InvalidTaskSpec: A request is malformed (message names its index).
            StoreUnavailable: Nothing was recorded; retrying is safe with idempotency keys.
            StoreOverloaded: Backpressure; retry later.
        """
        return await self.submit_future(requests)

    def submit_future(
        self, requests: Sequence[SubmitRequest]
    ) -> asyncio.Future[list[SubmitResult]]:
        """:meth:`submit` without a coroutine, for callers that answer from a callback.

        Validates at once; the returned future resolves once the tasks' events are committed,
        or fails with the errors :meth:`submit` raises.

        Raises:
            InvalidTaskSpec: A request is malformed (message names its index); nothing queued.
            StoreUnavailable: The orchestrator is shutting down.
        """
        checked: list[SubmitRequest] = []
        for index, request in enumerate(requests):
            try:
                checked.append(self.validate(request))
            except InvalidTaskSpec as exc:
                prefix = f"tasks[{index}]: " if len(requests) > 1 else ""
                raise InvalidTaskSpec(prefix + exc.message) from None
        future: asyncio.Future[list[SubmitResult]] = self._enqueue(_Submit(requests=checked))
        return future

    async def known(self, task_id: UUID) -> bool:
        """True when a task with this id has been committed (in the TaskSet or in the log)."""
        if task_id in self.taskset.tasks:
            return True
        return bool(await self.store.read_stream(task_id))

    async def cancel(self, domain: str, task_id: UUID, reason: str = "cancelled") -> TaskState:
        """Cancel a task; a running attempt is told to stop. Returns the task's state after.

        Raises:
            TaskNotFound: No such task in ``domain``.
            TaskAlreadyTerminal: The task had already ended (its state is in the message).
        """
        state: TaskState = await self._call(_Cancel(domain=domain, task_id=task_id,
                                                     reason=reason))
        return state

    async def status(self, domain: str, task_id: UUID) -> TaskView:
        """Return a task's state and attempt history.

        Raises:
            TaskNotFound: No such task in ``domain``.
        """
        record = self.taskset.tasks.get(task_id)
        if record is not None:
            if record.domain != domain:
                raise TaskNotFound(f"task {task_id} not found")
            return _view(record)
        return await self._status_from_log(domain, task_id)

    async def wait(self, domain: str, task_id: UUID, timeout: float | None) -> TaskOutcome | None:
        """Wait for a task's outcome; None on timeout (``timeout=0`` checks without waiting).

        Raises:
            TaskNotFound: No such task in ``domain``.
        """
        record = self.taskset.tasks.get(task_id)
        if record is None:
            view = await self._status_from_log(domain, task_id)
            if view.terminal:
                return TaskOutcome(view.task_id, view.domain, view.name, view.state,
                                   view.result, view.error)
            record = self.taskset.tasks.get(task_id)
            if record is None:
                return None
        if record.domain != domain:
            raise TaskNotFound(f"task {task_id} not found")
        if record.terminal:
            return _outcome(record)
        if timeout is not None and timeout <= 0:
            return None
        fut: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[task_id]

    def on_outcome(self, task_id: UUID, callback: Callable[[TaskOutcome], None]) -> Callable[
            [], None]:
        """Call ``callback`` once when ``task_id`` ends (at once if it has). Returns an undo."""
        record = self.taskset.tasks.get(task_id)
        if record is not None and record.terminal:
            callback(_outcome(record))
            return lambda: None
        fut: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() else callback(f.result()))
        self._waiters.setdefault(task_id, []).append(fut)

        def undo() -> None:
            waiters = self._waiters.get(task_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[task_id]
            fut.cancel()

        return undo

    def watch(self, task_id: UUID, callback: Callable[[TaskRecord], None]) -> Callable[[], None]:
        """Call ``callback`` with the task's record after every committed change."""
        self._watchers.setdefault(task_id, []).append(callback)

        def undo() -> None:
            watchers = self._watchers.get(task_id)
            if watchers and callback in watchers:
                watchers.remove(callback)
                if not watchers:
                    del self._watchers[task_id]

        return undo

    def list_tasks(self, *, domain: str, state: TaskState | None = None, name: str | None = None,
                   submitted_after: float | None = None, submitted_before: float | None = None,
                   cursor: int = 0, limit: int = 100) -> tuple[list[TaskView], int]:
        """List tasks the TaskSet holds (unfinished ones and recent outcomes), oldest first.

        Args:
            domain: Only this domain.
            state: Only this state.
            name: Only this task name.
            submitted_after: Only tasks submitted at or after this time.
            submitted_before: Only tasks submitted before this time.
            cursor: Resume after this cursor (0 = from the start).
            limit: Page size (1..1000).

        Returns:
            The page, and the cursor of the next page (0 when there is none).
        """
        limit = min(max(limit, 1), 1000)
        matches = sorted(
            (record for record in self.taskset.tasks.values()
             if record.domain == domain and record.seq > cursor
             and (state is None or record.state is state)
             and (name is None or record.name == name)
             and (submitted_after is None or record.submitted_at >= submitted_after)
             and (submitted_before is None or record.submitted_at < submitted_before)),
            key=lambda record: record.seq)
        page = matches[:limit]
        next_cursor = page[-1].seq if len(matches) > limit else 0
        return [_view(record) for record in page], next_cursor

    async def requeue(self, domain: str, task_id: UUID) -> SubmitResult:
        """Run a failed or cancelled task again as a new task with the same name, arguments
        and options (a new attempt sequence). Idempotent per source task.

        Raises:
            TaskNotFound: No such task in ``domain``.
            InvalidTransition: The task has not failed or been cancelled.
        """
        source = rebuild(await self.store.read_stream(task_id))
        if not isinstance(source, Task) or source.domain != domain:
            raise TaskNotFound(f"task {task_id} not found")
        if source.state not in (TaskState.FAILED, TaskState.CANCELLED):
            raise InvalidTransition(f"only failed or cancelled tasks can be requeued; task "
                                    f"{task_id} is {source.state.value}")
        request = SubmitRequest(
            name=source.name, args=source.args, kwargs=source.kwargs, domain=source.domain,
            group=source.group, policy=source.policy,
            idempotency_key=f"azolla-requeue:{task_id}", priority=source.priority,
            timeout=source.timeout)
        [result] = await self.submit([request])
        return result

    def shepherds(self) -> list[ShepherdView]:
        """The connected shepherds."""
        return [
            ShepherdView(
                shepherd_id=s.shepherd.shepherd_uuid, domain=s.shepherd.domain,
                group=s.shepherd.group, capacity=s.shepherd.capacity,
                running=len(s.shepherd.running), version=s.shepherd.software_version,
                connected_at=s.connected_at, last_seen=s.last_seen,
            )
            for s in self._sessions.values() if not s.closed
        ]

    # -- shepherd use cases ----------------------------------------------------------------

    async def connect_shepherd(self, hello: ShepherdHello,
                               transport: ShepherdTransport) -> ShepherdSession:
        """Register a shepherd stream; returns its session (see ``cancel_on_connect``).

        Raises:
            InvalidTransition: Bad capacity, or the same shepherd id is already connected.
        """
        if hello.capacity < 1:
            raise InvalidTransition("max_concurrency must be at least 1")
        session: ShepherdSession = await self._call(_Connect(hello=hello, transport=transport))
        return session

    async def report_results(self, session: ShepherdSession,
                             results: Sequence[ReportedOutcome]) -> None:
        """Record attempt outcomes from a shepherd (stale ones are rejected and recorded)."""
        session.last_seen = self.clock.now()
        await self._call(_Results(session=session, results=results))

    async def report_acks(self, session: ShepherdSession, acks: Sequence[tuple[str, int]]) -> None:
        """Record that attempts are running."""
        session.last_seen = self.clock.now()
        await self._call(_Acks(session=session, acks=acks))

    async def drain_shepherd(self, session: ShepherdSession) -> None:
        """Send the shepherd no more work; it finishes (and reports) what it runs."""
        session.last_seen = self.clock.now()
        await self._call(_Drain(session=session))

    def heartbeat(self, session: ShepherdSession) -> None:
        """Note that the shepherd is alive (in memory only)."""
        session.last_seen = self.clock.now()

    async def disconnect_shepherd(self, session: ShepherdSession, reason: str,
                                  expired: bool = False) -> None:
        """End a shepherd stream; its attempts are lost and retried while attempts remain."""
        if session.closed:
            return
        with contextlib.suppress(AzollaDomainError):
            await self._call(_Disconnect(session=session, reason=reason, expired=expired))

    # -- the decision loop -----------------------------------------------------------------

    async def _call(self, command: _Command) -> Any:
        return await self._enqueue(command)

    def _enqueue(self, command: _Command) -> asyncio.Future[Any]:
        if self._stopping:
            raise StoreUnavailable("the orchestrator is shutting down")
        future = command.future = asyncio.get_running_loop().create_future()
        self._inbox.append(command)
        self._wake.set()
        return future

    def _next_wakeup(self, now: float) -> float | None:
        candidates = [t for t in (self.taskset.next_timer(), self.taskset.next_lease())
                      if t is not None]
        if self._orphans:
            candidates.append(min(self._orphans.values()))
        if self._sessions:
            candidates.append(now + self.config.heartbeat_interval)
        if not candidates:
            return None
        return max(min(candidates) - now, 0.0)

    async def _run(self) -> None:
        while True:
            inflight = self._inflight
            if inflight is not None and inflight.append.done():
                await self._finish_inflight()
                continue
            if not self._inbox and not self._dispatch_wanted:
                if self._stopping and inflight is None:
                    return
                delay = None if inflight is not None else self._next_wakeup(self.clock.now())
                self._wake.clear()
                if inflight is None:
                    self._quiet.set()
                if not self._inbox and not await self._wake.wait(delay):
                    self._dispatch_wanted = True  # a timer, lease or heartbeat deadline is due
                continue
            if self._stopping and not self._inbox and inflight is None:
                return
            self._busy = True
            try:
                await self._step()
            except Exception:  # pragma: no cover - a bug; keep serving
                log.exception("decision loop step failed")
                await asyncio.sleep(0.05)
            finally:
                self._busy = False

    async def _step(self) -> None:
        """Decide one batch, then send it once the batch before it (if any) has committed.

        Pipelining: while batch N's append is in flight, batch N+1 is decided from the
        aggregates N left behind; N+1 is sent only after N's outcome is known (appends stay in
        order), and fails with N if N fails, as if both had been one batch. Commands whose
        decision reads state only a commit makes visible (connects, disconnects, drains,
        cancels) and due expiries wait until nothing is in flight.
        """
        if self._inflight is not None and self._barrier_due():
            await self._settle_inflight()
            return
        if self._needs_catch_up and not await self._catch_up():
            self._failed_commits_in_a_row += 1
            await asyncio.sleep(min(0.001 * 2 ** min(self._failed_commits_in_a_row, 20),
                                    MAX_COMMIT_BACKOFF))
            self._dispatch_wanted = True
            return
        now = self.clock.now()
        self.taskset.advance(now)
        config = self.config
        pipelined = self._inflight is not None
        inbox = self._inbox
        batch = _Batch()
        decided = 0
        # Bounded batches keep commits short, so that deciding the next one overlaps them.
        while (inbox and decided < config.max_commands_per_batch
               and len(batch.events) < config.max_events_per_batch):
            if pipelined and isinstance(inbox[0], _BARRIERS):
                break
            command = inbox.popleft()
            decided += 1
            try:
                await self._decide(command, batch, now)
            except Exception as exc:  # a bug, or a value the domain did not foresee
                # Undo the step as a failed commit would (its earlier commands fail as in a
                # failed commit), fail this command as a bug; later commands stay queued.
                log.exception("deciding %s failed; the step is undone", type(command).__name__)
                await self._settle_inflight()
                self._rollback(batch, StoreUnavailable(
                    "the server could not decide this step; nothing was recorded, retry"))
                _fail(command.future, AzollaDomainError(
                    f"internal error while deciding ({type(exc).__name__}); see the server log"))
                return
        if not pipelined:
            await self._expire(batch, now)
        self._dispatch_wanted = False
        self._dispatch(batch, now)
        if self._inflight is not None and not await self._settle_inflight(then_fail=batch):
            return
        self._send(batch, now)
        if self._inflight is not None and (self._inbox or self._dispatch_wanted):
            # A next step is due: let the store put the batch on the wire first. Deciding is
            # synchronous, so without these passes of the event loop the commit would wait
            # for the whole next step instead of overlapping it. (With nothing to decide, the
            # loop goes to sleep and the store sends at once: a lone submit pays nothing.)
            for _ in range(LOOP_PASSES_TO_SEND):
                await asyncio.sleep(0)

    def _barrier_due(self) -> bool:
        """True when the next step must not overlap the commit in flight."""
        if self._inbox and isinstance(self._inbox[0], _BARRIERS):
            return True
        now = self.clock.now()
        lease = self.taskset.next_lease()
        return ((lease is not None and lease <= now)
                or any(deadline <= now for deadline in self._orphans.values())
                or bool(self._sessions and self.silent_sessions(now)))

    def _send(self, batch: _Batch, now: float) -> None:
        """Start committing ``batch`` (or finish it at once when it holds no events)."""
        if not batch.events:
            self._complete(batch, None, now)
            return
        append = asyncio.ensure_future(self.store.append(batch.events))
        append.add_done_callback(self._wake_on_commit)
        self._inflight = _Inflight(batch, now, append, time.perf_counter())

    def _wake_on_commit(self, _append: asyncio.Future[Any]) -> None:
        self._wake.set()

    async def _settle_inflight(self, then_fail: _Batch | None = None) -> bool:
        """Wait for the batch in flight and finish it; True if it committed.

        When it failed, ``then_fail`` (the batch decided on top of it) is undone and failed
        with it, before the failed batch itself is undone.
        """
        inflight = self._inflight
        if inflight is None:
            return True
        # asyncio.wait neither raises the append's error (handled below) nor swallows a
        # cancellation of the decision loop itself.
        await asyncio.wait({inflight.append})
        return await self._finish_inflight(then_fail)

    async def _finish_inflight(self, then_fail: _Batch | None = None) -> bool:
        inflight = self._inflight
        assert inflight is not None
        assert inflight.append.done()
        self._inflight = None
        batch, now = inflight.batch, inflight.now
        append = inflight.append
        error: AzollaDomainError | None = None
        if append.cancelled():
            error = StoreUnavailable("the append was cancelled")
        elif (raised := append.exception()) is not None:
            if isinstance(raised, AzollaDomainError):
                error = raised
            else:  # an adapter bug or driver error: fail the batch safely
                log.error("append failed: %r", raised)
                error = StoreUnavailable(f"append failed: {raised}")
        if error is not None:
            if then_fail is not None:
                self._rollback(then_fail, error)
            await self._commit_failed(batch, error)
            return False
        positions = append.result()
        self._failed_commits_in_a_row = 0
        elapsed = time.perf_counter() - inflight.started
        self.metrics["commits"] += 1
        self.metrics["events"] += len(batch.events)
        self.metrics["last_commit_seconds"] = elapsed
        if self.commit_observer is not None:
            self.commit_observer(elapsed, len(batch.events))
        self._complete(batch, positions, now, keep=then_fail)
        return True

    def _complete(self, batch: _Batch, positions: list[int] | None, now: float,
                  keep: _Batch | None = None) -> None:
        """Apply a committed batch, answer its callers and push its work.

        Aggregates that ``keep`` (the next batch, decided but not yet sent) touched stay
        cached: the log does not hold that batch's events yet.
        """
        if positions is not None:
            self._apply_committed(batch.events, batch.payloads, positions, now, keep)
        for callback in batch.on_commit:
            callback()
        for session, requests in batch.pushes.values():
            self._push(session, requests)
        for session, task_id, attempt, reason in batch.cancels:
            self._send_cancel(session, task_id, attempt, reason)

    async def _commit_failed(self, batch: _Batch, exc: AzollaDomainError) -> None:
        """Undo a failed commit, then back off (bounded, exponential) before the next try.

        Without the pause, work that keeps failing (an unreachable database, a conflict that
        persists) would make the loop spin at full speed.
        """
        self.metrics["commit_failures"] += 1
        self._rollback(batch, exc)
        if isinstance(exc, StoreUnavailable):
            # The batch may have been committed after all (the connection dropped after it
            # was sent): re-read the log before deciding anything else.
            self._needs_catch_up = True
        self._failed_commits_in_a_row += 1
        pause = min(0.001 * 2 ** min(self._failed_commits_in_a_row, 20), MAX_COMMIT_BACKOFF)
        if self._failed_commits_in_a_row in (1, 10) or pause >= MAX_COMMIT_BACKOFF:
            log.warning("commit failed (%d in a row): %s; retrying in %.3f s",
                        self._failed_commits_in_a_row, exc.message, pause)
        await asyncio.sleep(pause)

    async def _catch_up(self) -> bool:
        """Fold events the TaskSet has not seen (a commit whose outcome was unknown).

        Attempts such a commit started were never pushed to their shepherd: they become
        orphans and are declared lost (and retried) by the next pass. Returns False while the
        log cannot be read.
        """
        changed: set[UUID] = set()
        try:
            while page := await self.store.read_all(self.taskset.position, 10_000):
                for stored in page:
                    self.taskset.apply(stored)
                    if stored.type.startswith("Task"):
                        changed.add(stored.stream_id)
                        self._tasks.pop(stored.stream_id, None)
                    if stored.type == "TaskAttemptStarted.v1":
                        record = self.taskset.tasks.get(stored.stream_id)
                        if record is not None and record.current_attempt is not None:
                            self._orphans[(stored.stream_id, record.current_attempt)] = 0.0
        except AzollaDomainError as exc:
            log.warning("cannot re-read the log yet (%s)", exc.message)
            return False
        if changed:
            log.warning("a commit reported as failed had been recorded: %d tasks caught up",
                        len(changed))
        self.taskset.advance(self.clock.now())
        self._after_apply(changed)
        self._needs_catch_up = False
        self._dispatch_wanted = True
        return True

    def _apply_committed(self, events: list[NewEvent], payloads: list[dict[str, Any]],
                         positions: list[int], now: float, keep: _Batch | None = None) -> None:
        taskset = self.taskset
        changed: set[UUID] = set()
        for event, payload, position in zip(events, payloads, positions, strict=True):
            taskset.apply_parsed(position, event.stream_id, event.version, event.type, payload)
            if event.type.startswith("Task"):
                changed.add(event.stream_id)
        taskset.advance(now)
        self._after_apply(changed, keep)

    def _after_apply(self, changed: set[UUID], keep: _Batch | None = None) -> None:
        """Tell watchers and waiters about committed changes of these tasks."""
        taskset = self.taskset
        for task_id in changed:
            record = taskset.tasks.get(task_id)
            if record is None:
                continue
            watchers = self._watchers.get(task_id)
            if watchers:
                for watcher in list(watchers):
                    watcher(record)
            if record.terminal:
                if keep is None or task_id not in keep.touched_tasks:
                    self._tasks.pop(task_id, None)
                for attempt in record.attempts:
                    attempt_id = attempt.stream_id or attempt_stream_id(task_id, attempt.number)
                    if keep is None or attempt_id not in keep.touched_attempts:
                        self._attempts.pop(attempt_id, None)
                self._finish(record)
            elif record.state is not TaskState.RUNNING:
                self._dispatch_wanted = True

    def _finish(self, record: TaskRecord) -> None:
        outcome = _outcome(record)
        for fut in self._waiters.pop(record.task_id, ()):
            _settle(fut, outcome)
        self._watchers.pop(record.task_id, None)
        for hook in self.hooks:
            try:
                maybe = hook(outcome)
                if inspect.isawaitable(maybe):
                    task = asyncio.ensure_future(maybe)
                    self._hook_tasks.add(task)
                    task.add_done_callback(self._hook_tasks.discard)
            except Exception:
                log.exception("outcome hook failed")

    def _rollback(self, batch: _Batch, exc: AzollaDomainError) -> None:
        for task_id in batch.touched_tasks:
            self._tasks.pop(task_id, None)
        for attempt_id in batch.touched_attempts:
            self._attempts.pop(attempt_id, None)
        for shepherd_id in batch.touched_shepherds:
            self._shepherds.pop(shepherd_id, None)
        for shepherd, task_text, number in batch.reservations:
            shepherd.release(task_text, number)
        for shepherd, task_text, number in batch.released:
            with contextlib.suppress(AzollaDomainError):
                shepherd.reserve(task_text, number)
        self.taskset.unclaim(batch.claims)
        for callback in batch.on_failure:
            callback(exc)
        self._dispatch_wanted = True

    # -- aggregate access --------------------------------------------------------------------

    async def _task(self, task_id: UUID) -> Task | None:
        task = self._tasks.get(task_id)
        if task is not None:
            return task
        events = self._recovered.pop(task_id, None)
        if events is None:
            record = self.taskset.tasks.get(task_id)
            if record is not None and record.terminal:
                return None
            events = await self.store.read_stream(task_id)
        aggregate = rebuild(events)
        if not isinstance(aggregate, Task):
            return None
        if not aggregate.is_terminal:
            self._tasks[task_id] = aggregate
        return aggregate

    async def _attempt(self, task_id: UUID, number: int) -> Attempt | None:
        stream_id = attempt_stream_id(task_id, number)
        attempt = self._attempts.get(stream_id)
        if attempt is not None:
            return attempt
        events = self._recovered.pop(stream_id, None)
        if events is None:
            events = await self.store.read_stream(stream_id)
        aggregate = rebuild(events)
        if not isinstance(aggregate, Attempt):
            return None
        self._attempts[stream_id] = aggregate
        return aggregate

    # -- deciding commands -------------------------------------------------------------------

    async def _decide(self, command: _Command, batch: _Batch, now: float) -> None:
        try:
            if isinstance(command, _Submit):
                self._decide_submit(command, batch, now)
            elif isinstance(command, _Results):
                await self._decide_results(command, batch, now)
            elif isinstance(command, _Acks):
                await self._decide_acks(command, batch, now)
            elif isinstance(command, _Cancel):
                await self._decide_cancel(command, batch, now)
            elif isinstance(command, _Connect):
                await self._decide_connect(command, batch, now)
            elif isinstance(command, _Disconnect):
                await self._decide_disconnect(command, batch, now)
            elif isinstance(command, _Drain):
                self._decide_drain(command, batch, now)
        except AzollaDomainError as exc:
            _fail(command.future, exc)

    def _decide_submit(self, command: _Submit, batch: _Batch, now: float) -> None:
        results: list[SubmitResult] = []
        for request in command.requests:
            if request.idempotency_key is not None:
                key = (request.domain, request.idempotency_key)
                existing = batch.new_keys.get(key) or self.taskset.idempotency.get(key)
                if existing is None and self._inflight is not None:
                    existing = self._inflight.batch.new_keys.get(key)
                if existing is not None:
                    results.append(SubmitResult(existing, deduplicated=True))
                    continue
            task_id = request.task_id or self.ids.new_task_id()
            if request.task_id is not None and (
                    task_id in self.taskset.tasks or task_id in self._tasks):
                results.append(SubmitResult(task_id, deduplicated=True))
                continue
            task = Task.submit(
                task_id=task_id, name=request.name, args=request.args, kwargs=request.kwargs,
                now=now, domain=request.domain, group=request.group,
                policy=request.policy or DEFAULT_POLICY, idempotency_key=request.idempotency_key,
                priority=request.priority, not_before=request.not_before,
                timeout=request.timeout,
            )
            if request.idempotency_key is not None:
                batch.new_keys[(request.domain, request.idempotency_key)] = task_id
            self._tasks[task_id] = task
            batch.touched_tasks.add(task_id)
            batch.add(encode_pending_with_payloads(task))
            session = self._direct_session(task, batch, now)
            if session is None or not self._start_attempt(session, task, batch, now):
                batch.queued_groups.add((task.domain, task.group))
            results.append(SubmitResult(task_id))
        future = command.future
        batch.on_commit.append(lambda: _settle(future, results))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _decide_results(self, command: _Results, batch: _Batch, now: float) -> None:
        session = command.session
        assert session is not None
        for reported in command.results:
            await self._decide_one_result(session, reported, batch, now)
            self.metrics["results"] += 1
        future = command.future
        batch.on_commit.append(lambda: _settle(future, None))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _decide_one_result(self, session: ShepherdSession, reported: ReportedOutcome,
                                 batch: _Batch, now: float) -> None:
        try:
            task_id = parse_uuid(reported.task_id)
        except ValueError:
            log.warning("result for malformed task id %r ignored", reported.task_id)
            return
        shepherd = session.shepherd
        task = await self._task(task_id)
        number = reported.attempt
        if number == 0:  # old shepherds: match the current attempt
            number = (task.current_attempt or 0) if task is not None else 0
        if shepherd.release(reported.task_id, number):
            batch.released.append((shepherd, reported.task_id, number))
            self._dispatch_wanted = True
        if task is None:
            await self._reject(task_id, number, reported, "the task has already ended", batch,
                               now)
            return
        try:
            if reported.ok:
                task.succeed(number, reported.value_json, now)
            else:
                error = reported.error or ErrorInfo("UnknownError", "no error given")
                outcome = "timed_out" if error.type == TIMEOUT_ERROR else "failed"
                task.fail(number, error, now, self.ids.random(), outcome=outcome)
        except (StaleAttempt, TaskAlreadyTerminal) as exc:
            self.metrics["stale_results"] += 1
            await self._reject(task_id, number, reported, exc.message, batch, now)
            return
        batch.touched_tasks.add(task_id)
        batch.add(encode_pending_with_payloads(task))
        attempt = await self._attempt(task_id, number)
        if attempt is not None:
            if reported.ok:
                attempt.end(AttemptState.SUCCEEDED, now)
            else:
                error = reported.error or ErrorInfo("UnknownError")
                state = (AttemptState.TIMED_OUT if error.type == TIMEOUT_ERROR
                         else AttemptState.FAILED)
                attempt.end(state, now, error)
            batch.touched_attempts.add(attempt.id)
            batch.add(encode_pending_with_payloads(attempt))

    async def _reject(self, task_id: UUID, number: int, reported: ReportedOutcome, reason: str,
                      batch: _Batch, now: float) -> None:
        if number < 1:
            return
        attempt = await self._attempt(task_id, number)
        if attempt is None:
            log.warning("result for unknown attempt %s/%s ignored", task_id, number)
            return
        attempt.reject_outcome("succeeded" if reported.ok else "failed", reason, now)
        batch.touched_attempts.add(attempt.id)
        batch.add(encode_pending_with_payloads(attempt))

    async def _decide_acks(self, command: _Acks, batch: _Batch, now: float) -> None:
        for task_id_text, number in command.acks:
            try:
                task_id = UUID(task_id_text)
            except ValueError:
                continue
            record = self.taskset.tasks.get(task_id)
            if record is None or record.state is not TaskState.RUNNING:
                continue
            if number == 0:
                number = record.current_attempt or 0
            if record.current_attempt != number:
                continue
            attempt = await self._attempt(task_id, number)
            if attempt is not None and attempt.state is AttemptState.ASSIGNED:
                attempt.mark_running(now)
                batch.touched_attempts.add(attempt.id)
                batch.add(encode_pending_with_payloads(attempt))
        future = command.future
        batch.on_commit.append(lambda: _settle(future, None))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _decide_cancel(self, command: _Cancel, batch: _Batch, now: float) -> None:
        assert command.task_id is not None
        task_id = command.task_id
        record = self.taskset.tasks.get(task_id)
        if record is None:
            view = await self._status_from_log(command.domain, task_id)
            raise TaskAlreadyTerminal(f"task {task_id} has already {view.state.value}")
        if record.domain != command.domain:
            raise TaskNotFound(f"task {task_id} not found")
        task = await self._task(task_id)
        if task is None or record.terminal:
            raise TaskAlreadyTerminal(f"task {task_id} has already {record.state.value}")
        running = task.cancel(command.reason or "cancelled", now)
        batch.touched_tasks.add(task_id)
        batch.add(encode_pending_with_payloads(task))
        if running is not None:
            attempt = await self._attempt(task_id, running)
            if attempt is not None and attempt.state in (AttemptState.ASSIGNED,
                                                         AttemptState.RUNNING):
                attempt.end(AttemptState.CANCELLED, now)
                batch.touched_attempts.add(attempt.id)
                batch.add(encode_pending_with_payloads(attempt))
                session = self._by_shepherd.get(attempt.shepherd_id)
                if session is not None and not session.closed:
                    batch.cancels.append((session, str(task_id), running, "cancelled"))
                    if session.shepherd.release(str(task_id), running):
                        batch.released.append((session.shepherd, str(task_id), running))
            self._orphans.pop((task_id, running), None)
        future = command.future
        batch.on_commit.append(lambda: _settle(future, TaskState.CANCELLED))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _decide_connect(self, command: _Connect, batch: _Batch, now: float) -> None:
        hello = command.hello
        assert hello is not None
        assert command.transport is not None
        existing = self._by_shepherd.get(hello.shepherd_uuid)
        carried: set[tuple[str, int]] = set()
        if existing is not None and not existing.closed:
            # A reconnect that raced the old stream's end: the new stream wins. The attempts
            # the shepherd reports as still running move to the new stream (not lost, so not
            # run twice); should this batch fail, they become orphans that its next reconnect
            # may claim, and are lost after the reconnect grace.
            carried = existing.shepherd.running & set(hello.running)
            existing.shepherd.running -= carried
            if carried:
                orphaned = {(UUID(t), n): now + self.config.reconnect_grace for t, n in carried}
                batch.on_failure.append(lambda _exc: self._orphans.update(orphaned))
            await self._decide_disconnect(
                _Disconnect(session=existing, reason="replaced by a new connection"), batch,
                now)
        shepherd = self._shepherds.get(hello.shepherd_uuid)
        if shepherd is None:
            stream = await self.store.read_stream(shepherd_stream_id(hello.shepherd_uuid))
            loaded = rebuild(stream)
            shepherd = loaded if isinstance(loaded, Shepherd) else None
        if shepherd is None:
            shepherd = Shepherd.register(
                shepherd_uuid=hello.shepherd_uuid, domain=hello.domain, group=hello.group,
                capacity=hello.capacity, software_version=hello.version, now=now)
        elif shepherd.domain != hello.domain or shepherd.group != hello.group:
            raise InvalidTransition("a shepherd id cannot change its domain or group; "
                                    "use a new shepherd_uuid")
        if shepherd.state is ShepherdState.CONNECTED:
            shepherd.disconnect("stale connection", now)
        shepherd.running.clear()
        shepherd.connect(hello.capacity, hello.version, now)
        self._shepherds[hello.shepherd_uuid] = shepherd
        batch.touched_shepherds.add(hello.shepherd_uuid)
        batch.add(encode_pending_with_payloads(shepherd))
        session = ShepherdSession(
            session_id=self._next_session, shepherd=shepherd, transport=command.transport,
            accepts_batches=hello.accepts_batches, connected_at=now, last_seen=now)
        self._next_session += 1
        # Reconcile what it says it still runs.
        for task_id_text, number in hello.running:
            try:
                task_id = UUID(task_id_text)
            except ValueError:
                continue
            record = self.taskset.tasks.get(task_id)
            adopt = (record is not None and record.state is TaskState.RUNNING
                     and record.current_attempt == number and record.domain == hello.domain
                     and ((task_id, number) in self._orphans
                          or (task_id_text, number) in carried))
            if adopt and record is not None:
                self._orphans.pop((task_id, number), None)
                shepherd.running.add((task_id_text, number))
            elif not (record is not None and record.current_attempt == number
                      and record.state is TaskState.RUNNING):
                session.cancel_on_connect.append((task_id_text, number))
        future = command.future

        def connected() -> None:
            self._sessions[session.session_id] = session
            self._by_shepherd[hello.shepherd_uuid] = session
            self._dispatch_wanted = True
            self._wake.set()
            _settle(future, session)

        batch.on_commit.append(connected)
        batch.on_failure.append(lambda exc: _fail(future, exc))

    def _decide_drain(self, command: _Drain, batch: _Batch, now: float) -> None:
        session = command.session
        assert session is not None
        shepherd = session.shepherd
        if not session.closed and shepherd.state is ShepherdState.CONNECTED:
            shepherd.drain(now)
            batch.touched_shepherds.add(shepherd.shepherd_uuid)
            batch.add(encode_pending_with_payloads(shepherd))
        future = command.future
        batch.on_commit.append(lambda: _settle(future, None))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _decide_disconnect(self, command: _Disconnect, batch: _Batch, now: float) -> None:
        session = command.session
        assert session is not None
        if session.closed:
            _settle(command.future, None)
            return
        session.closed = True
        self._sessions.pop(session.session_id, None)
        if self._by_shepherd.get(session.shepherd.shepherd_uuid) is session:
            del self._by_shepherd[session.shepherd.shepherd_uuid]
        shepherd = session.shepherd
        for task_id_text, number in sorted(shepherd.running):
            await self._lose(UUID(task_id_text), number, f"shepherd {shepherd.shepherd_uuid} "
                             f"{'went silent' if command.expired else 'disconnected'}: "
                             f"{command.reason}", batch, now)
        transport = session.transport
        # Close the stream even if this commit fails: the session is gone from the live state
        # either way (its attempts are retried as orphans), and a stream left open would
        # outlive it, silent and unused.
        batch.on_commit.append(lambda: _spawn(transport.close(command.reason)))
        batch.on_failure.append(lambda _exc: _spawn(transport.close(command.reason)))
        if command.expired:
            shepherd.expire(now)
        else:
            shepherd.disconnect(command.reason, now)
        batch.touched_shepherds.add(shepherd.shepherd_uuid)
        batch.add(encode_pending_with_payloads(shepherd))
        self._dispatch_wanted = True
        future = command.future
        batch.on_commit.append(lambda: _settle(future, None))
        batch.on_failure.append(lambda exc: _fail(future, exc))

    async def _lose(self, task_id: UUID, number: int, reason: str, batch: _Batch,
                    now: float) -> None:
        task = await self._task(task_id)
        if task is None or task.current_attempt != number:
            return
        task.lose(number, reason, now)
        self._retry_on_failure(batch, task_id, number)
        batch.touched_tasks.add(task_id)
        batch.add(encode_pending_with_payloads(task))
        attempt = await self._attempt(task_id, number)
        if attempt is not None and attempt.state in (AttemptState.ASSIGNED, AttemptState.RUNNING):
            attempt.end(AttemptState.LOST, now, ErrorInfo("InfrastructureError", reason))
            batch.touched_attempts.add(attempt.id)
            batch.add(encode_pending_with_payloads(attempt))

    async def _expire(self, batch: _Batch, now: float) -> None:
        """Time out attempts past their lease, lose unclaimed orphans, close silent streams."""
        for silent in self.silent_sessions(now):
            await self._decide_disconnect(
                _Disconnect(session=silent, reason="no heartbeat within "
                            f"{self.config.heartbeat_timeout} s", expired=True), batch, now)
        for task_id, number in self.taskset.expired_leases(now):
            task = await self._task(task_id)
            attempt = await self._attempt(task_id, number)
            if task is None or attempt is None or task.current_attempt != number:
                continue
            error = ErrorInfo(TIMEOUT_ERROR, "the attempt ran past its timeout and lease",
                              {"lease_deadline": attempt.lease_deadline}, True)
            task.fail(number, error, now, self.ids.random(), outcome="timed_out")
            attempt.end(AttemptState.TIMED_OUT, now, error)
            batch.touched_tasks.add(task_id)
            batch.touched_attempts.add(attempt.id)
            batch.add(encode_pending_with_payloads(task))
            batch.add(encode_pending_with_payloads(attempt))
            self._orphans.pop((task_id, number), None)
            self._retry_on_failure(batch, task_id, number)
            session = self._by_shepherd.get(attempt.shepherd_id)
            if session is not None and not session.closed:
                batch.cancels.append((session, str(task_id), number, "lease expired"))
                if session.shepherd.release(str(task_id), number):
                    batch.released.append((session.shepherd, str(task_id), number))
        for key, deadline in list(self._orphans.items()):
            if deadline > now:
                continue
            del self._orphans[key]
            record = self.taskset.tasks.get(key[0])
            if record is None or record.terminal or record.current_attempt != key[1]:
                continue
            reason = "no shepherd reclaimed the attempt after the orchestrator restarted"
            await self._lose(key[0], key[1], reason, batch, now)

    def _retry_on_failure(self, batch: _Batch, task_id: UUID, number: int) -> None:
        """If the batch fails, treat the attempt as an orphan so a later pass ends it."""
        batch.on_failure.append(
            lambda _exc: self._orphans.__setitem__((task_id, number), 0.0))

    def silent_sessions(self, now: float) -> list[ShepherdSession]:
        """Sessions that sent nothing for longer than the heartbeat timeout."""
        limit = now - self.config.heartbeat_timeout
        return [s for s in self._sessions.values() if not s.closed and s.last_seen < limit]

    # -- dispatch ----------------------------------------------------------------------------

    def _running_in(self, domain: str) -> int:
        return sum(len(s.shepherd.running) for s in self._sessions.values()
                   if s.shepherd.domain == domain)

    def _dispatch(self, batch: _Batch, now: float) -> None:
        if not self._sessions:
            return
        taskset = self.taskset
        for session in list(self._sessions.values()):
            shepherd = session.shepherd
            if session.closed or shepherd.free_slots <= 0 \
                    or shepherd.state is not ShepherdState.CONNECTED:
                continue
            domain, group = shepherd.domain, shepherd.group
            if taskset.ready_count(domain, group) <= 0:
                continue
            free = self._free_slots(session)
            if free <= 0:
                continue
            records = taskset.claim(domain, group, free)
            for record in records:
                task = self._tasks.get(record.task_id)
                if task is None:
                    events = self._recovered.pop(record.task_id, None)
                    loaded = rebuild(events) if events else None
                    if not isinstance(loaded, Task):
                        # Not loadable without I/O here: put it back for the next pass.
                        taskset.unclaim([record])
                        self._pending_loads.add(record.task_id)
                        continue
                    task = self._tasks[record.task_id] = loaded
                if self._start_attempt(session, task, batch, now):
                    batch.claims.append(record)
                else:
                    taskset.unclaim([record])
        if self._pending_loads:
            asyncio.get_running_loop().create_task(self._load_pending())

    def _free_slots(self, session: ShepherdSession) -> int:
        """Slots of a connected session that may take work now (domain limits included)."""
        free = session.shepherd.free_slots
        cap = self.config.domain_concurrency.get(session.shepherd.domain)
        if cap is not None:
            free = min(free, cap - self._running_in(session.shepherd.domain))
        return free

    def _start_attempt(self, session: ShepherdSession, task: Task, batch: _Batch,
                       now: float) -> bool:
        """Start the task's next attempt on ``session`` in ``batch``; False if it cannot."""
        shepherd = session.shepherd
        try:
            number = task.start_attempt(shepherd.shepherd_uuid, now)
        except InvalidTransition:
            return False
        task_id = task.id
        lease = (now + task.timeout + self.config.lease_grace
                 if task.timeout is not None else None)
        attempt = Attempt.assign(
            task_id=task_id, number=number, shepherd_id=shepherd.shepherd_uuid,
            lease_deadline=lease, domain=task.domain, partition_day=task.partition_day,
            now=now)
        self._attempts[attempt.id] = attempt
        task_text = uuid_text(task_id)
        shepherd.reserve(task_text, number)
        batch.reservations.append((shepherd, task_text, number))
        batch.touched_tasks.add(task_id)
        batch.touched_attempts.add(attempt.id)
        batch.add(encode_pending_with_payloads(task))
        batch.add(encode_pending_with_payloads(attempt))
        request = ExecutionRequest(
            task_id=task_text, attempt=number, name=task.name, args=task.args,
            kwargs=task.kwargs, timeout=task.timeout, domain=task.domain)
        entry = batch.pushes.setdefault(session.session_id, (session, []))
        entry[1].append(request)
        return True

    def _direct_session(self, task: Task, batch: _Batch, now: float) -> ShepherdSession | None:
        """A session that may start a just-submitted task in the same commit, or None.

        Only when nothing of the task's (domain, group) waits ahead of it (committed, in this
        batch or in the batch in flight), so priority and age order hold.
        """
        if not self._sessions or task.ready_at > now:
            return None
        key = (task.domain, task.group)
        if key in batch.queued_groups or self.taskset.ready_count(*key) > 0:
            return None
        inflight = self._inflight
        if inflight is not None and key in inflight.batch.queued_groups:
            return None
        for session in self._sessions.values():
            shepherd = session.shepherd
            if (shepherd.domain == task.domain and shepherd.group == task.group
                    and not session.closed and shepherd.state is ShepherdState.CONNECTED
                    and self._free_slots(session) > 0):
                return session
        return None

    async def _load_pending(self) -> None:
        ids, self._pending_loads = self._pending_loads, set()
        for task_id in ids:
            with contextlib.suppress(AzollaDomainError):
                await self._task(task_id)
        self._dispatch_wanted = True
        self._wake.set()

    def _push(self, session: ShepherdSession, requests: list[ExecutionRequest]) -> None:
        if session.closed:
            return
        self.metrics["dispatched"] += len(requests)
        if self.dispatch_observer is not None:
            self.dispatch_observer(float(len(requests)))
        task = asyncio.ensure_future(session.transport.push(requests))
        task.add_done_callback(_log_failure)

    def _send_cancel(self, session: ShepherdSession, task_id: str, attempt: int,
                     reason: str) -> None:
        task = asyncio.ensure_future(session.transport.cancel(task_id, attempt, reason))
        task.add_done_callback(_log_failure)

    async def _status_from_log(self, domain: str, task_id: UUID) -> TaskView:
        aggregate = rebuild(await self.store.read_stream(task_id))
        if not isinstance(aggregate, Task) or aggregate.domain != domain:
            raise TaskNotFound(f"task {task_id} not found")
        attempts: list[AttemptView] = []
        for number in range(1, aggregate.attempts + 1):
            attempt = rebuild(await self.store.read_stream(attempt_stream_id(task_id, number)))
            if isinstance(attempt, Attempt):
                attempts.append(AttemptView(number, attempt.state.value, attempt.shepherd_id,
                                            attempt.started_at, attempt.ended_at, attempt.error))
        error = aggregate.error
        if aggregate.state is TaskState.CANCELLED:
            error = ErrorInfo("Cancelled", "cancelled", {}, False)
        return TaskView(
            task_id=task_id, name=aggregate.name, domain=aggregate.domain, group=aggregate.group,
            state=aggregate.state, args=aggregate.args, kwargs=aggregate.kwargs,
            submitted_at=aggregate.submitted_at, ready_at=aggregate.ready_at,
            attempts=tuple(attempts), result=aggregate.result, error=error)


def _spawn(awaitable: Any) -> None:
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("push to shepherd failed: %s", task.exception())


def _error(raw: dict[str, Any] | None) -> ErrorInfo | None:
    return ErrorInfo.from_dict(raw) if raw else None


def _outcome(record: TaskRecord) -> TaskOutcome:
    return TaskOutcome(record.task_id, record.domain, record.name, record.state, record.result,
                       _error(record.error))


def _view(record: TaskRecord) -> TaskView:
    return TaskView(
        task_id=record.task_id, name=record.name, domain=record.domain, group=record.group,
        state=record.state, args=record.args, kwargs=record.kwargs,
        submitted_at=record.submitted_at, ready_at=record.ready_at,
        attempts=tuple(AttemptView(a.number, a.state.value, a.shepherd_id, a.started_at,
                                   a.ended_at, _error(a.error)) for a in record.attempts),
        result=record.result, error=_error(record.error),
    )
