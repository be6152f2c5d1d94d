"""TaskHandle: a reference to a submitted task."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from azolla.client._results import TaskResult, TaskStatus, TaskUpdate

if TYPE_CHECKING:
    from azolla.client._client import Client

__all__ = ["TaskHandle"]


class TaskHandle:
    """A submitted task: wait for it, inspect it, cancel it.

    Handles are cheap; get one for any existing task id with :meth:`Client.handle`.

    Attributes:
        task_id: The task's id.
        domain: The task's domain.
        deduplicated: True when the submit matched an earlier task by idempotency key.
    """

    __slots__ = ("_client", "_result", "deduplicated", "domain", "task_id")

    def __init__(
        self, client: Client, task_id: str, domain: str, *, deduplicated: bool = False
    ) -> None:
        self._client = client
        self.task_id = task_id
        self.domain = domain
        self.deduplicated = deduplicated
        self._result: TaskResult | None = None

    async def wait(self, timeout: float | None = None) -> TaskResult:
        """Wait until the task has its final outcome and return it.

        The server pushes the outcome over the client's shared watch stream; nothing polls.
        A failed or cancelled task is *returned* (``result.success`` is False), not raised.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            The outcome: ``.success``, ``.value``, ``.error``, ``.state``.

        Raises:
            WaitTimeoutError: The task did not finish in time (it goes on running).
            TaskNotFoundError: The server knows no such task.
            AzollaConnectionError: The orchestrator stayed unreachable.
            ClientClosedError: The client was closed.
        """
        if self._result is None:
            self._result = await self._client._wait(self.task_id, self.domain, timeout)
        return self._result

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value, raising if it did not succeed.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Raises:
            TaskFailedError: The task failed or was cancelled (``.error`` has the details).
            WaitTimeoutError: The task did not finish in time.
        """
        return (await self.wait(timeout)).unwrap()

    async def status(self) -> TaskStatus:
        """Return the task's current state and attempt history.

        Raises:
            TaskNotFoundError: The server knows no such task.
            AzollaConnectionError: The orchestrator could not be reached.
        """
        return await self._client._status(self.task_id, self.domain)

    async def cancel(self, reason: str = "") -> bool:
        """Ask the orchestrator to cancel the task (a running attempt is stopped).

        Args:
            reason: Recorded with the cancellation.

        Returns:
            True if this call cancelled the task, False if it had already ended.

        Raises:
            TaskNotFoundError: The server knows no such task.
        """
        return await self._client._cancel(self.task_id, self.domain, reason)

    def watch(self) -> AsyncIterator[TaskUpdate]:
        """Stream the task's state changes, ending with the terminal one (which has the result).

        Example:
            >>> async for update in handle.watch():
            ...     print(update.state, update.attempt_number)

        Raises:
            TaskNotFoundError: The server knows no such task.
            AzollaConnectionError: The stream broke.
        """
        return self._client._watch(self.task_id, self.domain)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskHandle):
            return NotImplemented
        return (self.task_id, self.domain) == (other.task_id, other.domain)

    def __hash__(self) -> int:
        return hash((self.task_id, self.domain))

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} domain={self.domain!r}>"
