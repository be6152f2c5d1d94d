"""Protobuf <-> domain translation of the gRPC adapter (pure: no server)."""

from __future__ import annotations

import json
import math
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azolla.adapters.grpc import convert
from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2
from azolla.app.model import AttemptView, TaskOutcome, TaskView
from azolla.domain.errors import InvalidRetryPolicy, InvalidTaskSpec
from azolla.domain.ports import ExecutionRequest
from azolla.domain.retry import RetryPolicy, WaitKind
from azolla.domain.values import ErrorInfo, TaskState

pytestmark = pytest.mark.timeout(10)


# -- retry policy ----------------------------------------------------------------------------


def test_request_without_policy_gets_the_documented_default() -> None:
    request = convert.submit_request_from_proto(orchestrator_pb2.CreateTaskRequest(name="t"))
    assert request.policy is None  # the orchestrator applies RetryPolicy()
    default = RetryPolicy()
    assert (default.max_attempts, default.wait, default.initial_delay, default.multiplier,
            default.max_delay) == (5, WaitKind.EXPONENTIAL_JITTER, 1.0, 2.0, 300.0)


def test_empty_policy_message_equals_the_default() -> None:
    assert convert.retry_policy_from_proto(common_pb2.RetryPolicy()) == RetryPolicy()
    assert convert.retry_policy_from_proto(common_pb2.RetryPolicy(version=1)) == RetryPolicy()


def test_stop_without_fields_keeps_five_attempts() -> None:
    policy = convert.retry_policy_from_proto(
        common_pb2.RetryPolicy(version=1, stop=common_pb2.RetryPolicyStop()))
    assert policy.max_attempts == 5
    assert policy.max_total_delay is None


def test_max_delay_without_max_attempts_means_no_attempt_limit() -> None:
    policy = convert.retry_policy_from_proto(common_pb2.RetryPolicy(
        version=1, stop=common_pb2.RetryPolicyStop(max_delay=60.0)))
    assert policy.max_attempts is None
    assert policy.max_total_delay == 60.0


def test_both_stop_fields() -> None:
    policy = convert.retry_policy_from_proto(common_pb2.RetryPolicy(
        version=1, stop=common_pb2.RetryPolicyStop(max_attempts=3, max_delay=10.0)))
    assert (policy.max_attempts, policy.max_total_delay) == (3, 10.0)


@pytest.mark.parametrize(
    ("wait", "expected"),
    [
        (common_pb2.RetryPolicyWait(fixed=common_pb2.RetryPolicyFixedWait(delay=2.5)),
         (WaitKind.FIXED, 2.5, None, None)),
        (common_pb2.RetryPolicyWait(exponential=common_pb2.RetryPolicyExponentialWait(
            initial_delay=0.5, multiplier=3, max_delay=30)),
         (WaitKind.EXPONENTIAL, 0.5, 3.0, 30.0)),
        (common_pb2.RetryPolicyWait(
            exponential_jitter=common_pb2.RetryPolicyExponentialJitterWait(
                initial_delay=1, multiplier=2, max_delay=60)),
         (WaitKind.EXPONENTIAL_JITTER, 1.0, 2.0, 60.0)),
    ],
)
def test_wait_kinds(wait: common_pb2.RetryPolicyWait,
                    expected: tuple[WaitKind, float, float | None, float | None]) -> None:
    policy = convert.retry_policy_from_proto(common_pb2.RetryPolicy(version=1, wait=wait))
    kind, initial, multiplier, cap = expected
    assert policy.wait is kind
    assert policy.initial_delay == initial
    if multiplier is not None:
        assert policy.multiplier == multiplier
        assert policy.max_delay == cap


def test_empty_include_list_means_every_error_type() -> None:
    policy = convert.retry_policy_from_proto(common_pb2.RetryPolicy(
        version=1, retry=common_pb2.RetryPolicyRetry(exclude_errors=["KeyError"])))
    assert policy.include_errors == ()
    assert policy.exclude_errors == ("KeyError",)


