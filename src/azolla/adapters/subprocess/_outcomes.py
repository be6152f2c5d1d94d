"""Typed outcomes for attempts that did not end with a result frame."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import orjson

from azolla.adapters.subprocess._frames import KIND_OK
from azolla.adapters.subprocess._output import OutputTail
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

__all__ = [
    "CANCELLED",
    "CPU_LIMIT_EXCEEDED",
    "EXECUTOR_CLOSED",
    "MEMORY_LIMIT_EXCEEDED",
    "TASK_TIMEOUT",
    "WORKER_CRASHED",
    "WORKER_START_FAILED",
    "ExitStatus",
    "cancelled_outcome",
    "closed_outcome",
    "crash_outcome",
    "error_outcome",
    "outcome_from_frame",
    "start_failed_outcome",
    "timeout_outcome",
]

WORKER_CRASHED = "WorkerCrashed"
TASK_TIMEOUT = "TaskTimeout"
MEMORY_LIMIT_EXCEEDED = "MemoryLimitExceeded"
CPU_LIMIT_EXCEEDED = "CpuLimitExceeded"
CANCELLED = "Cancelled"
EXECUTOR_CLOSED = "ExecutorClosed"
WORKER_START_FAILED = "WorkerStartFailed"

_OOM_MARKERS = (
    "MemoryError",
    "Cannot allocate memory",
    "out of memory",
    "Out of memory",
    "std::bad_alloc",
    "memory allocation failed",
)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a worker process ended.

    Attributes:
        code: Exit code when it exited, else None.
        signal: Number of the signal that killed it, else None.
        max_rss_kb: Peak resident set size in KiB, when known.
        known: False when the status could not be observed (the fork server died first).
    """

    code: int | None
    signal: int | None
    max_rss_kb: int | None = None
    known: bool = True

    @classmethod
    def unknown(cls) -> ExitStatus:
        """A status that could not be observed."""
        return cls(code=None, signal=None, known=False)

    def describe(self) -> str:
        """Return e.g. ``"killed by signal SIGSEGV"`` or ``"exited with code 3"``."""
        if not self.known:
            return "ended (exit status unknown)"
        if self.signal is not None:
            return f"killed by signal {_signal_name(self.signal)}"
        return f"exited with code {self.code}"

    def as_data(self) -> dict[str, Any]:
        """Return the status as error details."""
        data: dict[str, Any] = {"exit_code": self.code}
        if self.signal is not None:
            data["signal"] = _signal_name(self.signal)
            data["signal_number"] = self.signal
        if self.max_rss_kb is not None:
            data["max_rss_bytes"] = self.max_rss_kb * 1024
        if not self.known:
            data["exit_status_known"] = False
        return data


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail_data(tail: OutputTail | None) -> dict[str, Any]:
    if tail is None:
        return {}
    text = tail.text()
    return {"stderr_tail": text, "stderr_truncated": tail.truncated} if text else {}


def error_outcome(
    request: ExecutionRequest,
    error_type: str,
    message: str,
    data: dict[str, Any],
    *,
    retriable: bool,
) -> ExecutionOutcome:
    """Build a failed outcome.

    Args:
        request: The attempt.
        error_type: Error type name.
        message: Readable message.
        data: Details (JSON-serialisable).
        retriable: Whether a retry may help.

    Returns:
        The outcome.
    """
    return ExecutionOutcome(
        task_id=request.task_id,
        attempt=request.attempt,
        ok=False,
        error_type=error_type,
        error_message=message,
        error_data=orjson.dumps(data).decode(),
        retriable=retriable,
    )


