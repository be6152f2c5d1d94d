"""The pure domain model of Azolla: aggregates, events, retry policy, errors and ports.

Nothing here performs I/O or imports asyncio, asyncpg, grpc or the ``app``/``adapters`` layers.
"""

from azolla.domain.attempt import Attempt
from azolla.domain.errors import (
    AttemptNotRunning,
    AzollaDomainError,
    CapacityExceeded,
    ConcurrencyConflict,
    DuplicateTerminalOutcome,
    InvalidRetryPolicy,
    InvalidTaskSpec,
    InvalidTransition,
    StaleAttempt,
    StoreOverloaded,
    StoreUnavailable,
    TaskAlreadyTerminal,
    TaskNotFound,
    UnsafeDatabaseSettings,
)
from azolla.domain.retry import RetryDecision, RetryPolicy, WaitKind, decide_retry, retry_delay
from azolla.domain.shepherd import Shepherd, ShepherdState
from azolla.domain.task import Task
from azolla.domain.values import AttemptState, ErrorInfo, SpecLimits, TaskState

__all__ = [
    "Attempt",
    "AttemptNotRunning",
    "AttemptState",
    "AzollaDomainError",
    "CapacityExceeded",
    "ConcurrencyConflict",
    "DuplicateTerminalOutcome",
    "ErrorInfo",
    "InvalidRetryPolicy",
    "InvalidTaskSpec",
    "InvalidTransition",
    "RetryDecision",
    "RetryPolicy",
    "Shepherd",
    "ShepherdState",
    "SpecLimits",
    "StaleAttempt",
    "StoreOverloaded",
    "StoreUnavailable",
    "Task",
    "TaskAlreadyTerminal",
    "TaskNotFound",
    "TaskState",
    "UnsafeDatabaseSettings",
    "WaitKind",
    "decide_retry",
    "retry_delay",
]