def test_error_lists_are_trimmed_and_deduplicated() -> None:
    policy = convert.retry_policy_from_proto(common_pb2.RetryPolicy(
        version=1, retry=common_pb2.RetryPolicyRetry(
            include_errors=[" ValueError", "ValueError", "OSError"])))
    assert policy.include_errors == ("ValueError", "OSError")


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        (common_pb2.RetryPolicy(version=2), "version 2"),
        (common_pb2.RetryPolicy(stop=common_pb2.RetryPolicyStop(max_attempts=0)),
         "max_attempts"),
        (common_pb2.RetryPolicy(stop=common_pb2.RetryPolicyStop(max_attempts=4_000_000_000)),
         "max_attempts"),
        (common_pb2.RetryPolicy(stop=common_pb2.RetryPolicyStop(max_delay=-1)),
         "max_total_delay"),
        (common_pb2.RetryPolicy(stop=common_pb2.RetryPolicyStop(max_delay=math.nan)),
         "stop.max_delay"),
        (common_pb2.RetryPolicy(wait=common_pb2.RetryPolicyWait(
            exponential=common_pb2.RetryPolicyExponentialWait(
                initial_delay=1, multiplier=0.5, max_delay=10))), "multiplier"),
        (common_pb2.RetryPolicy(wait=common_pb2.RetryPolicyWait(
            exponential=common_pb2.RetryPolicyExponentialWait(
                initial_delay=math.inf, multiplier=2, max_delay=10))), "initial_delay"),
        (common_pb2.RetryPolicy(wait=common_pb2.RetryPolicyWait(
            fixed=common_pb2.RetryPolicyFixedWait(delay=1e12))), "initial_delay"),
        (common_pb2.RetryPolicy(retry=common_pb2.RetryPolicyRetry(include_errors=[""])),
         "include_errors"),
        (common_pb2.RetryPolicy(retry=common_pb2.RetryPolicyRetry(
            exclude_errors=["E"] * 1001)), "exclude_errors"),
    ],
)
def test_absurd_policies_are_refused_readably(policy: common_pb2.RetryPolicy,
                                              fragment: str) -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        convert.retry_policy_from_proto(policy)
    assert fragment in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(max_attempts=None, max_total_delay=100.0, wait=WaitKind.EXPONENTIAL,
                    initial_delay=0.25, multiplier=3.0, max_delay=9.0),
        RetryPolicy(max_attempts=2, wait=WaitKind.FIXED, initial_delay=4.0,
                    include_errors=("A", "B"), exclude_errors=("C",)),
    ],
)
def test_policy_round_trip(policy: RetryPolicy) -> None:
    assert convert.retry_policy_from_proto(convert.retry_policy_to_proto(policy)) == policy


# -- submissions -----------------------------------------------------------------------------


def test_create_task_request_defaults() -> None:
    request = convert.submit_request_from_proto(orchestrator_pb2.CreateTaskRequest(
        name="greet", args="[1]", kwargs='{"a": 2}'))
    assert (request.name, request.args, request.kwargs) == ("greet", "[1]", '{"a": 2}')
    assert (request.domain, request.group) == ("default", "default")
    assert request.idempotency_key is None
    assert (request.priority, request.not_before, request.timeout) == (0, None, None)


def test_create_task_request_all_fields() -> None:
    message = orchestrator_pb2.CreateTaskRequest(
        name="n", domain="d", shepherd_group="g", idempotency_key="k", priority=-3,
        not_before_ms=1_700_000_000_500, timeout_ms=2500,
        retry_policy=common_pb2.RetryPolicy(version=1, stop=common_pb2.RetryPolicyStop(
            max_attempts=1)), flow_instance_id="")
    request = convert.submit_request_from_proto(message)
    assert (request.domain, request.group, request.idempotency_key) == ("d", "g", "k")
    assert request.priority == -3
    assert request.not_before == 1_700_000_000.5
    assert request.timeout == 2.5
    assert request.policy is not None
    assert request.policy.max_attempts == 1


@pytest.mark.parametrize("field", ["idempotency_key", "not_before_ms", "timeout_ms"])
def test_a_field_set_to_its_default_value_is_still_present(field: str) -> None:
    message = orchestrator_pb2.CreateTaskRequest(name="n")
    setattr(message, field, type(getattr(message, field))())  # "" or 0, but present
    request = convert.submit_request_from_proto(message)
    values = {"idempotency_key": request.idempotency_key, "not_before_ms": request.not_before,
              "timeout_ms": request.timeout}
    assert values[field] is not None
    assert not values[field]
    assert [value for name, value in values.items() if name != field] == [None, None]


