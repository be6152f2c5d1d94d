"""Validators and value types of :mod:`azolla.domain.values`."""

from __future__ import annotations

import json
import pickle
from uuid import UUID, uuid5

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azolla.domain.errors import InvalidTaskSpec
from azolla.domain.values import (
    DEFAULT_DOMAIN,
    DEFAULT_GROUP,
    LIVE_ATTEMPT_STATES,
    TERMINAL_TASK_STATES,
    AttemptState,
    ErrorInfo,
    SpecLimits,
    TaskState,
    attempt_stream_id,
    check_finite,
    check_json_array,
    check_json_object,
    check_name,
    parse_uuid,
    partition_day,
    shepherd_stream_id,
    uuid_from_int,
    uuid_text,
)

LIMITS = SpecLimits()
SMALL = SpecLimits(max_name_length=5, max_payload_bytes=20, max_nesting=3)


def test_defaults_are_default() -> None:
    assert DEFAULT_DOMAIN == "default"
    assert DEFAULT_GROUP == "default"
    assert SpecLimits() == SpecLimits(
        max_name_length=256, max_payload_bytes=1 << 20, max_nesting=64,
        max_idempotency_key_length=512,
    )


def test_state_sets() -> None:
    assert {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED} == TERMINAL_TASK_STATES
    assert {AttemptState.ASSIGNED, AttemptState.RUNNING} == LIVE_ATTEMPT_STATES


# -- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "send_email", "ünïcode-名前", "a b", "x" * 5])
def test_check_name_accepts(name: str) -> None:
    limits = SpecLimits(max_name_length=max(5, len(name)))
    assert check_name(name, "task name", limits) == name


def test_check_name_length_limit_is_inclusive() -> None:
    assert check_name("abcde", "name", SMALL) == "abcde"
    with pytest.raises(InvalidTaskSpec, match=r"name is 6 characters long; the limit is 5"):
        check_name("abcdef", "name", SMALL)


def test_check_name_refuses_empty() -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^domain must not be empty$"):
        check_name("", "domain", LIMITS)


@pytest.mark.parametrize("name", [" a", "a ", "\ta", "a\n", "a\x00b", "a\u200bb", "\ud800"])
def test_check_name_refuses_whitespace_and_unprintables(name: str) -> None:
    with pytest.raises(
        InvalidTaskSpec, match=r"^group must be printable text without surrounding whitespace$"
    ):
        check_name(name, "group", LIMITS)


def test_invalid_task_spec_carries_message_and_code() -> None:
    with pytest.raises(InvalidTaskSpec) as info:
        check_name("", "task name", LIMITS)
    assert info.value.message == "task name must not be empty"
    assert info.value.code == "invalid_task_spec"


# -- JSON args / kwargs ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[]", "[1, 2.5, \"x\", null, true, {\"a\": [1]}]", " [ ] "])
def test_check_json_array_accepts_and_returns_text_unchanged(text: str) -> None:
    assert check_json_array(text, "args", LIMITS) == text


def test_empty_args_and_kwargs_default() -> None:
    assert check_json_array("", "args", LIMITS) == "[]"
    assert check_json_object("", "kwargs", LIMITS) == "{}"


