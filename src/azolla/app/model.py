"""Plain data exchanged between the orchestrator and its entry points (gRPC, CLI, tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from azolla.domain.retry import RetryPolicy
from azolla.domain.values import DEFAULT_DOMAIN, DEFAULT_GROUP, ErrorInfo, TaskState

__all__ = [
    "AttemptView",
    "OutcomeHook",
    "ReportedOutcome",
    "ShepherdHello",
    "ShepherdView",
    "SubmitRequest",
    "SubmitResult",
    "TaskOutcome",
    "TaskView",
]


@dataclass(frozen=True, slots=True, init=False)
class SubmitRequest:
    """A task to create. Validated by the orchestrator.

    Attributes:
        name: Registered task name.
        args: JSON array text ("" means no positional arguments).
        kwargs: JSON object text ("" means no keyword arguments).
        domain: Isolation domain.
        group: Shepherd group allowed to run it.
        policy: Retry policy; None means the default policy.
        idempotency_key: Submitting twice with the same key in a domain returns the same task.
        priority: Higher runs first.
        not_before: Earliest start (epoch seconds), or None.
        timeout: Per-attempt timeout in seconds, or None.
        task_id: A task id chosen by the submitter (transactional enqueue); None lets the
            orchestrator choose. Submitting a known id again returns it as deduplicated.
    """

    name: str
    args: str = "[]"
    kwargs: str = "{}"
    domain: str = DEFAULT_DOMAIN
    group: str = DEFAULT_GROUP
    policy: RetryPolicy | None = None
    idempotency_key: str | None = None
    priority: int = 0
    not_before: float | None = None
    timeout: float | None = None
    task_id: UUID | None = None

    def __init__(self, name: str, args: str = "[]", kwargs: str = "{}",
                 domain: str = DEFAULT_DOMAIN, group: str = DEFAULT_GROUP,
                 policy: RetryPolicy | None = None, idempotency_key: str | None = None,
                 priority: int = 0, not_before: float | None = None,
                 timeout: float | None = None, task_id: UUID | None = None) -> None:
        # Frozen, so the generated __init__ would call object.__setattr__ per field; the slot
        # descriptors' setters do the same at a third of the cost (one request per task).
        setters = _SUBMIT_SETTERS
        setters[0](self, name)
        setters[1](self, args)
        setters[2](self, kwargs)
        setters[3](self, domain)
        setters[4](self, group)
        setters[5](self, policy)
        setters[6](self, idempotency_key)
        setters[7](self, priority)
        setters[8](self, not_before)
        setters[9](self, timeout)
        setters[10](self, task_id)


_SUBMIT_SETTERS: tuple[Callable[[Any, Any], None], ...] = tuple(
    SubmitRequest.__dict__[name].__set__
    for name in ("name", "args", "kwargs", "domain", "group", "policy", "idempotency_key",
                 "priority", "not_before", "timeout", "task_id"))


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The answer to one :class:`SubmitRequest`.

    Attributes:
        task_id: The task's id.
        deduplicated: True when the idempotency key matched an existing task.
    """

    task_id: UUID
    deduplicated: bool = False


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """A task's terminal outcome.

    Attributes:
        task_id: The task.
        domain: Its domain.
        name: Its name.
        state: succeeded, failed or cancelled.
        result: JSON text of the value when succeeded.
        error: The error when failed or cancelled.
    """

    task_id: UUID
    domain: str
    name: str
    state: TaskState
    result: str | None = None
    error: ErrorInfo | None = None


#: Called after a task's terminal outcome is committed (may be a coroutine function).
OutcomeHook = Callable[[TaskOutcome], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One attempt in a task's history."""

    number: int
    state: str
    shepherd_id: str
    started_at: float
    ended_at: float | None
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class TaskView:
    """A task's current status and attempt history."""

    task_id: UUID
    name: str
    domain: str
    group: str
    state: TaskState
    args: str
    kwargs: str
    submitted_at: float
    ready_at: float
    attempts: tuple[AttemptView, ...]
    result: str | None
    error: ErrorInfo | None

    @property
    def terminal(self) -> bool:
        """True once the task has its outcome."""
        return self.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True, slots=True)
class ShepherdHello:
    """What a shepherd says when it connects.

    Attributes:
        shepherd_uuid: Its id, unique per boot.
        domain: The domain it serves.
        group: The group it serves.
        capacity: Attempts it runs at once.
        version: Its software version.
        accepts_batches: Whether it takes many tasks per message.
        running: ``(task_id, attempt)`` it still runs from before a reconnect.
    """

    shepherd_uuid: str
    domain: str = DEFAULT_DOMAIN
    group: str = DEFAULT_GROUP
    capacity: int = 1
    version: str = ""
    accepts_batches: bool = False
    running: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ReportedOutcome:
    """An attempt's outcome as a shepherd reports it.

    Attributes:
        task_id: The task (text form).
        attempt: The attempt number; 0 when the shepherd did not say (old shepherds).
        ok: True for a value.
        value_json: JSON text of the value.
        error: The error when not ``ok``.
    """

    task_id: str
    attempt: int
    ok: bool
    value_json: str = "null"
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class ShepherdView:
    """A connected shepherd, for operators."""

    shepherd_id: str
    domain: str
    group: str
    capacity: int
    running: int
    version: str
    connected_at: float
    last_seen: float
    extra: dict[str, Any] = field(default_factory=dict)
