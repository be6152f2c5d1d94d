"""Conversions between attempt outcomes and the wire's ``azolla.common.TaskResult``.

Used on both ends of the worker command-line contract: ``azolla-worker`` turns its outcome into a
``TaskResult`` for ``Worker.ReportResult``; :class:`~azolla.adapters.subprocess.CommandExecutor`
turns the reported ``TaskResult`` back into an :class:`~azolla.domain.ports.ExecutionOutcome`.

Values: a string travels as ``string_value``, a boolean as ``bool_value``, an integer that fits
in 64 bits as ``int_value``, a float as ``double_value``; anything else (null, lists, objects,
big integers) as ``json_value`` text. Any ``AnyValue`` converts back to JSON text.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from azolla.adapters.grpc.pb import common_pb2
from azolla.domain.ports import ExecutionOutcome

__all__ = [
    "REPORT_TOKEN_METADATA",
    "any_value_to_json",
    "error_result",
    "json_to_any_value",
    "success_result",
    "task_result_to_outcome",
]

#: gRPC metadata key carrying the per-attempt report token (stdin mode of ``azolla-worker``).
REPORT_TOKEN_METADATA = "azolla-report-token"

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def json_to_any_value(value_json: str) -> common_pb2.AnyValue:
    """Encode a JSON value as an ``AnyValue``.

    Args:
        value_json: JSON text.

    Returns:
        The ``AnyValue``.
    """
    try:
        value: Any = orjson.loads(value_json)
    except orjson.JSONDecodeError:
        return common_pb2.AnyValue(json_value=value_json)
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, str):
        return common_pb2.AnyValue(string_value=value)
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float) and math.isfinite(value) and not _integer_literal(value_json):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(json_value=value_json)


def _integer_literal(text: str) -> bool:
    # orjson reads integers beyond 64 bits as floats; keep their exact text instead.
    return not any(c in text for c in ".eE")


def any_value_to_json(value: common_pb2.AnyValue) -> str:
    """Decode an ``AnyValue`` to JSON text (an unset value is ``null``).

    Args:
        value: The ``AnyValue``.

    Returns:
        JSON text.
    """
    kind = value.WhichOneof("value")
    if kind is None:
        return "null"
    if kind == "json_value":
        text = value.json_value
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return orjson.dumps(text).decode()  # not JSON: keep it as a string
        return text
    if kind == "double_value" and not math.isfinite(value.double_value):
        return "null"
    return orjson.dumps(getattr(value, kind)).decode()


def success_result(task_id: str, attempt: int, value_json: str) -> common_pb2.TaskResult:
    """Build the ``TaskResult`` of a successful attempt."""
    return common_pb2.TaskResult(
        task_id=task_id,
        attempt_number=attempt,
        success=common_pb2.SuccessResult(result=json_to_any_value(value_json)),
    )


def error_result(
    task_id: str,
    attempt: int,
    error_type: str,
    message: str,
    data: dict[str, Any],
    retriable: bool,
) -> common_pb2.TaskResult:
    """Build the ``TaskResult`` of a failed attempt."""
    return common_pb2.TaskResult(
        task_id=task_id,
        attempt_number=attempt,
        error=common_pb2.ErrorResult(
            type=error_type,
            message=message,
            data=orjson.dumps(data).decode(),
            retriable=retriable,
        ),
    )


def task_result_to_outcome(
    result: common_pb2.TaskResult, task_id: str, attempt: int
) -> ExecutionOutcome:
    """Turn a reported ``TaskResult`` into an outcome for ``(task_id, attempt)``.

    A result with neither success nor error counts as a success with value ``null``; error data
    that is not a JSON object is wrapped as ``{"data": <text>}``.
    """
    if result.WhichOneof("result_type") == "error":
        error = result.error
        data_text = error.data or "{}"
        try:
            parsed = orjson.loads(data_text)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            data_text = orjson.dumps({"data": data_text}).decode()
        return ExecutionOutcome(
            task_id=task_id,
            attempt=attempt,
            ok=False,
            error_type=error.type or "TaskError",
            error_message=error.message,
            error_data=data_text,
            retriable=error.retriable,
        )
    value_json = "null"
    if result.WhichOneof("result_type") == "success" and result.success.HasField("result"):
        value_json = any_value_to_json(result.success.result)
    return ExecutionOutcome(task_id=task_id, attempt=attempt, ok=True, value_json=value_json)
