"""Errors raised by the Azolla client SDK.

Every error the SDK raises derives from :class:`AzollaError`; a raw ``grpc.RpcError`` never
reaches the caller. Errors that come from a gRPC status keep the status name in
:attr:`AzollaError.code` and the server's text in :attr:`AzollaError.details`.

Hierarchy::

    AzollaError
    ├── AzollaConnectionError   (also a builtin ConnectionError) server unreachable, deadline
    ├── AuthenticationError     bad or missing token, or not allowed in that domain
    ├── ValidationError         (also a ValueError) bad input, client side or server side
    ├── TaskNotFoundError       (also a LookupError) no such task in the client's domain
    ├── WaitTimeoutError        (also a builtin TimeoutError) a wait ran out of time
    ├── TaskFailedError         raised by ``TaskResult.unwrap()`` / ``TaskHandle.result()``
    ├── ClientClosedError       the client was closed
    └── ServerError             any other server-side failure
        └── OverloadedError     the server pushes back (RESOURCE_EXHAUSTED); retry later

This module imports nothing but the standard library, so it is cheap to import from task code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azolla.client import TaskFailure

__all__ = [
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
    "error_from_status",
]

#: gRPC status names after which repeating the same call may succeed.
RETRIABLE_STATUS_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"})


class AzollaError(Exception):
    """Base class of every error raised by the Azolla client SDK.

    Attributes:
        message: The readable message (also ``str(error)``).
        code: The gRPC status name (e.g. ``"UNAVAILABLE"``) when the error came from a gRPC
            call, else None.
        details: The server's own text for a gRPC error, else None.
    """

    def __init__(self, message: str, *, code: str | None = None, details: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    @property
    def retriable(self) -> bool:
        """Whether repeating the same call could succeed (transient server or network state)."""
        return self.code in RETRIABLE_STATUS_CODES

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.details, dict(self.__dict__)))


def _rebuild(
    cls: type[AzollaError],
    message: str,
    code: str | None,
    details: str | None,
    state: dict[str, Any],
) -> AzollaError:
    error = cls.__new__(cls)
    AzollaError.__init__(error, message, code=code, details=details)
    error.__dict__.update(state)
    return error


class AzollaConnectionError(AzollaError, ConnectionError):
    """The orchestrator could not be reached, the connection broke, or a call ran out of time.

    For a submit that failed this way the task may or may not have been created; submitting
    again with the same idempotency key is always safe.
    """


class AuthenticationError(AzollaError):
    """The server refused the credentials (UNAUTHENTICATED) or the domain (PERMISSION_DENIED)."""


class ValidationError(AzollaError, ValueError):
    """A request is malformed: rejected by the client before sending, or by the server.

    Attributes:
        server_side: True when the server rejected it (INVALID_ARGUMENT / OUT_OF_RANGE).
    """

    @property
    def server_side(self) -> bool:
        """True when the server, not the client, rejected the request."""
        return self.code is not None


class TaskNotFoundError(AzollaError, LookupError):
    """No task with that id exists in the client's domain.

    Attributes:
        task_id: The id that was looked up, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        code: str | None = None,
        details: str | None = None,
    ):
        super().__init__(message, code=code, details=details)
        self.task_id = task_id


class WaitTimeoutError(AzollaError, TimeoutError):
    """A wait ended before the task reached a terminal state; the task itself goes on.

    Attributes:
        task_id: The awaited task (None for a wait on many tasks).
        timeout: The timeout that elapsed, in seconds.
    """

    def __init__(self, message: str, *, task_id: str | None = None, timeout: float | None = None):
        super().__init__(message)
        self.task_id = task_id
        self.timeout = timeout


class TaskFailedError(AzollaError):
    """A task ended without success (failed or cancelled).

    Raised by ``TaskResult.unwrap()`` and ``TaskHandle.result()``; ``TaskHandle.wait()``
    returns the failure in its result instead of raising.

    Attributes:
        task_id: The task that failed.
        error: The task's error: type, message, data and retriable flag.
    """

    def __init__(self, task_id: str, error: TaskFailure):
        super().__init__(f"task {task_id} failed: {error}")
        self.task_id = task_id
        self.error = error


class ClientClosedError(AzollaError):
    """The client was closed (or is closing) and can serve no more calls."""


class ServerError(AzollaError):
    """The server failed to handle a request for a reason not covered by a narrower error."""


class OverloadedError(ServerError):
    """The server is overloaded and refused the request (RESOURCE_EXHAUSTED); retry later.

    Nothing was recorded, so the same request can be sent again.
    """


_BY_STATUS: dict[str, type[AzollaError]] = {
    "UNAVAILABLE": AzollaConnectionError,
    "DEADLINE_EXCEEDED": AzollaConnectionError,
    "CANCELLED": AzollaConnectionError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
    "INVALID_ARGUMENT": ValidationError,
    "OUT_OF_RANGE": ValidationError,
    "NOT_FOUND": TaskNotFoundError,
    "RESOURCE_EXHAUSTED": OverloadedError,
}

_HINTS: dict[str, str] = {
    "UNAVAILABLE": "the orchestrator is unreachable or restarting",
    "DEADLINE_EXCEEDED": "no answer within the call's deadline",
    "CANCELLED": "the call was cancelled before it completed",
    "UNAUTHENTICATED": "missing or invalid token",
    "PERMISSION_DENIED": "the token does not allow this",
    "INVALID_ARGUMENT": "the server rejected the request",
    "OUT_OF_RANGE": "the server rejected the request",
    "NOT_FOUND": "not found",
    "RESOURCE_EXHAUSTED": "the server is overloaded, retry later",
    "UNIMPLEMENTED": "the server does not support this call (is it an older version?)",
    "INTERNAL": "internal server error",
    "UNKNOWN": "unknown server error",
}


def error_from_status(
    code: str, details: str | None, operation: str, *, task_id: str | None = None
) -> AzollaError:
    """Translate a gRPC status into the SDK's error hierarchy.

    Args:
        code: The gRPC status name, e.g. ``"UNAVAILABLE"``.
        details: The server's error text (may be empty).
        operation: What the client was doing, e.g. ``"submit task 'greet_user'"``; starts the
            message.
        task_id: The task concerned, if any (kept on :class:`TaskNotFoundError`).

    Returns:
        An :class:`AzollaError` subclass instance with a readable message.
    """
    cls = _BY_STATUS.get(code, ServerError)
    hint = _HINTS.get(code, code.lower().replace("_", " "))
    text = (details or "").strip()
    message = f"{operation} failed: {hint} ({code})"
    if text and text.lower() != hint:
        message = f"{message}: {text}"
    if cls is TaskNotFoundError:
        return TaskNotFoundError(message, task_id=task_id, code=code, details=details)
    return cls(message, code=code, details=details)
