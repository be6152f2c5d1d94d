"""Value objects the client returns: results, failures, status, updates; decoded from protobuf."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2
from azolla.errors import TaskFailedError

__all__ = [
    "TaskAttempt",
    "TaskFailure",
    "TaskResult",
    "TaskStatus",
    "TaskUpdate",
]


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """Why a task (or one attempt) failed.

    ``str(failure)`` reads ``"ValueError: bad input"``.

    Attributes:
        type: The error's type name, e.g. ``"ValueError"``.
        message: The error's message.
        data: Extra structured data the task attached (a dict; empty if none).
        retriable: Whether the task marked the error as worth retrying.
    """

    type: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    retriable: bool = False

    def __str__(self) -> str:
        if not self.message:
            return self.type or "error"
        return f"{self.type}: {self.message}" if self.type else self.message


@dataclass(frozen=True, slots=True)
class TaskResult:
    """The terminal outcome of a task, returned by ``TaskHandle.wait()``.

    Attributes:
        task_id: The task's id.
        success: True when the task succeeded.
        value: The task's return value (decoded from JSON) on success, else None.
        error: The failure on failure or cancellation, else None.
        state: The terminal state: ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
    """

    task_id: str
    success: bool
    value: Any = None
    error: TaskFailure | None = None
    state: str = ""

    @property
    def cancelled(self) -> bool:
        """True when the task was cancelled rather than run to an end."""
        return self.state == "cancelled"

    def unwrap(self) -> Any:
        """Return the value on success; raise on failure.

        Raises:
            TaskFailedError: The task failed or was cancelled.
        """
        if self.success:
            return self.value
        raise TaskFailedError(self.task_id, self.error or TaskFailure("UnknownError", ""))

    def __str__(self) -> str:
        if self.success:
            return f"task {self.task_id} succeeded: {self.value!r}"
        return f"task {self.task_id} {self.state or 'failed'}: {self.error}"


@dataclass(frozen=True, slots=True)
class TaskAttempt:
    """One execution of a task.

    Attributes:
        number: The attempt number, from 1.
        state: ``assigned``, ``running``, ``succeeded``, ``failed``, ``lost``, ``timed_out``
            or ``cancelled``.
        shepherd_id: The shepherd that ran it ("" if none yet).
        started_at: When it started (UTC), if it did.
        ended_at: When it ended (UTC), None while it runs.
        error: The attempt's failure, if it failed.
    """

    number: int
    state: str
    shepherd_id: str
    started_at: datetime | None
    ended_at: datetime | None
    error: TaskFailure | None


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of a task, returned by ``TaskHandle.status()``.

    Attributes:
        task_id: The task's id.
        name: The task's name.
        domain: The task's domain.
        state: ``queued``, ``running``, ``retry_wait``, ``succeeded``, ``failed`` or
            ``cancelled``.
        status_code: The upstream numeric status (CREATED 0, ATTEMPT_STARTED 1, SUCCEEDED 3,
            ATTEMPT_FAILED_WITH_ATTEMPTS_LEFT 4, FAILED 6).
        attempts: Every attempt so far, oldest first.
        result: The outcome once terminal, else None.
        created_at: When the task was submitted (UTC).
        shepherd_group: The shepherd group the task runs in.
        args: The positional arguments.
        kwargs: The keyword arguments.
        next_attempt_at: When the next attempt may start (retry wait or not-before), if set.
    """

    task_id: str
    name: str
    domain: str
    state: str
    status_code: int
    attempts: tuple[TaskAttempt, ...]
    result: TaskResult | None
    created_at: datetime | None
    shepherd_group: str
    args: list[Any]
    kwargs: dict[str, Any]
    next_attempt_at: datetime | None

    @property
    def terminal(self) -> bool:
        """True once the task has its final outcome."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """A change of a task's state, yielded by ``TaskHandle.watch()``.

    Attributes:
        task_id: The task's id.
        state: The new state (as in :attr:`TaskStatus.state`).
        attempt_number: The current attempt number (0 before the first).
        terminal: True for the last update, which carries the result.
        result: The outcome when ``terminal``, else None.
    """

    task_id: str
    state: str
    attempt_number: int
    terminal: bool
    result: TaskResult | None


TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


def decode_any_value(value: common_pb2.AnyValue) -> Any:
    """Decode an ``azolla.common.AnyValue``; ``json_value`` is parsed as JSON.

    A ``json_value`` that is not valid JSON is returned as the raw text.
    """
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "json_value":
        try:
            return json.loads(value.json_value)
        except ValueError:
            return value.json_value
    return getattr(value, kind)


def _decode_data(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {"raw": raw}
    return data if isinstance(data, dict) else {"value": data}


def decode_failure(error: common_pb2.ErrorResult) -> TaskFailure:
    """Decode an ``azolla.common.ErrorResult``."""
    return TaskFailure(
        type=error.type,
        message=error.message,
        data=_decode_data(error.data),
        retriable=error.retriable,
    )


class _HasResult(Protocol):
    def HasField(self, field_name: Any, /) -> bool: ...  # protobuf's own method name

    @property
    def success(self) -> common_pb2.SuccessResult: ...

    @property
    def error(self) -> common_pb2.ErrorResult: ...


def decode_result(task_id: str, message: _HasResult, state: str) -> TaskResult:
    """Build a :class:`TaskResult` from any message with the success/error oneof.

    Args:
        task_id: The task's id.
        message: A message with ``success``/``error`` fields (WaitForTaskResponse,
            TaskOutcome, TaskUpdate, GetTaskStatusResponse).
        state: The terminal state name the server sent ("" if none).
    """
    if message.HasField("success"):
        return TaskResult(
            task_id=task_id,
            success=True,
            value=decode_any_value(message.success.result),
            state=state or "succeeded",
        )
    if message.HasField("error"):
        return TaskResult(
            task_id=task_id,
            success=False,
            error=decode_failure(message.error),
            state=state or "failed",
        )
    if state == "succeeded":
        return TaskResult(task_id=task_id, success=True, state=state)
    if state == "cancelled":
        failure = TaskFailure("Cancelled", "the task was cancelled")
        return TaskResult(task_id=task_id, success=False, error=failure, state=state)
    failure = TaskFailure("UnknownError", "the task ended without a result")
    return TaskResult(task_id=task_id, success=False, error=failure, state=state or "failed")


def _time(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _json_or(raw: str, default: Any) -> Any:
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


def decode_status(message: orchestrator_pb2.GetTaskStatusResponse) -> TaskStatus:
    """Decode a ``GetTaskStatusResponse``."""
    attempts = tuple(
        TaskAttempt(
            number=a.number,
            state=a.state,
            shepherd_id=a.shepherd_id,
            started_at=_time(a.started_at_ms),
            ended_at=_time(a.ended_at_ms),
            error=decode_failure(a.error) if a.HasField("error") else None,
        )
        for a in message.attempts
    )
    result = None
    if message.state in TERMINAL_STATES:
        result = decode_result(message.task_id, message, message.state)
    return TaskStatus(
        task_id=message.task_id,
        name=message.name,
        domain=message.domain,
        state=message.state,
        status_code=message.status_code,
        attempts=attempts,
        result=result,
        created_at=_time(message.created_at_ms),
        shepherd_group=message.shepherd_group,
        args=_json_or(message.args, []),
        kwargs=_json_or(message.kwargs, {}),
        next_attempt_at=_time(message.next_attempt_at_ms),
    )


def decode_update(message: orchestrator_pb2.TaskUpdate) -> TaskUpdate:
    """Decode a ``TaskUpdate`` of the WatchTask stream."""
    result = None
    if message.terminal:
        result = decode_result(message.task_id, message, message.state)
    return TaskUpdate(
        task_id=message.task_id,
        state=message.state,
        attempt_number=message.attempt_number,
        terminal=message.terminal,
        result=result,
    )