def test_equal_policies_are_parsed_once_and_bad_ones_every_time() -> None:
    policy = common_pb2.RetryPolicy(version=1, stop=common_pb2.RetryPolicyStop(max_attempts=7))
    first = convert.submit_request_from_proto(
        orchestrator_pb2.CreateTaskRequest(name="a", retry_policy=policy))
    second = convert.submit_request_from_proto(
        orchestrator_pb2.CreateTaskRequest(name="b", retry_policy=policy))
    assert first.policy is second.policy
    assert first.policy is not None
    assert first.policy.max_attempts == 7
    bad = common_pb2.RetryPolicy(version=1, stop=common_pb2.RetryPolicyStop(max_attempts=0))
    for _ in range(2):
        with pytest.raises(InvalidRetryPolicy):
            convert.submit_request_from_proto(
                orchestrator_pb2.CreateTaskRequest(name="c", retry_policy=bad))


def test_the_policy_cache_stays_bounded() -> None:
    for attempts in range(1, convert.MAX_CACHED_POLICIES + 10):
        policy = common_pb2.RetryPolicy(
            version=1, stop=common_pb2.RetryPolicyStop(max_attempts=attempts))
        request = convert.submit_request_from_proto(
            orchestrator_pb2.CreateTaskRequest(name="n", retry_policy=policy))
        assert request.policy is not None
        assert request.policy.max_attempts == attempts
    assert len(convert._POLICIES) <= convert.MAX_CACHED_POLICIES


def test_uuid_text_is_the_canonical_spelling() -> None:
    for value in (uuid4(), UUID(int=0), UUID(int=2**128 - 1)):
        assert convert.uuid_text(value) == str(value)


def test_empty_group_means_default() -> None:
    request = convert.submit_request_from_proto(
        orchestrator_pb2.CreateTaskRequest(name="n", shepherd_group=""))
    assert request.group == "default"


def test_flow_instance_is_not_implemented() -> None:
    with pytest.raises(convert.FeatureNotImplemented):
        convert.submit_request_from_proto(
            orchestrator_pb2.CreateTaskRequest(name="n", flow_instance_id="f-1"))


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ('"hi"', "string_value", "hi"),
        ("42", "int_value", 42),
        ("-7", "int_value", -7),
        ("1.5", "double_value", 1.5),
        ("true", "bool_value", True),
        ("false", "bool_value", False),
        ('{"a": [1, 2]}', "json_value", '{"a": [1, 2]}'),
        ("[1, 2]", "json_value", "[1, 2]"),
        ("null", "json_value", "null"),
        (str(2**70), "json_value", str(2**70)),
        (" 3 ", "int_value", 3),
    ],
)
def test_value_json_to_any(text: str, field: str, value: object) -> None:
    any_value = convert.value_json_to_any(text)
    assert any_value.WhichOneof("value") == field
    assert getattr(any_value, field) == value


def test_none_result_is_null() -> None:
    assert convert.value_json_to_any(None).json_value == "null"


@pytest.mark.parametrize(
    ("any_value", "text"),
    [
        (common_pb2.AnyValue(string_value="é\"x"), json.dumps("é\"x", ensure_ascii=False)),
        (common_pb2.AnyValue(int_value=-5), "-5"),
        (common_pb2.AnyValue(uint_value=2**63 + 1), str(2**63 + 1)),
        (common_pb2.AnyValue(double_value=0.25), "0.25"),
        (common_pb2.AnyValue(bool_value=True), "true"),
        (common_pb2.AnyValue(json_value='{"k": null}'), '{"k": null}'),
        (common_pb2.AnyValue(), "null"),
        (common_pb2.AnyValue(json_value=""), "null"),
    ],
)
def test_any_to_value_json(any_value: common_pb2.AnyValue, text: str) -> None:
    assert convert.any_to_value_json(any_value) == text


@pytest.mark.parametrize(
    "any_value",
    [
        common_pb2.AnyValue(double_value=math.nan),
        common_pb2.AnyValue(double_value=math.inf),
        common_pb2.AnyValue(json_value="{not json"),
        common_pb2.AnyValue(json_value="NaN"),
    ],
)
def test_unstorable_values_are_refused(any_value: common_pb2.AnyValue) -> None:
    with pytest.raises(ValueError, match=r"JSON|finite"):
        convert.any_to_value_json(any_value)


@pytest.mark.parametrize("value", ["s", 1, -(2**63), 2**63 - 1, 0.1, True, None, [1, {"a": 2}]])
def test_value_round_trip(value: object) -> None:
    text = json.dumps(value)
    assert json.loads(convert.any_to_value_json(convert.value_json_to_any(text))) == value


def _stdlib_accepts(text: str) -> bool:
    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


