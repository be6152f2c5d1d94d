"""Translation between the shepherd's execution types and the wire messages."""

from __future__ import annotations

from azolla.adapters.grpc.pb import common_pb2 as cpb
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

__all__ = ["request_from_task", "result_from_outcome"]


def request_from_task(task: cpb.Task, default_domain: str) -> ExecutionRequest:
    """Translate a pushed ``Task`` into an :class:`ExecutionRequest`.

    Args:
        task: The dispatch payload.
        default_domain: Domain to use when the message names none (old orchestrators).

    Returns:
        The request; ``attempt`` is 0 when the orchestrator did not number the attempt.
    """
    timeout = task.timeout_ms / 1000.0 if task.HasField("timeout_ms") and task.timeout_ms else None
    memory = task.memory_limit if task.HasField("memory_limit") and task.memory_limit else None
    return ExecutionRequest(  # positional (cheaper): task_id, attempt, name, args, kwargs, ...
        task.task_id,
        task.attempt_number,
        task.name,
        task.args or "[]",
        task.kwargs or "{}",
        timeout,
        memory,
        task.domain or default_domain,
    )


def result_from_outcome(outcome: ExecutionOutcome) -> cpb.TaskResult:
    """Translate an attempt's outcome into a ``TaskResult``.

    A value travels as ``json_value`` JSON text (the orchestrator stores results as JSON).
    """
    result = cpb.TaskResult(task_id=outcome.task_id, attempt_number=outcome.attempt)
    if outcome.ok:
        result.success.result.json_value = outcome.value_json
    else:
        result.error.type = outcome.error_type or "UnknownError"
        result.error.message = outcome.error_message
        result.error.data = outcome.error_data or "{}"
        result.error.retriable = outcome.retriable
    return result