def outcome_from_frame(
    request: ExecutionRequest, frame: bytes, tail: OutputTail | None = None
) -> ExecutionOutcome:
    """Decode a result frame (see :mod:`._frames`) into an outcome.

    The output tail, when any, is added to the details of failures.

    Raises:
        ValueError: When the frame is malformed.
    """
    if frame[0] == KIND_OK:
        return ExecutionOutcome(
            task_id=request.task_id,
            attempt=request.attempt,
            ok=True,
            value_json=frame[1:].decode(),
        )
    error_type, message, data_json, retriable = orjson.loads(frame[1:])
    data_text = str(data_json)
    extra = _tail_data(tail)
    if extra:
        data = orjson.loads(data_text)
        if isinstance(data, dict):
            for key, value in extra.items():
                data.setdefault(key, value)
            data_text = orjson.dumps(data).decode()
    return ExecutionOutcome(
        task_id=request.task_id,
        attempt=request.attempt,
        ok=False,
        error_type=str(error_type),
        error_message=str(message),
        error_data=data_text,
        retriable=bool(retriable),
    )


def _looks_like_memory_limit(status: ExitStatus, tail_text: str, memory_limit: int | None) -> bool:
    if memory_limit is None:
        return False
    if any(marker in tail_text for marker in _OOM_MARKERS):
        return True
    return status.max_rss_kb is not None and status.max_rss_kb * 1024 >= 0.9 * memory_limit


def crash_outcome(
    request: ExecutionRequest,
    status: ExitStatus,
    tail: OutputTail | None,
    *,
    memory_limit: int | None = None,
    reason: str | None = None,
    pid: int | None = None,
) -> ExecutionOutcome:
    """Outcome of a worker that died without reporting a result.

    ``SIGXCPU`` becomes ``CpuLimitExceeded``; a death under a memory limit whose output shows an
    allocation failure (or whose peak RSS reached 90 % of the limit) becomes
    ``MemoryLimitExceeded``; anything else ``WorkerCrashed``. All are retriable.

    Args:
        request: The attempt.
        status: How the worker ended.
        tail: Its captured output.
        memory_limit: The address-space limit in force, if any.
        reason: Extra explanation (e.g. "fork server died").
        pid: The worker's pid.

    Returns:
        The outcome.
    """
    data = status.as_data()
    if pid is not None:
        data["pid"] = pid
    data.update(_tail_data(tail))
    if reason:
        data["reason"] = reason
    tail_text = str(data.get("stderr_tail", ""))
    what = f"worker process {status.describe()}"
    if reason:
        what = f"{what} ({reason})"
    if status.signal == signal.SIGXCPU:
        return error_outcome(
            request, CPU_LIMIT_EXCEEDED, f"CPU time limit exceeded: {what}", data, retriable=True
        )
    if _looks_like_memory_limit(status, tail_text, memory_limit):
        data["memory_limit"] = memory_limit
        return error_outcome(
            request,
            MEMORY_LIMIT_EXCEEDED,
            f"memory limit of {memory_limit} bytes exceeded: {what}",
            data,
            retriable=True,
        )
    return error_outcome(request, WORKER_CRASHED, what, data, retriable=True)


def timeout_outcome(
    request: ExecutionRequest, timeout: float, tail: OutputTail | None
) -> ExecutionOutcome:
    """Outcome of an attempt that ran past its timeout (retriable)."""
    data: dict[str, Any] = {"timeout_seconds": timeout}
    data.update(_tail_data(tail))
    return error_outcome(
        request, TASK_TIMEOUT, f"attempt timed out after {timeout:g} s", data, retriable=True
    )


def cancelled_outcome(request: ExecutionRequest, tail: OutputTail | None) -> ExecutionOutcome:
    """Outcome of a cancelled attempt (not retriable)."""
    return error_outcome(
        request, CANCELLED, "attempt was cancelled", _tail_data(tail), retriable=False
    )


def closed_outcome(request: ExecutionRequest) -> ExecutionOutcome:
    """Outcome of an attempt stopped because the executor closed (retriable)."""
    return error_outcome(
        request, EXECUTOR_CLOSED, "the executor was closed during the attempt", {}, retriable=True
    )


def start_failed_outcome(request: ExecutionRequest, message: str) -> ExecutionOutcome:
    """Outcome of an attempt for which no worker process could be started (retriable)."""
    return error_outcome(
        request,
        WORKER_START_FAILED,
        f"could not start a worker process: {message}",
        {"reason": message},
        retriable=True,
    )