def _check_accepts(text: str) -> bool:
    try:
        convert.check_json_text(text)
    except (ValueError, RecursionError):
        return False
    return True


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_JSON_PIECES = st.sampled_from([
    "[", "]", "{", "}", ",", ":", '"', "\\", "\\u", "d800", "dc00", "0", "-", "1e400", "1.",
    ".5", "e", "NaN", "Infinity", "null", "true", "tru", " ", "\t", "\x00", "\x1f", "\ufeff",
    "é", "123456789012345678901234567890", "a",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    _JSON_VALUES.map(json.dumps),
    _JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False, indent=1)),
    st.lists(_JSON_PIECES, max_size=12).map("".join),
    st.text(max_size=20),
))
def test_the_json_check_accepts_exactly_what_the_stdlib_parser_accepts(text: str) -> None:
    assert _check_accepts(text) == _stdlib_accepts(text)


@pytest.mark.parametrize("text", [
    "1e400", "-1E999", "123456789012345678901234567890", '"\\ud800"', '["\\udc00x"]',
    "[" * 600 + "]" * 600, "[" * 1010 + "]" * 1010, "[" * 1100 + "]" * 1100,
    "NaN", "[-Infinity]", "[1,]", "01", "\ufeffnull",
])
def test_the_json_check_agrees_where_orjson_and_the_stdlib_differ(text: str) -> None:
    assert _check_accepts(text) == _stdlib_accepts(text)


# -- errors and results ----------------------------------------------------------------------


def test_error_round_trip() -> None:
    info = ErrorInfo("ValueError", "bad", {"code": 3, "nested": {"x": [1]}}, False)
    message = convert.error_to_proto(info)
    assert json.loads(message.data) == info.data
    assert convert.error_from_proto(message) == info


@pytest.mark.parametrize(
    ("data", "expected"),
    [("", {}), ("{}", {}), ('{"a": 1}', {"a": 1}), ("[1]", {"value": [1]}),
     ("oops", {"raw": "oops"})],
)
def test_error_data_is_always_an_object(data: str, expected: dict[str, object]) -> None:
    info = convert.error_from_proto(common_pb2.ErrorResult(type="E", data=data))
    assert info.data == expected


def test_error_without_type() -> None:
    assert convert.error_from_proto(common_pb2.ErrorResult()).type == "UnknownError"


def test_reported_success() -> None:
    outcome = convert.reported_outcome_from_proto(common_pb2.TaskResult(
        task_id="t", attempt_number=3,
        success=common_pb2.SuccessResult(result=common_pb2.AnyValue(int_value=7))))
    assert (outcome.task_id, outcome.attempt, outcome.ok, outcome.value_json) == ("t", 3, True,
                                                                                 "7")


def test_reported_error_from_old_shepherd_has_attempt_zero() -> None:
    outcome = convert.reported_outcome_from_proto(common_pb2.TaskResult(
        task_id="t", error=common_pb2.ErrorResult(type="KeyError", message="k",
                                                  retriable=True)))
    assert outcome.attempt == 0
    assert not outcome.ok
    assert outcome.error == ErrorInfo("KeyError", "k", {}, True)


@pytest.mark.parametrize(
    "result",
    [
        common_pb2.TaskResult(task_id="t", attempt_number=1),
        common_pb2.TaskResult(task_id="t", attempt_number=1, success=common_pb2.SuccessResult(
            result=common_pb2.AnyValue(double_value=math.nan))),
    ],
)
def test_unusable_results_become_non_retriable_failures(result: common_pb2.TaskResult) -> None:
    outcome = convert.reported_outcome_from_proto(result)
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.type == convert.INVALID_RESULT
    assert outcome.error.retriable is False


def test_execution_request_to_task() -> None:
    task = convert.execution_request_to_proto(ExecutionRequest(
        task_id="id", attempt=2, name="n", args="[]", kwargs="{}", timeout=1.5,
        memory_limit=1024, domain="d"))
    assert (task.task_id, task.attempt_number, task.name, task.domain) == ("id", 2, "n", "d")
    assert task.timeout_ms == 1500
    assert task.memory_limit == 1024
    bare = convert.execution_request_to_proto(ExecutionRequest("id", 1, "n", "[]", "{}"))
    assert not bare.HasField("timeout_ms")
    assert not bare.HasField("memory_limit")


def test_hello() -> None:
    hello = convert.hello_from_proto(orchestrator_pb2.Hello(
        shepherd_uuid="s", max_concurrency=4, accepts_batches=True,
        running=[orchestrator_pb2.RunningAttempt(task_id="t", attempt_number=2)]))
    assert (hello.shepherd_uuid, hello.domain, hello.group, hello.capacity) == (
        "s", "default", "default", 4)
    assert hello.accepts_batches
    assert hello.running == (("t", 2),)


