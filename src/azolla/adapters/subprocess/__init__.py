"""Shepherd execution: run task attempts in child worker processes.

Three :class:`~azolla.domain.ports.AttemptExecutor` implementations:

* :class:`ProcessExecutor` (``process`` mode, the default): a fresh process per attempt, forked
  from a fork server that has already imported the task modules;
* :class:`PoolExecutor` (``pool`` mode): long-lived worker processes running one attempt at a
  time, replaced when they die; for throughput;
* :class:`CommandExecutor` (``--worker-command``): any executable that follows the worker
  command-line contract, reporting through the ``azolla.shepherd.Worker`` gRPC service.

Attempt failures are outcomes, never exceptions. Error types produced by the executors
themselves: ``WorkerCrashed``, ``TaskTimeout``, ``MemoryLimitExceeded``, ``CpuLimitExceeded``,
``Cancelled`` (not retriable), ``ExecutorClosed``, ``WorkerStartFailed``, ``ResultTooLarge`` and
``RequestTooLarge`` (not retriable); task-side ones come from :mod:`azolla.tasks`
(``TaskNotFound``, ``TaskValidationError``, ``ResultNotSerializable`` — not retriable — and the
task's own exception types).

Attributes are imported lazily so that worker processes (which import this package on their
way to the fork server module) do not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azolla.adapters.subprocess._base import AttemptAlreadyRunning
    from azolla.adapters.subprocess._forkclient import WorkerStartError
    from azolla.adapters.subprocess.command import CommandExecutor
    from azolla.adapters.subprocess.limits import ResourceLimits, scrub_environment
    from azolla.adapters.subprocess.pool import PoolExecutor
    from azolla.adapters.subprocess.process import ProcessExecutor

__all__ = [
    "AttemptAlreadyRunning",
    "CommandExecutor",
    "PoolExecutor",
    "ProcessExecutor",
    "ResourceLimits",
    "WorkerStartError",
    "scrub_environment",
]

_WHERE = {
    "AttemptAlreadyRunning": "azolla.adapters.subprocess._base",
    "WorkerStartError": "azolla.adapters.subprocess._forkclient",
    "CommandExecutor": "azolla.adapters.subprocess.command",
    "PoolExecutor": "azolla.adapters.subprocess.pool",
    "ProcessExecutor": "azolla.adapters.subprocess.process",
    "ResourceLimits": "azolla.adapters.subprocess.limits",
    "scrub_environment": "azolla.adapters.subprocess.limits",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
