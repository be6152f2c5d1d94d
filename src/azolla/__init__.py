"""Azolla: a durable, fast, simple async task platform on PostgreSQL.

The public surface::

    from azolla import Client, azolla_task, Worker
    from azolla.retry import RetryPolicy, ExponentialBackoff

Names are imported lazily on first use, so ``import azolla`` stays cheap (task worker processes
import it) and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy __getattr__ below returns, for type checkers
    from azolla.client import (
        Client,
        ClientStats,
        TaskAttempt,
        TaskFailure,
        TaskHandle,
        TaskResult,
        TaskStatus,
        TaskSubmission,
        TaskUpdate,
    )
    from azolla.errors import (
        AuthenticationError,
        AzollaConnectionError,
        AzollaError,
        ClientClosedError,
        OverloadedError,
        ServerError,
        TaskFailedError,
        TaskNotFoundError,
        ValidationError,
        WaitTimeoutError,
    )
    from azolla.retry import ExponentialBackoff, FixedBackoff, LinearBackoff, RetryPolicy

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # client
    "Client": "azolla.client",
    "ClientStats": "azolla.client",
    "TaskAttempt": "azolla.client",
    "TaskFailure": "azolla.client",
    "TaskHandle": "azolla.client",
    "TaskResult": "azolla.client",
    "TaskStatus": "azolla.client",
    "TaskSubmission": "azolla.client",
    "TaskUpdate": "azolla.client",
    # retry policies
    "ExponentialBackoff": "azolla.retry",
    "FixedBackoff": "azolla.retry",
    "LinearBackoff": "azolla.retry",
    "RetryPolicy": "azolla.retry",
    # errors
    "AuthenticationError": "azolla.errors",
    "AzollaConnectionError": "azolla.errors",
    "AzollaError": "azolla.errors",
    "ClientClosedError": "azolla.errors",
    "OverloadedError": "azolla.errors",
    "ServerError": "azolla.errors",
    "TaskFailedError": "azolla.errors",
    "TaskNotFoundError": "azolla.errors",
    "ValidationError": "azolla.errors",
    "WaitTimeoutError": "azolla.errors",
    # defining tasks
    "TaskError": "azolla.tasks",
    "azolla_task": "azolla.tasks",
    "current_task": "azolla.tasks",
    # running tasks
    "Worker": "azolla.worker",
}

__all__ = [  # noqa: RUF022 - grouped like _EXPORTS
    "Client",
    "ClientStats",
    "TaskAttempt",
    "TaskFailure",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
    "TaskSubmission",
    "TaskUpdate",
    "ExponentialBackoff",
    "FixedBackoff",
    "LinearBackoff",
    "RetryPolicy",
    "AuthenticationError",
    "AzollaConnectionError",
    "AzollaError",
    "ClientClosedError",
    "OverloadedError",
    "ServerError",
    "TaskFailedError",
    "TaskNotFoundError",
    "ValidationError",
    "WaitTimeoutError",
    "TaskError",
    "azolla_task",
    "current_task",
    "Worker",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'azolla' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ImportError(
            f"azolla.{name} is not available: its module {module_name} is not part of this "
            "installation yet",
            name=name,
        ) from exc
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
