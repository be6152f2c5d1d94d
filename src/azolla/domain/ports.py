"""Ports: the interfaces through which the application drives the outside world.

Every port is a :class:`typing.Protocol`. I/O methods are ``async``. No driver type (asyncpg
records, protobuf messages, gRPC status) appears in a signature: adapters translate at their
boundary. Contract test suites for the ports live in :mod:`azolla.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

__all__ = [
    "AttemptExecutor",
    "Clock",
    "EventStore",
    "ExecutionOutcome",
    "ExecutionRequest",
    "IdFactory",
    "NewEvent",
    "ShepherdTransport",
    "StoredEvent",
    "TaskSetProjection",
]


@dataclass(frozen=True, slots=True, init=False)
class NewEvent:
    """An event ready to be appended to the log.

    Attributes:
        stream_id: The aggregate (stream) the event belongs to.
        version: Position of the event in its stream, starting at 1. ``(stream_id, version)`` is
            unique: appending a version that exists is a concurrency conflict.
        type: Stable, versioned event type name, e.g. ``"TaskSubmitted.v1"``.
        payload: The event's facts as JSON text (an object).
        domain: The Azolla domain of the task or shepherd the stream belongs to.
        partition_day: Day number (days since the Unix epoch, UTC) of the stream's creation.
            Every event of one stream carries the same value, so storage may partition by it
            and still enforce per-stream uniqueness.
        terminal: True for the one event that records a task's final outcome; a store refuses a
            second terminal event for the same stream.
    """

    stream_id: UUID
    version: int
    type: str
    payload: str
    domain: str
    partition_day: int
    terminal: bool = False

    def __init__(self, stream_id: UUID, version: int, type: str, payload: str,
                 domain: str, partition_day: int, terminal: bool = False) -> None:
        # Frozen, so the generated __init__ would call object.__setattr__ per field; the slot
        # descriptors' setters do the same work at a third of the cost (five events per task).
        setters = _NEW_EVENT_SETTERS
        setters[0](self, stream_id)
        setters[1](self, version)
        setters[2](self, type)
        setters[3](self, payload)
        setters[4](self, domain)
        setters[5](self, partition_day)
        setters[6](self, terminal)


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The ``__set__`` of each named slot descriptor of ``cls`` (bypasses frozen-ness)."""
    return tuple(cls.__dict__[name].__set__ for name in names)


_NEW_EVENT_SETTERS = _slot_setters(NewEvent, (
    "stream_id", "version", "type", "payload", "domain", "partition_day", "terminal"))


@dataclass(frozen=True, slots=True, init=False)
class StoredEvent:
    """An event as recorded in the log.

    Attributes:
        position: Global, strictly increasing position (commit order for one writer).
        stream_id: See :class:`NewEvent`.
        version: See :class:`NewEvent`.
        type: See :class:`NewEvent`.
        payload: See :class:`NewEvent`.
        domain: See :class:`NewEvent`.
        partition_day: See :class:`NewEvent`.
        terminal: See :class:`NewEvent`.
        recorded_at: Commit time as Unix epoch seconds (the store's clock).
    """

    position: int
    stream_id: UUID
    version: int
    type: str
    payload: str
    domain: str
    partition_day: int
    terminal: bool
    recorded_at: float

    def __init__(self, position: int, stream_id: UUID, version: int, type: str,
                 payload: str, domain: str, partition_day: int, terminal: bool,
                 recorded_at: float) -> None:
        # See NewEvent.__init__: start-up folds every retained event through here.
        setters = _STORED_EVENT_SETTERS
        setters[0](self, position)
        setters[1](self, stream_id)
        setters[2](self, version)
        setters[3](self, type)
        setters[4](self, payload)
        setters[5](self, domain)
        setters[6](self, partition_day)
        setters[7](self, terminal)
        setters[8](self, recorded_at)


_STORED_EVENT_SETTERS = _slot_setters(StoredEvent, (
    "position", "stream_id", "version", "type", "payload", "domain", "partition_day",
    "terminal", "recorded_at"))


@runtime_checkable
class EventStore(Protocol):
    """Durable, append-only event log.

    Errors raised (from :mod:`azolla.domain.errors`): ``ConcurrencyConflict`` when a
    ``(stream_id, version)`` already exists (or two events of one batch collide);
    ``DuplicateTerminalOutcome`` when a stream already has a terminal event;
    ``StoreOverloaded`` when the store's pending queue is full (backpressure);
    ``StoreUnavailable`` when the database cannot be reached or the commit failed.
    """

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Append ``events`` atomically: all are committed, or none.

        Returns the positions assigned, in order. Returns only after the events are durable.
        """
        ...

    async def read_stream(self, stream_id: UUID, from_version: int = 1) -> list[StoredEvent]:
        """Return the events of one stream in version order, starting at ``from_version``."""
        ...

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Return up to ``limit`` committed events with position > ``after_position``, in order."""
        ...

    async def max_position(self) -> int:
        """Return the highest committed position (0 for an empty log)."""
        ...

    async def wait_for_events(self, after_position: int, timeout: float) -> int:
        """Wait until an event with position > ``after_position`` is committed, or timeout.

        Returns the highest committed position known (which may still be ``after_position``
        on timeout). Must not busy-poll for the store's own writes.
        """
        ...

    async def close(self) -> None:
        """Flush pending appends and release resources."""
        ...


