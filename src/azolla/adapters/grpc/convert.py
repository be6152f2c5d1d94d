"""Protobuf <-> domain translation for the gRPC adapter.

Every function here is pure: it takes a generated message (or a domain value) and returns the
other side, raising a domain error with a readable message when the input is unacceptable.
No servicer logic lives here, so the rules of the wire contract can be tested without a server.

Rules applied (see ``docs/wire.md`` and ``/design/WIRE.md``):

* An empty ``domain`` means ``"default"``; an absent or empty ``shepherd_group`` means
  ``"default"``.
* A request without ``retry_policy`` gets the default policy (5 attempts, exponential backoff
  with full jitter, initial 1 s, multiplier 2, cap 300 s). Inside a policy: no ``stop`` or a
  ``stop`` with neither field means 5 attempts; ``stop.max_delay`` without ``max_attempts``
  means no attempt limit (the time limit bounds the retries); no ``wait`` means the default
  wait; an **empty** ``include_errors`` list means every retriable error type. Values out of
  range are refused with ``INVALID_ARGUMENT`` (:class:`~azolla.domain.errors.InvalidRetryPolicy`).
* A task's result is JSON text inside the orchestrator. On the wire it is an ``AnyValue``: a JSON
  string, integer (64-bit), floating-point number or boolean travels in its own ``oneof`` field,
  anything else (objects, arrays, ``null``, integers beyond 64 bits) as ``json_value`` text.
* A result a shepherd reports that cannot be stored as JSON (a non-finite double, a
  ``json_value`` that is not JSON) becomes a non-retriable failure of type ``InvalidResult``;
  a ``TaskResult`` with neither ``success`` nor ``error`` likewise.
* An ``ErrorResult.data`` that is not a JSON object is kept, wrapped: ``{"raw": text}`` when it
  is not JSON at all (or nests deeper than :data:`MAX_ERROR_DATA_NESTING`), ``{"value": v}``
  when it is JSON but not an object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson

from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2
from azolla.app.model import (
    ReportedOutcome,
    ShepherdHello,
    SubmitRequest,
    TaskOutcome,
    TaskView,
)
from azolla.domain.errors import AzollaDomainError, InvalidRetryPolicy, InvalidTaskSpec
from azolla.domain.ports import ExecutionRequest
from azolla.domain.retry import RetryPolicy, WaitKind
from azolla.domain.values import DEFAULT_DOMAIN, DEFAULT_GROUP, ErrorInfo, TaskState, uuid_text

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "INVALID_RESULT",
    "MAX_ERROR_NAMES",
    "STATUS_CODE_BY_STATE",
    "FeatureNotImplemented",
    "any_to_value_json",
    "attempt_of",
    "check_json_text",
    "error_from_proto",
    "error_to_proto",
    "execution_request_to_proto",
    "fill_any",
    "fill_result",
    "fill_task_outcome",
    "hello_from_proto",
    "outcome_to_task_outcome",
    "outcome_to_wait_response",
    "parse_task_id",
    "reported_outcome_from_proto",
    "retry_policy_from_proto",
    "retry_policy_to_proto",
    "submit_request_from_proto",
    "uuid_text",
    "value_json_to_any",
    "view_to_status_response",
    "view_to_update",
    "with_domain",
]

#: Attempts allowed when a policy gives no stop condition at all.
DEFAULT_MAX_ATTEMPTS = 5
#: Error type of a result that could not be stored (see the module docstring).
INVALID_RESULT = "InvalidResult"
#: Most entries of ``include_errors`` or ``exclude_errors``.
MAX_ERROR_NAMES = 1000
#: Longest error type name in a filter list.
MAX_ERROR_NAME_LENGTH = 256
#: Longest shepherd id.
MAX_SHEPHERD_ID_LENGTH = 256
#: Most concurrent attempts a shepherd may announce.
MAX_SHEPHERD_CAPACITY = 1_000_000
#: Deepest nesting of arrays/objects kept as structure in ``ErrorResult.data`` (deeper data is
#: kept as text, ``{"raw": text}``: the event encoder cannot serialise arbitrarily deep values).
MAX_ERROR_DATA_NESTING = 64
#: Upstream task status codes (``GetTaskStatusResponse.status_code``) by task state.
STATUS_CODE_BY_STATE: dict[TaskState, int] = {
    TaskState.QUEUED: 0,  # CREATED
    TaskState.RUNNING: 1,  # ATTEMPT_STARTED
    TaskState.SUCCEEDED: 3,  # SUCCEEDED
    TaskState.RETRY_WAIT: 4,  # ATTEMPT_FAILED_WITH_ATTEMPTS_LEFT
    TaskState.FAILED: 6,  # FAILED
    TaskState.CANCELLED: 6,  # FAILED (the state string says "cancelled")
}

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_COMPLETED = orchestrator_pb2.WAIT_FOR_TASK_STATUS_COMPLETED


class FeatureNotImplemented(AzollaDomainError):
    """The request uses a part of the wire contract this server does not implement (flows)."""

    code = "not_implemented"


# -- small helpers -------------------------------------------------------------------------


def with_domain(domain: str) -> str:
    """Return ``domain``, or ``"default"`` when it is empty."""
    return domain or DEFAULT_DOMAIN


def parse_task_id(text: str) -> UUID | None:
    """Return the task id in ``text``, or None when it is not a UUID."""
    if not text or len(text) > 64:
        return None
    try:
        return UUID(text)
    except ValueError:
        return None


def _ms(seconds: float | None) -> int:
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return 0
    return round(seconds * 1000)


# -- retry policy --------------------------------------------------------------------------


def _error_names(values: Sequence[str], what: str) -> tuple[str, ...]:
    if len(values) > MAX_ERROR_NAMES:
        raise InvalidRetryPolicy(
            f"invalid retry policy: retry.{what} has {len(values)} entries; the limit is "
            f"{MAX_ERROR_NAMES}")
    names: list[str] = []
    for value in values:
        name = value.strip()
        if not name or len(name) > MAX_ERROR_NAME_LENGTH:
            raise InvalidRetryPolicy(
                f"invalid retry policy: retry.{what} entries must be error type names of 1 to "
                f"{MAX_ERROR_NAME_LENGTH} characters, got {value[:40]!r}")
        names.append(name)
    return tuple(dict.fromkeys(names))


def retry_policy_from_proto(message: common_pb2.RetryPolicy) -> RetryPolicy:
    """Translate a wire ``RetryPolicy`` into the domain's, applying the defaults.

    Args:
        message: The wire policy.

    Returns:
        The validated domain policy.

    Raises:
        InvalidRetryPolicy: An unsupported version or a value out of range.
    """
    if message.version not in (0, 1):
        raise InvalidRetryPolicy(
            f"invalid retry policy: version {message.version} is not supported (use 1)")
    raw: dict[str, Any] = {}
    if message.HasField("stop"):
        stop = message.stop
        has_attempts = stop.HasField("max_attempts")
        has_delay = stop.HasField("max_delay")
        if has_attempts:
            raw["max_attempts"] = stop.max_attempts
        elif has_delay:
            raw["max_attempts"] = None
        if has_delay:
            raw["max_total_delay"] = stop.max_delay
    if message.HasField("wait"):
        kind = message.wait.WhichOneof("kind")
        if kind == "fixed":
            raw["wait"] = WaitKind.FIXED
            raw["initial_delay"] = message.wait.fixed.delay
        elif kind in ("exponential", "exponential_jitter"):
            wait = (message.wait.exponential if kind == "exponential"
                    else message.wait.exponential_jitter)
            raw["wait"] = (WaitKind.EXPONENTIAL if kind == "exponential"
                           else WaitKind.EXPONENTIAL_JITTER)
            raw["initial_delay"] = wait.initial_delay
            raw["multiplier"] = wait.multiplier
            raw["max_delay"] = wait.max_delay
    if message.HasField("retry"):
        raw["include_errors"] = _error_names(message.retry.include_errors, "include_errors")
        raw["exclude_errors"] = _error_names(message.retry.exclude_errors, "exclude_errors")
    for key in ("max_total_delay", "initial_delay", "multiplier", "max_delay"):
        value = raw.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            name = {"max_total_delay": "stop.max_delay"}.get(key, f"wait.{key}")
            raise InvalidRetryPolicy(f"invalid retry policy: {name} must be a finite number")
    return RetryPolicy.parse(raw)


def retry_policy_to_proto(policy: RetryPolicy) -> common_pb2.RetryPolicy:
    """Translate a domain policy into its wire form (version 1).

    Args:
        policy: The domain policy.

    Returns:
        A message that :func:`retry_policy_from_proto` maps back to an equal policy (for a
        ``fixed`` wait, whose wire form has no cap, up to the unused ``max_delay``).
    """
    stop = common_pb2.RetryPolicyStop()
    if policy.max_attempts is not None:
        stop.max_attempts = policy.max_attempts
    if policy.max_total_delay is not None:
        stop.max_delay = policy.max_total_delay
    wait = common_pb2.RetryPolicyWait()
    if policy.wait is WaitKind.FIXED:
        wait.fixed.delay = policy.initial_delay
    else:
        target = (wait.exponential if policy.wait is WaitKind.EXPONENTIAL
                  else wait.exponential_jitter)
        target.initial_delay = policy.initial_delay
        target.multiplier = policy.multiplier
        target.max_delay = policy.max_delay
    return common_pb2.RetryPolicy(
        version=1, stop=stop, wait=wait,
        retry=common_pb2.RetryPolicyRetry(include_errors=list(policy.include_errors),
                                          exclude_errors=list(policy.exclude_errors)))


# -- submissions ---------------------------------------------------------------------------


#: Policies parsed from their wire bytes: clients send the same few policies over and over, and
#: parsing one (pydantic validation) costs more than the rest of the request.
_POLICIES: dict[bytes, RetryPolicy] = {}
#: Most entries of :data:`_POLICIES` (it is emptied when full).
MAX_CACHED_POLICIES = 256


def _policy_of(message: common_pb2.RetryPolicy) -> RetryPolicy:
    raw = message.SerializeToString(deterministic=True)
    policy = _POLICIES.get(raw)
    if policy is None:
        policy = retry_policy_from_proto(message)  # raises before anything is cached
        if len(_POLICIES) >= MAX_CACHED_POLICIES:
            _POLICIES.clear()
        _POLICIES[raw] = policy
    return policy


def submit_request_from_proto(message: orchestrator_pb2.CreateTaskRequest) -> SubmitRequest:
    """Translate a ``CreateTaskRequest`` into a :class:`~azolla.app.model.SubmitRequest`.

    Name, args, kwargs and the other bounds are validated by the orchestrator; this checks
    only what the wire form itself can get wrong.

    Args:
        message: The request.

    Returns:
        The submission.

    Raises:
        InvalidRetryPolicy: The retry policy is invalid.
        FeatureNotImplemented: ``flow_instance_id`` is set (flows are not implemented).
    """
    if message.flow_instance_id:
        raise FeatureNotImplemented(
            "flows are not implemented by this server; submit the task without "
            "flow_instance_id")
    # Presence is asked only when a field holds its default value (HasField costs a call).
    key: str | None = message.idempotency_key
    if not key and not message.HasField("idempotency_key"):
        key = None
    not_before_ms = message.not_before_ms
    timeout_ms = message.timeout_ms
    return SubmitRequest(  # positional: name, args, kwargs, domain, group, policy, key, ...
        message.name,
        message.args,
        message.kwargs,
        message.domain or DEFAULT_DOMAIN,
        message.shepherd_group or DEFAULT_GROUP,
        _policy_of(message.retry_policy) if message.HasField("retry_policy") else None,
        key,
        message.priority,
        not_before_ms / 1000.0 if not_before_ms or message.HasField("not_before_ms") else None,
        timeout_ms / 1000.0 if timeout_ms or message.HasField("timeout_ms") else None,
    )


# -- values and errors ---------------------------------------------------------------------


def value_json_to_any(text: str | None) -> common_pb2.AnyValue:
    """Translate a result's JSON text into an ``AnyValue``.

    Strings, 64-bit integers, floating-point numbers and booleans use their own field;
    everything else (objects, arrays, null, larger integers) travels as ``json_value``.

    Args:
        text: JSON text; None is treated as ``null``.

    Returns:
        The wire value.
    """
    value = common_pb2.AnyValue()
    fill_any(value, text)
    return value


def fill_any(target: common_pb2.AnyValue, text: str | None) -> None:
    """Set ``target`` (an empty ``AnyValue``) as :func:`value_json_to_any` would build it."""
    if text is None:
        target.json_value = "null"
        return
    stripped = text.strip()
    first = stripped[:1]
    if first in ("", "{", "[", "n"):
        target.json_value = stripped or "null"
        return
    if stripped == "true" or stripped == "false":
        target.bool_value = stripped == "true"
        return
    try:
        value = json.loads(stripped)
    except ValueError:
        target.json_value = stripped
        return
    if isinstance(value, bool):  # pragma: no cover - "true"/"false" are handled above
        target.bool_value = value
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            target.int_value = value
        else:
            target.json_value = stripped
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    else:  # pragma: no cover - exhaustive above
        target.json_value = stripped


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: The stdlib parser, refusing ``NaN`` and ``Infinity`` (made once: ``json.loads`` with an
#: option builds a new decoder per call).
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)
#: A text this short nests at most 511 levels deep, which both parsers accept; deeper, orjson
#: (limit 1024) would accept texts the stdlib parser refuses by recursion depth.
_FAST_CHECK_MAX_CHARS = 1024


def check_json_text(text: str) -> None:
    """Raise ``ValueError`` (or ``RecursionError``) unless the stdlib parser accepts ``text``
    as JSON without ``NaN``/``Infinity``.

    orjson decides the short texts it accepts (~20× faster); whatever it refuses goes to the
    stdlib parser, which accepts some of it (``1e400``, integers beyond 64 bits, lone
    surrogate escapes). So the answer is always the stdlib parser's.
    """
    if len(text) < _FAST_CHECK_MAX_CHARS:
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            return
    _STRICT_JSON.decode(text)


def any_to_value_json(value: common_pb2.AnyValue) -> str:
    """Translate an ``AnyValue`` into JSON text.

    Args:
        value: The wire value; an empty one means ``null``.

    Returns:
        Compact JSON text.

    Raises:
        ValueError: A non-finite double, or a ``json_value`` that is not valid JSON.
    """
    kind = value.WhichOneof("value")
    if kind is None:
        return "null"
    if kind == "string_value":
        return json.dumps(value.string_value, ensure_ascii=False)
    if kind == "int_value":
        return str(value.int_value)
    if kind == "uint_value":
        return str(value.uint_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "double_value":
        number = value.double_value
        if not math.isfinite(number):
            raise ValueError(f"the result {number} is not a finite number, so not JSON")
        return json.dumps(number)
    text = value.json_value.strip()
    if not text:
        return "null"
    try:
        check_json_text(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the result's json_value is not valid JSON: {exc}") from None
    return text


def error_to_proto(error: ErrorInfo) -> common_pb2.ErrorResult:
    """Translate an :class:`~azolla.domain.values.ErrorInfo` into an ``ErrorResult``."""
    try:
        data = json.dumps(error.data, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        data = "{}"
    return common_pb2.ErrorResult(type=error.type, message=error.message, data=data,
                                  retriable=error.retriable)


def _nesting(value: Any) -> int:
    """Return how deeply arrays and objects nest in a parsed JSON value (iteratively)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _error_data(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return {"raw": text}
    if _nesting(data) > MAX_ERROR_DATA_NESTING:
        return {"raw": text}
    return data if isinstance(data, dict) else {"value": data}


def error_from_proto(error: common_pb2.ErrorResult) -> ErrorInfo:
    """Translate an ``ErrorResult`` into an :class:`~azolla.domain.values.ErrorInfo`.

    An empty ``type`` becomes ``"UnknownError"``; ``data`` is parsed as a JSON object (see the
    module docstring for what happens to anything else).
    """
    return ErrorInfo(type=error.type or "UnknownError", message=error.message,
                     data=_error_data(error.data), retriable=error.retriable)


def reported_outcome_from_proto(result: common_pb2.TaskResult) -> ReportedOutcome:
    """Translate a shepherd's ``TaskResult`` into a :class:`~azolla.app.model.ReportedOutcome`.

    ``attempt_number`` 0 (old shepherds) is passed on as 0: the orchestrator matches it to the
    task's current attempt.
    """
    kind = result.WhichOneof("result_type")
    attempt = result.attempt_number
    if kind == "success":
        try:
            text = any_to_value_json(result.success.result)
        except ValueError as exc:
            return ReportedOutcome(result.task_id, attempt, False, error=ErrorInfo(
                INVALID_RESULT, str(exc), {}, False))
        return ReportedOutcome(result.task_id, attempt, True, text)
    if kind == "error":
        return ReportedOutcome(result.task_id, attempt, False,
                               error=error_from_proto(result.error))
    return ReportedOutcome(result.task_id, attempt, False, error=ErrorInfo(
        INVALID_RESULT, "the shepherd reported a result with neither success nor error", {},
        False))


def execution_request_to_proto(request: ExecutionRequest) -> common_pb2.Task:
    """Translate an attempt to dispatch into the ``Task`` message pushed to a shepherd."""
    task = common_pb2.Task(
        task_id=request.task_id, name=request.name, args=request.args, kwargs=request.kwargs,
        attempt_number=request.attempt, domain=request.domain)
    if request.timeout is not None:
        task.timeout_ms = max(_ms(request.timeout), 1)
    if request.memory_limit is not None:
        task.memory_limit = request.memory_limit
    return task


def hello_from_proto(hello: orchestrator_pb2.Hello) -> ShepherdHello:
    """Translate a shepherd's ``Hello``.

    The shepherd id may be any text (its event stream id is derived from it through a
    namespace, so it can never name a task's or an attempt's stream).

    Raises:
        InvalidTaskSpec: The shepherd id is empty or too long, or the capacity is out of range.
    """
    shepherd_id = hello.shepherd_uuid.strip()
    if not shepherd_id or len(shepherd_id) > MAX_SHEPHERD_ID_LENGTH:
        raise InvalidTaskSpec(
            f"Hello.shepherd_uuid must be 1 to {MAX_SHEPHERD_ID_LENGTH} characters")
    if not 1 <= hello.max_concurrency <= MAX_SHEPHERD_CAPACITY:
        raise InvalidTaskSpec(
            f"Hello.max_concurrency must be between 1 and {MAX_SHEPHERD_CAPACITY}, got "
            f"{hello.max_concurrency}")
    return ShepherdHello(
        shepherd_uuid=shepherd_id,
        domain=with_domain(hello.domain),
        group=hello.shepherd_group or DEFAULT_GROUP,
        capacity=hello.max_concurrency,
        version=hello.version[:128],
        accepts_batches=hello.accepts_batches,
        running=tuple((r.task_id, r.attempt_number) for r in hello.running),
    )


# -- answers -------------------------------------------------------------------------------


def fill_result(message: Any, state: TaskState, result: str | None,
                 error: ErrorInfo | None) -> None:
    """Set the ``success``/``error`` oneof of ``message`` for a terminal ``state``."""
    if state is TaskState.SUCCEEDED:
        fill_any(message.success.result, result)
    elif state is TaskState.FAILED:
        message.error.CopyFrom(error_to_proto(error or ErrorInfo("UnknownError")))
    elif state is TaskState.CANCELLED:
        message.error.CopyFrom(error_to_proto(
            error or ErrorInfo("Cancelled", "the task was cancelled", {}, False)))


def outcome_to_wait_response(outcome: TaskOutcome) -> orchestrator_pb2.WaitForTaskResponse:
    """Build the ``WaitForTaskResponse`` of a finished task."""
    response = orchestrator_pb2.WaitForTaskResponse(status_code=_COMPLETED,
                                                    state=outcome.state.value)
    fill_result(response, outcome.state, outcome.result, outcome.error)
    return response


def outcome_to_task_outcome(outcome: TaskOutcome) -> orchestrator_pb2.TaskOutcome:
    """Build the ``TaskOutcome`` (WatchTasks) of a finished task."""
    message = orchestrator_pb2.TaskOutcome()
    fill_task_outcome(message, outcome)
    return message


def fill_task_outcome(message: orchestrator_pb2.TaskOutcome, outcome: TaskOutcome) -> None:
    """Fill an empty ``TaskOutcome`` (e.g. one just added to a response) for a finished task."""
    message.task_id = uuid_text(outcome.task_id)
    message.status_code = _COMPLETED
    message.state = outcome.state.value
    fill_result(message, outcome.state, outcome.result, outcome.error)


def attempt_of(view: TaskView) -> int:
    """Return the number of the task's latest attempt (0 before the first)."""
    return view.attempts[-1].number if view.attempts else 0


def view_to_update(view: TaskView) -> orchestrator_pb2.TaskUpdate:
    """Build a ``TaskUpdate`` (WatchTask) from a task's view."""
    update = orchestrator_pb2.TaskUpdate(task_id=str(view.task_id), state=view.state.value,
                                         attempt_number=attempt_of(view),
                                         terminal=view.terminal)
    if view.terminal:
        fill_result(update, view.state, view.result, view.error)
    return update


def view_to_status_response(view: TaskView) -> orchestrator_pb2.GetTaskStatusResponse:
    """Build the ``GetTaskStatusResponse`` of a task (with its attempt history)."""
    response = orchestrator_pb2.GetTaskStatusResponse(
        task_id=str(view.task_id), name=view.name, domain=view.domain, state=view.state.value,
        status_code=STATUS_CODE_BY_STATE[view.state], created_at_ms=_ms(view.submitted_at),
        shepherd_group=view.group, args=view.args, kwargs=view.kwargs)
    for attempt in view.attempts:
        info = response.attempts.add(
            number=attempt.number, state=attempt.state, shepherd_id=attempt.shepherd_id,
            started_at_ms=_ms(attempt.started_at), ended_at_ms=_ms(attempt.ended_at))
        if attempt.error is not None:
            info.error.CopyFrom(error_to_proto(attempt.error))
    if view.state in (TaskState.QUEUED, TaskState.RETRY_WAIT) and (
            view.ready_at > view.submitted_at):
        response.next_attempt_at_ms = _ms(view.ready_at)
    if view.terminal:
        fill_result(response, view.state, view.result, view.error)
    return response
