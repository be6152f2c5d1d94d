"""Domain errors with stable names.

Each error has a ``code`` (stable string) that adapters map to wire statuses, e.g. gRPC
``INVALID_ARGUMENT`` for :class:`InvalidTaskSpec`. See :data:`GRPC_STATUS_BY_CODE`.
"""

from __future__ import annotations

__all__ = [
    "GRPC_STATUS_BY_CODE",
    "AttemptNotRunning",
    "AzollaDomainError",
    "CapacityExceeded",
    "ConcurrencyConflict",
    "DuplicateTerminalOutcome",
    "InvalidRetryPolicy",
    "InvalidTaskSpec",
    "InvalidTransition",
    "StaleAttempt",
    "StoreOverloaded",
    "StoreUnavailable",
    "TaskAlreadyTerminal",
    "TaskNotFound",
    "UnsafeDatabaseSettings",
]


class AzollaDomainError(Exception):
    """Base class of every error the domain and its ports raise."""

    code: str = "azolla_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTaskSpec(AzollaDomainError):
    """A submitted task is malformed (name, args, kwargs, sizes...)."""

    code = "invalid_task_spec"


class InvalidRetryPolicy(AzollaDomainError):
    """A retry policy has values outside their allowed ranges."""

    code = "invalid_retry_policy"


class TaskNotFound(AzollaDomainError):
    """No task with that id exists (in the caller's domain)."""

    code = "task_not_found"


class InvalidTransition(AzollaDomainError):
    """A command is not allowed in the aggregate's current state."""

    code = "invalid_transition"


class TaskAlreadyTerminal(InvalidTransition):
    """The task already has its one terminal outcome."""

    code = "task_already_terminal"


class StaleAttempt(InvalidTransition):
    """An outcome, heartbeat or cancel names an attempt that is not the current one.

    Attributes:
        reported: The attempt number that was reported.
        current: The task's current attempt number (None if no attempt is running).
    """

    code = "stale_attempt"

    def __init__(self, message: str, reported: int, current: int | None) -> None:
        super().__init__(message)
        self.reported = reported
        self.current = current


class AttemptNotRunning(InvalidTransition):
    """The attempt has already ended."""

    code = "attempt_not_running"


class CapacityExceeded(InvalidTransition):
    """A shepherd was asked to take more attempts than it has free slots."""

    code = "capacity_exceeded"


class ConcurrencyConflict(AzollaDomainError):
    """An append named a stream version that already exists."""

    code = "concurrency_conflict"


class DuplicateTerminalOutcome(ConcurrencyConflict):
    """A second terminal event for one task was refused by the store."""

    code = "duplicate_terminal_outcome"


class StoreOverloaded(AzollaDomainError):
    """The event store's queue is full; retry later (backpressure)."""

    code = "store_overloaded"


class StoreUnavailable(AzollaDomainError):
    """The event store cannot be reached, or the commit failed; nothing was recorded."""

    code = "store_unavailable"


class UnsafeDatabaseSettings(AzollaDomainError):
    """The database runs with fsync or synchronous_commit off."""

    code = "unsafe_database_settings"


#: Stable mapping from error code to gRPC status code name (used by the gRPC adapter).
GRPC_STATUS_BY_CODE: dict[str, str] = {
    InvalidTaskSpec.code: "INVALID_ARGUMENT",
    InvalidRetryPolicy.code: "INVALID_ARGUMENT",
    TaskNotFound.code: "NOT_FOUND",
    InvalidTransition.code: "FAILED_PRECONDITION",
    TaskAlreadyTerminal.code: "FAILED_PRECONDITION",
    StaleAttempt.code: "FAILED_PRECONDITION",
    AttemptNotRunning.code: "FAILED_PRECONDITION",
    CapacityExceeded.code: "RESOURCE_EXHAUSTED",
    ConcurrencyConflict.code: "ABORTED",
    DuplicateTerminalOutcome.code: "ABORTED",
    StoreOverloaded.code: "RESOURCE_EXHAUSTED",
    StoreUnavailable.code: "UNAVAILABLE",
    UnsafeDatabaseSettings.code: "FAILED_PRECONDITION",
}