class Clock(Protocol):
    """Source of wall-clock time."""

    def now(self) -> float:
        """Return the current time as Unix epoch seconds."""
        ...


class IdFactory(Protocol):
    """Source of fresh identifiers and randomness for the domain."""

    def new_task_id(self) -> UUID:
        """Return a fresh, unique task id."""
        ...

    def random(self) -> float:
        """Return a uniform sample from [0, 1) (used for retry jitter)."""
        ...


class TaskSetProjection(Protocol):
    """The in-memory scheduling state, folded from committed events only.

    The orchestrator applies every committed event to it, in position order; it can therefore
    always be rebuilt from the log, and a rebuilt projection equals the live one.
    """

    @property
    def position(self) -> int:
        """The position of the last applied event (0 if none)."""
        ...

    def apply(self, event: StoredEvent) -> None:
        """Fold one committed event into the projection."""
        ...


@dataclass(frozen=True, slots=True, init=False)
class ExecutionRequest:
    """One attempt of a task, as handed to an executor.

    Attributes:
        task_id: The task.
        attempt: The attempt number (fencing token), from 1.
        name: The registered task name.
        args: JSON array text.
        kwargs: JSON object text.
        timeout: Per-attempt timeout in seconds, or None.
        memory_limit: Address-space limit in bytes, or None.
        domain: The task's domain.
    """

    task_id: str
    attempt: int
    name: str
    args: str
    kwargs: str
    timeout: float | None = None
    memory_limit: int | None = None
    domain: str = "default"

    def __init__(self, task_id: str, attempt: int, name: str, args: str, kwargs: str,
                 timeout: float | None = None, memory_limit: int | None = None,
                 domain: str = "default") -> None:
        # Slot setters instead of the frozen dataclass's object.__setattr__ per field (one
        # request per attempt on the shepherd's hot path).
        setters = _REQUEST_SETTERS
        setters[0](self, task_id)
        setters[1](self, attempt)
        setters[2](self, name)
        setters[3](self, args)
        setters[4](self, kwargs)
        setters[5](self, timeout)
        setters[6](self, memory_limit)
        setters[7](self, domain)


_REQUEST_SETTERS = _slot_setters(ExecutionRequest, (
    "task_id", "attempt", "name", "args", "kwargs", "timeout", "memory_limit", "domain"))


@dataclass(frozen=True, slots=True, init=False)
class ExecutionOutcome:
    """What one attempt produced.

    Attributes:
        task_id: The task.
        attempt: The attempt number.
        ok: True when the task returned a value.
        value_json: The JSON text of the returned value when ``ok``.
        error_type: The error's type name when not ``ok`` (e.g. ``"WorkerCrashed"``).
        error_message: Readable message.
        error_data: JSON object text with details (exit code, signal, stderr tail, ...).
        retriable: Whether the error may be retried.
    """

    task_id: str
    attempt: int
    ok: bool
    value_json: str = "null"
    error_type: str = ""
    error_message: str = ""
    error_data: str = "{}"
    retriable: bool = True

    def __init__(self, task_id: str, attempt: int, ok: bool, value_json: str = "null",
                 error_type: str = "", error_message: str = "", error_data: str = "{}",
                 retriable: bool = True) -> None:
        setters = _OUTCOME_SETTERS  # as ExecutionRequest: one outcome per attempt
        setters[0](self, task_id)
        setters[1](self, attempt)
        setters[2](self, ok)
        setters[3](self, value_json)
        setters[4](self, error_type)
        setters[5](self, error_message)
        setters[6](self, error_data)
        setters[7](self, retriable)


_OUTCOME_SETTERS = _slot_setters(ExecutionOutcome, (
    "task_id", "attempt", "ok", "value_json", "error_type", "error_message", "error_data",
    "retriable"))


class AttemptExecutor(Protocol):
    """Runs attempts (in child processes, for the reference shepherd)."""

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt to its outcome. Never raises for task failures."""
        ...

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """Stop a running attempt; True if it was running."""
        ...

    async def close(self) -> None:
        """Stop all children and release resources."""
        ...


class ShepherdTransport(Protocol):
    """Pushes work to one connected shepherd."""

    @property
    def shepherd_id(self) -> str:
        """The shepherd this transport reaches."""
        ...

    async def push(self, tasks: Sequence[ExecutionRequest]) -> None:
        """Deliver tasks (one message each for old shepherds, batched for new ones)."""
        ...

    async def cancel(self, task_id: str, attempt: int, reason: str) -> None:
        """Ask the shepherd to stop a running attempt."""
        ...

    async def close(self, reason: str) -> None:
        """End the connection (e.g. after a heartbeat timeout)."""
        ...