@pytest.mark.parametrize("text", ["{}", "{\"a\": 1}", "1", "\"[]\"", "null"])
def test_check_json_array_refuses_non_arrays(text: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^args must be a JSON array$"):
        check_json_array(text, "args", LIMITS)


@pytest.mark.parametrize("text", ["{}", "{\"a\": {\"b\": [1]}}"])
def test_check_json_object_accepts(text: str) -> None:
    assert check_json_object(text, "kwargs", LIMITS) == text


@pytest.mark.parametrize("text", ["[]", "1", "\"{}\"", "null", "true"])
def test_check_json_object_refuses_non_objects(text: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^kwargs must be a JSON object$"):
        check_json_object(text, "kwargs", LIMITS)


@pytest.mark.parametrize("text", ["[", "[1,]", "{'a': 1}", "[1] x", "  ", "[undefined]"])
def test_invalid_json_is_refused_readably(text: str) -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^args is not valid JSON: "):
        check_json_array(text, "args", LIMITS)


@pytest.mark.parametrize(
    "text", ["[NaN]", "[Infinity]", "[-Infinity]", "{\"a\": NaN}", "[1e400]", "[-1e400]"]
)
def test_non_finite_numbers_are_refused(text: str) -> None:
    check = check_json_object if text.startswith("{") else check_json_array
    with pytest.raises(InvalidTaskSpec, match=r"is not valid JSON: .* not allowed"):
        check(text, "payload", LIMITS)


def test_large_finite_numbers_are_kept() -> None:
    assert check_json_array("[1e300, -1e300, 123456789012345678901234567890]", "a", LIMITS)


def test_size_limit_counts_utf8_bytes_and_is_inclusive() -> None:
    exactly = "[" + '"' + "x" * 16 + '"' + "]"  # 20 bytes
    assert len(exactly.encode()) == 20
    assert check_json_array(exactly, "args", SMALL) == exactly
    with pytest.raises(InvalidTaskSpec, match=r"^args is larger than 20 bytes$"):
        check_json_array("[" + '"' + "x" * 17 + '"' + "]", "args", SMALL)
    # 12 characters but 22 bytes in UTF-8
    multibyte = '["' + "é" * 9 + '"]'
    assert len(multibyte) <= 20 < len(multibyte.encode())
    with pytest.raises(InvalidTaskSpec, match=r"^args is larger than 20 bytes$"):
        check_json_array(multibyte, "args", SMALL)


def test_size_limit_on_kwargs() -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^kwargs is larger than 20 bytes$"):
        check_json_object('{"k": "' + "x" * 20 + '"}', "kwargs", SMALL)


def test_text_that_is_not_utf8_encodable_is_refused() -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^args is not valid UTF-8"):
        check_json_array('["\ud800"]', "args", LIMITS)


def test_nesting_limit_is_inclusive() -> None:
    assert check_json_array("[[[1]]]", "args", SMALL) == "[[[1]]]"
    assert check_json_object('{"a":{"b":[1]}}', "kwargs", SMALL)
    with pytest.raises(InvalidTaskSpec, match=r"^args nests deeper than 3 levels$"):
        check_json_array("[[[[1]]]]", "args", SMALL)
    with pytest.raises(InvalidTaskSpec, match=r"^kwargs nests deeper than 3 levels$"):
        check_json_object('{"a":{"b":[{}]}}', "kwargs", SMALL)


def test_nesting_counts_the_deepest_branch_not_the_total() -> None:
    limits = SpecLimits(max_nesting=2)
    text = "[[1],[2],[3],[4],[5]]"
    assert check_json_array(text, "args", limits) == text


def test_nesting_keeps_counting_after_a_branch_closes() -> None:
    text = "[[[1],[[2]]]]"  # depths 1 2 3 2 3 4: the deepest branch comes second
    assert check_json_array(text, "args", SpecLimits(max_nesting=4)) == text
    with pytest.raises(InvalidTaskSpec, match=r"^args nests deeper than 3 levels$"):
        check_json_array(text, "args", SpecLimits(max_nesting=3))


def test_objects_alone_are_depth_checked() -> None:
    text = '{"a":{"b":{"c":{}}}}'
    assert check_json_object(text, "kwargs", SpecLimits(max_nesting=4)) == text
    with pytest.raises(InvalidTaskSpec, match=r"^kwargs nests deeper than 3 levels$"):
        check_json_object(text, "kwargs", SpecLimits(max_nesting=3))


def test_garbage_is_reported_as_invalid_json_not_as_nesting() -> None:
    with pytest.raises(InvalidTaskSpec, match=r"^args is not valid JSON"):
        check_json_array("[XXXXXX]", "args", SpecLimits(max_nesting=2))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '["[[[[", "{{{{", "\\"[[[[", "\\\\", "]]]]"]'
    assert json.loads(text)  # sanity: valid JSON
    assert check_json_array(text, "args", SpecLimits(max_nesting=1)) == text
    # an escaped backslash closes nothing: the quote after it ends the string
    text = '["\\\\", [[1]]]'
    with pytest.raises(InvalidTaskSpec, match=r"nests deeper than 2"):
        check_json_array(text, "args", SpecLimits(max_nesting=2))


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InvalidTaskSpec, match=r"nests deeper than 64 levels"):
        check_json_array(deep, "args", SpecLimits(max_payload_bytes=1 << 20))
    # even with a generous nesting limit the parser's recursion is reported, not raised
    with pytest.raises(InvalidTaskSpec, match=r"^args is not valid JSON"):
        check_json_array(deep, "args", SpecLimits(max_nesting=10**6))


# -- numbers ------------------------------------------------------------------------------------


def test_check_finite() -> None:
    assert check_finite(None, "priority", 0, 10) is None
    assert check_finite(0.0, "timeout", 0, 10) == 0.0
    assert check_finite(10.0, "timeout", 0, 10) == 10.0
    assert check_finite(5.5, "timeout", 0, 10) == 5.5
    for bad in (float("nan"), float("inf"), float("-inf"), -0.001, 10.001):
        with pytest.raises(InvalidTaskSpec, match=r"^timeout must be between 0 and 10, got"):
            check_finite(bad, "timeout", 0, 10)


# -- errors, ids, days --------------------------------------------------------------------------


def test_error_info_round_trip_and_defaults() -> None:
    info = ErrorInfo("ValueError", "bad", {"exit_code": 3}, retriable=False)
    assert info.to_dict() == {
        "type": "ValueError", "message": "bad", "data": {"exit_code": 3}, "retriable": False,
    }
    assert ErrorInfo.from_dict(info.to_dict()) == info
    assert ErrorInfo("X") == ErrorInfo("X", "", {}, True)
    assert ErrorInfo.from_dict({}) == ErrorInfo("", "", {}, True)
    assert ErrorInfo.from_dict({"type": "T", "data": None, "retriable": 0}) == ErrorInfo(
        "T", "", {}, False
    )


def test_partition_day() -> None:
    assert partition_day(0.0) == 0
    assert partition_day(86_399.999) == 0
    assert partition_day(86_400.0) == 1
    assert partition_day(1_700_000_000.25) == 19675
    assert partition_day(-1.0) == -1


def test_attempt_stream_ids_are_deterministic_and_distinct() -> None:
    task = UUID("00000000-0000-4000-8000-000000000001")
    ns = UUID("6f1f0e2a-5d0b-4c1e-9a53-1b7b7d9e4a01")
    assert attempt_stream_id(task, 1) == uuid5(ns, f"{task}/1")
    assert attempt_stream_id(task, 1) != attempt_stream_id(task, 2)
    assert attempt_stream_id(task, 1) != task


_ATTEMPT_NS = UUID("6f1f0e2a-5d0b-4c1e-9a53-1b7b7d9e4a01")
uuids = st.integers(min_value=0, max_value=(1 << 128) - 1).map(lambda i: UUID(int=i))


@given(uuids, st.integers(min_value=1, max_value=10**9))
def test_fast_attempt_stream_id_equals_uuid5(task: UUID, number: int) -> None:
    # The fast path must keep naming the streams already in the log.
    made = attempt_stream_id.__wrapped__(task, number)
    expected = uuid5(_ATTEMPT_NS, f"{task}/{number}")
    assert made == expected
    assert (made.version, made.variant, str(made), hash(made)) == (
        5, expected.variant, str(expected), hash(expected))


@given(uuids)
def test_uuid_helpers_agree_with_the_uuid_module(value: UUID) -> None:
    made = uuid_from_int(value.int)
    assert made == value
    assert hash(made) == hash(value)
    assert str(made) == str(value)
    assert pickle.loads(pickle.dumps(made)) == value
    assert uuid_text(value) == str(value)
    for text in (str(value), str(value).upper(), value.hex, "{" + str(value) + "}"):
        assert parse_uuid(text) == value


@pytest.mark.parametrize("text", ["", "not-a-uuid", "0" * 36, "g" + "0" * 7 + "-0000-0000-0000-"
                                  + "0" * 12, "0" * 8 + "-0000-0000-0000-" + "0" * 13])
def test_parse_uuid_rejects_what_uuid_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"hexadecimal UUID string|invalid literal"):
        UUID(text)
    with pytest.raises(ValueError, match=r"hexadecimal UUID string|invalid literal"):
        parse_uuid(text)


def test_shepherd_stream_id() -> None:
    given = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
    ns = UUID("0b8f5c1e-2f3a-4d7b-8e6c-9a4d2c1b3e02")
    assert shepherd_stream_id(given) == uuid5(ns, given) != UUID(given)
    assert shepherd_stream_id("shepherd-a") == uuid5(ns, "shepherd-a")
    assert shepherd_stream_id("shepherd-a") != shepherd_stream_id("shepherd-b")