@pytest.mark.parametrize(
    "hello",
    [orchestrator_pb2.Hello(max_concurrency=1),
     orchestrator_pb2.Hello(shepherd_uuid="s", max_concurrency=0)],
)
def test_bad_hello(hello: orchestrator_pb2.Hello) -> None:
    with pytest.raises(InvalidTaskSpec):
        convert.hello_from_proto(hello)


def test_parse_task_id() -> None:
    task_id = uuid4()
    assert convert.parse_task_id(str(task_id)) == task_id
    assert convert.parse_task_id("nope") is None
    assert convert.parse_task_id("") is None


# -- answers ---------------------------------------------------------------------------------


def _view(state: TaskState, **kw: object) -> TaskView:
    fields: dict[str, object] = {
        "task_id": UUID(int=1), "name": "n", "domain": "d", "group": "g", "state": state,
        "args": "[]", "kwargs": "{}", "submitted_at": 100.0, "ready_at": 100.0,
        "attempts": (), "result": None, "error": None}
    fields.update(kw)
    return TaskView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "code"),
    [(TaskState.QUEUED, 0), (TaskState.RUNNING, 1), (TaskState.SUCCEEDED, 3),
     (TaskState.RETRY_WAIT, 4), (TaskState.FAILED, 6), (TaskState.CANCELLED, 6)],
)
def test_status_codes_follow_upstream(state: TaskState, code: int) -> None:
    response = convert.view_to_status_response(_view(state))
    assert response.status_code == code
    assert response.state == state.value


def test_status_response_with_history() -> None:
    error = ErrorInfo("ValueError", "boom", {}, True)
    view = _view(TaskState.SUCCEEDED, result='{"x": 1}', attempts=(
        AttemptView(1, "failed", "s1", 101.0, 102.0, error),
        AttemptView(2, "succeeded", "s1", 103.0, 104.0, None)))
    response = convert.view_to_status_response(view)
    assert [a.number for a in response.attempts] == [1, 2]
    assert response.attempts[0].error.type == "ValueError"
    assert not response.attempts[1].HasField("error")
    assert response.attempts[1].ended_at_ms == 104_000
    assert response.success.result.json_value == '{"x": 1}'
    assert response.created_at_ms == 100_000
    assert response.next_attempt_at_ms == 0


def test_retry_wait_has_next_attempt_time() -> None:
    response = convert.view_to_status_response(_view(TaskState.RETRY_WAIT, ready_at=160.5))
    assert response.next_attempt_at_ms == 160_500


def test_cancelled_outcome_carries_an_error() -> None:
    outcome = TaskOutcome(UUID(int=2), "d", "n", TaskState.CANCELLED)
    response = convert.outcome_to_wait_response(outcome)
    assert response.status_code == orchestrator_pb2.WAIT_FOR_TASK_STATUS_COMPLETED
    assert response.state == "cancelled"
    assert response.error.type == "Cancelled"
    assert not response.error.retriable


@pytest.mark.parametrize("result", [None, "", "null", "0", "false", '"s"', "[1]"])
def test_succeeded_outcome_always_carries_a_success(result: str | None) -> None:
    outcome = TaskOutcome(UUID(int=3), "d", "n", TaskState.SUCCEEDED, result=result)
    message = convert.outcome_to_task_outcome(outcome)
    assert message.WhichOneof("result_type") == "success"
    assert message.success.result == convert.value_json_to_any(result)
    assert message.success.result.WhichOneof("value") is not None
    assert (message.task_id, message.state) == (str(UUID(int=3)), "succeeded")


def test_failed_outcome() -> None:
    outcome = TaskOutcome(UUID(int=2), "d", "n", TaskState.FAILED,
                          error=ErrorInfo("KeyError", "k", {"a": 1}, False))
    message = convert.outcome_to_task_outcome(outcome)
    assert message.task_id == str(UUID(int=2))
    assert message.error.type == "KeyError"
    assert json.loads(message.error.data) == {"a": 1}


def test_update_of_a_running_task_has_no_result() -> None:
    view = _view(TaskState.RUNNING, attempts=(AttemptView(1, "running", "s", 1.0, None, None),))
    update = convert.view_to_update(view)
    assert (update.state, update.attempt_number, update.terminal) == ("running", 1, False)
    assert update.WhichOneof("result_type") is None
