"""The Azolla client: submit tasks to an orchestrator and wait for their results.

Example:
    >>> async with Client.connect("http://localhost:52710") as client:
    ...     handle = await client.submit_task("greet_user", {"name": "Alice", "age": 25}).submit()
    ...     result = await handle.wait()
"""

from __future__ import annotations

from azolla.client._client import Client, ClientStats
from azolla.client._handle import TaskHandle
from azolla.client._results import TaskAttempt, TaskFailure, TaskResult, TaskStatus, TaskUpdate
from azolla.client._submission import TaskSubmission

__all__ = [
    "Client",
    "ClientStats",
    "TaskAttempt",
    "TaskFailure",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
    "TaskSubmission",
    "TaskUpdate",
]
