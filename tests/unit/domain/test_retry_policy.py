"""RetryPolicy and the retry decisions, rule by rule as the module docstring states them."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azolla.domain.errors import InvalidRetryPolicy
from azolla.domain.retry import (
    DEFAULT_POLICY,
    MAX_ATTEMPTS_LIMIT,
    MAX_DELAY_SECONDS,
    RetryDecision,
    RetryPolicy,
    WaitKind,
    decide_lost_retry,
    decide_retry,
    error_type_retries,
    has_attempts_left,
    retry_delay,
)

SUBMITTED = 1_000.0


def decide(policy: RetryPolicy, **overrides: Any) -> RetryDecision:
    """decide_retry with harmless defaults: attempt 1 failed with a retriable ValueError."""
    args: dict[str, Any] = {
        "attempts_started": 1,
        "error_type": "ValueError",
        "retriable": True,
        "submitted_at": SUBMITTED,
        "now": SUBMITTED + 1,
        "jitter": 0.5,
    }
    args.update(overrides)
    return decide_retry(policy, **args)


# -- defaults and validation ---------------------------------------------------------------------


def test_defaults_match_the_wire_semantics() -> None:
    policy = RetryPolicy()
    assert policy == DEFAULT_POLICY
    assert policy.max_attempts == 5
    assert policy.wait is WaitKind.EXPONENTIAL_JITTER
    assert policy.initial_delay == 1.0
    assert policy.multiplier == 2.0
    assert policy.max_delay == 300.0
    assert policy.max_total_delay is None
    assert policy.include_errors == ()
    assert policy.exclude_errors == ()


def test_to_dict_is_the_json_form_and_parses_back() -> None:
    policy = RetryPolicy(
        max_attempts=None, max_total_delay=60, wait=WaitKind.FIXED, initial_delay=2,
        include_errors=("A", "B"), exclude_errors=("C",),
    )
    assert policy.to_dict() == {
        "max_attempts": None, "max_total_delay": 60.0, "wait": "fixed", "initial_delay": 2.0,
        "multiplier": 2.0, "max_delay": 300.0, "include_errors": ["A", "B"],
        "exclude_errors": ["C"],
    }
    assert RetryPolicy.parse(policy.to_dict()) == policy
    assert RetryPolicy.parse({}) == RetryPolicy()


def test_policy_is_frozen() -> None:
    with pytest.raises(ValueError, match=r"frozen"):
        RetryPolicy().max_attempts = 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_attempts": 0}, "max_attempts: Input should be greater than or equal to 1"),
        ({"max_attempts": MAX_ATTEMPTS_LIMIT + 1}, "max_attempts: Input should be less than"),
        ({"max_total_delay": -1}, "max_total_delay: Input should be greater than or equal to 0"),
        ({"initial_delay": -0.5}, "initial_delay: Input should be greater than or equal to 0"),
        ({"initial_delay": MAX_DELAY_SECONDS + 1}, "initial_delay: Input should be less than"),
        ({"multiplier": 0.5}, "multiplier: Input should be greater than or equal to 1"),
        ({"multiplier": 1001}, "multiplier: Input should be less than or equal to 1000"),
        ({"max_delay": -1}, "max_delay: Input should be greater than or equal to 0"),
        ({"initial_delay": float("nan")}, "initial_delay: "),
        ({"max_delay": float("inf")}, "max_delay: "),
        ({"wait": "linear"}, "wait: Input should be 'fixed', 'exponential' or"),
        ({"max_tries": 3}, "max_tries: Extra inputs are not permitted"),
        ({"include_errors": "ValueError"}, "include_errors: Input should be a valid tuple"),
        ({"exclude_errors": ["A", 3]}, "exclude_errors.1: Input should be a valid string"),
        ({"max_attempts": None}, "policy: Value error, a policy without max_attempts needs"),
    ],
)
def test_invalid_policies_are_refused_readably(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        RetryPolicy.parse(raw)
    assert info.value.message.startswith("invalid retry policy: ")
    assert message in info.value.message
    assert info.value.code == "invalid_retry_policy"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        RetryPolicy.parse({"max_attempts": 0, "multiplier": 0})
    assert info.value.message == (
        "invalid retry policy: max_attempts: Input should be greater than or equal to 1; "
        "multiplier: Input should be greater than or equal to 1"
    )


def test_bounds_are_inclusive() -> None:
    RetryPolicy.parse({"max_attempts": 1, "multiplier": 1, "initial_delay": 0, "max_delay": 0,
                       "max_total_delay": 0})
    RetryPolicy.parse({"max_attempts": MAX_ATTEMPTS_LIMIT, "multiplier": 1000,
                       "initial_delay": MAX_DELAY_SECONDS, "max_delay": MAX_DELAY_SECONDS,
                       "max_total_delay": MAX_DELAY_SECONDS})
    assert RetryPolicy.parse({"max_attempts": None, "max_total_delay": 5}).max_attempts is None


# -- which errors retry --------------------------------------------------------------------------


def test_retriable_false_stops_retries_whatever_the_policy() -> None:
    policy = RetryPolicy(max_attempts=100, include_errors=("ValueError",))
    decision = decide(policy, retriable=False)
    assert decision == RetryDecision(False, 0.0, "the error is not retriable")
    assert not error_type_retries(policy, "ValueError", retriable=False)


def test_empty_include_list_means_every_type() -> None:
    policy = RetryPolicy()
    for error_type in ("ValueError", "KeyError", "WorkerCrashed", ""):
        assert decide(policy, error_type=error_type).retry
        assert error_type_retries(policy, error_type, retriable=True)


def test_include_list_limits_the_types() -> None:
    policy = RetryPolicy(include_errors=("IOError", "TimeoutError"))
    assert decide(policy, error_type="IOError").retry
    assert decide(policy, error_type="TimeoutError").retry
    decision = decide(policy, error_type="ValueError")
    assert decision == RetryDecision(False, 0.0, "the policy does not retry ValueError")


def test_exclude_list_stops_those_types_only() -> None:
    policy = RetryPolicy(exclude_errors=("ValueError",))
    assert decide(policy, error_type="ValueError") == RetryDecision(
        False, 0.0, "the policy does not retry ValueError"
    )
    assert decide(policy, error_type="KeyError").retry


def test_exclude_beats_include() -> None:
    policy = RetryPolicy(include_errors=("ValueError",), exclude_errors=("ValueError",))
    assert not decide(policy, error_type="ValueError").retry
    assert not error_type_retries(policy, "ValueError", retriable=True)


def test_type_names_match_exactly() -> None:
    policy = RetryPolicy(include_errors=("ValueError",))
    assert not decide(policy, error_type="valueerror").retry
    assert not decide(policy, error_type="ValueErrorX").retry


# -- how many and how long ------------------------------------------------------------------------


def test_max_attempts_counts_the_first_run() -> None:
    policy = RetryPolicy(max_attempts=3, wait=WaitKind.FIXED, initial_delay=1)
    assert decide(policy, attempts_started=1).retry
    assert decide(policy, attempts_started=2).retry
    assert decide(policy, attempts_started=3) == RetryDecision(False, 0.0, "all 3 attempts used")
    assert has_attempts_left(policy, 2)
    assert not has_attempts_left(policy, 3)
    assert not has_attempts_left(policy, 4)


def test_single_attempt_never_retries() -> None:
    assert not decide(RetryPolicy(max_attempts=1), attempts_started=1).retry


def test_no_attempt_limit() -> None:
    policy = RetryPolicy(max_attempts=None, max_total_delay=MAX_DELAY_SECONDS)
    assert has_attempts_left(policy, 10**9)
    assert decide(policy, attempts_started=10**6).retry


def test_max_total_delay_bounds_the_start_of_the_retry() -> None:
    policy = RetryPolicy(max_total_delay=10, wait=WaitKind.FIXED, initial_delay=4)
    # now - submitted = 6, + 4 s wait = 10: exactly at the limit is allowed
    assert decide(policy, now=SUBMITTED + 6) == RetryDecision(True, 4.0, "retry 2 in 4.000 s")
    late = decide(policy, now=SUBMITTED + 6.001)
    assert late == RetryDecision(False, 0.0, "retrying would pass max_total_delay (10.0 s)")


def test_max_total_delay_zero_allows_only_immediate_retries_at_submission() -> None:
    policy = RetryPolicy(max_total_delay=0, wait=WaitKind.FIXED, initial_delay=0)
    assert decide(policy, now=SUBMITTED).retry
    assert not decide(policy, now=SUBMITTED + 0.001).retry


def test_retry_reason_names_the_next_attempt_and_wait() -> None:
    policy = RetryPolicy(wait=WaitKind.EXPONENTIAL, initial_delay=1.5)
    assert decide(policy, attempts_started=2).reason == "retry 3 in 3.000 s"


def test_decision_checks_filters_before_attempts() -> None:
    policy = RetryPolicy(max_attempts=1, exclude_errors=("E",))
    assert decide(policy, error_type="E", attempts_started=1).reason == (
        "the policy does not retry E"
    )


# -- wait strategies ------------------------------------------------------------------------------


def test_fixed_waits_the_same_every_time() -> None:
    policy = RetryPolicy(wait=WaitKind.FIXED, initial_delay=7, multiplier=3)
    assert [retry_delay(policy, n, 0.9) for n in (1, 2, 3, 10)] == [7.0, 7.0, 7.0, 7.0]


def test_fixed_wait_is_not_capped() -> None:
    policy = RetryPolicy(wait=WaitKind.FIXED, initial_delay=600, max_delay=300)
    assert retry_delay(policy, 1, 0.0) == 600.0
    assert retry_delay(policy, 5, 0.0) == 600.0


def test_exponential_first_retry_waits_initial_delay() -> None:
    policy = RetryPolicy(wait=WaitKind.EXPONENTIAL, initial_delay=1.5, multiplier=3)
    assert retry_delay(policy, 1, 0.0) == 1.5
    assert [retry_delay(policy, n, 0.0) for n in (1, 2, 3, 4)] == [1.5, 4.5, 13.5, 40.5]
    assert decide(policy, attempts_started=1).delay == 1.5


def test_exponential_is_capped_by_max_delay() -> None:
    policy = RetryPolicy(wait=WaitKind.EXPONENTIAL, initial_delay=1, multiplier=2, max_delay=10)
    assert [retry_delay(policy, n, 0.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_exponential_cap_survives_float_overflow() -> None:
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS_LIMIT, wait=WaitKind.EXPONENTIAL,
                         multiplier=1000, max_delay=300)
    assert retry_delay(policy, MAX_ATTEMPTS_LIMIT, 0.0) == 300.0
    jitter = policy.model_copy(update={"wait": WaitKind.EXPONENTIAL_JITTER})
    assert retry_delay(jitter, MAX_ATTEMPTS_LIMIT, 0.5) == 150.0


def test_zero_initial_delay_stays_zero_even_past_float_overflow() -> None:
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS_LIMIT, wait=WaitKind.EXPONENTIAL,
                         initial_delay=0, multiplier=1000)
    assert retry_delay(policy, 2, 0.0) == 0.0
    assert retry_delay(policy, MAX_ATTEMPTS_LIMIT, 0.0) == 0.0


def test_attempt_numbers_below_one_wait_the_initial_delay() -> None:
    policy = RetryPolicy(wait=WaitKind.EXPONENTIAL, initial_delay=2, multiplier=3)
    assert retry_delay(policy, 0, 0.0) == 2.0


def test_full_jitter_scales_the_exponential_bound() -> None:
    policy = RetryPolicy(initial_delay=2, multiplier=3, max_delay=100)
    assert policy.wait is WaitKind.EXPONENTIAL_JITTER
    assert retry_delay(policy, 1, 0.0) == 0.0
    assert retry_delay(policy, 1, 0.5) == 1.0
    assert retry_delay(policy, 2, 0.5) == 3.0
    assert retry_delay(policy, 1, 0.999) == pytest.approx(1.998)
    assert retry_delay(policy, 10, 0.25) == 25.0  # capped bound 100 * 0.25


def test_jitter_outside_unit_interval_is_clamped() -> None:
    policy = RetryPolicy(initial_delay=2)
    assert retry_delay(policy, 1, -3.0) == 0.0
    assert retry_delay(policy, 1, 1.0) == 2.0
    assert retry_delay(policy, 1, 7.0) == 2.0


@settings(deadline=None)  # pure arithmetic: a slow example is the machine, not the code
@given(
    wait=st.sampled_from(list(WaitKind)),
    initial=st.floats(0, 1000),
    multiplier=st.floats(1, 1000),
    cap=st.floats(0, 1000),
    attempt=st.integers(1, MAX_ATTEMPTS_LIMIT),
    jitter=st.floats(0, 1, exclude_max=True),
)
def test_delay_stays_inside_the_policy_bounds(
    wait: WaitKind, initial: float, multiplier: float, cap: float, attempt: int, jitter: float
) -> None:
    policy = RetryPolicy(wait=wait, initial_delay=initial, multiplier=multiplier, max_delay=cap)
    delay = retry_delay(policy, attempt, jitter)
    if wait is WaitKind.FIXED:
        assert delay == initial
        return
    if initial == 0:
        bound = 0.0
    else:  # initial * multiplier ** (attempt - 1), computed in log space so it cannot overflow
        log_exponential = math.log(initial) + (attempt - 1) * math.log(multiplier)
        bound = cap if log_exponential > 700 else min(cap, math.exp(log_exponential))
    assert 0.0 <= delay <= bound * (1 + 1e-9)
    if wait is WaitKind.EXPONENTIAL:
        assert delay == pytest.approx(bound, rel=1e-9)
    else:
        assert delay == pytest.approx(bound * jitter, rel=1e-9, abs=1e-12)
    if attempt == 1:
        assert delay <= min(initial, cap)


@settings(deadline=None)  # pure arithmetic: a slow example is the machine, not the code
@given(
    attempts=st.integers(1, 20),
    max_attempts=st.integers(1, 20),
    retriable=st.booleans(),
    error_type=st.sampled_from(["A", "B", "C"]),
    include=st.lists(st.sampled_from(["A", "B", "C"]), max_size=3, unique=True),
    exclude=st.lists(st.sampled_from(["A", "B", "C"]), max_size=3, unique=True),
)
def test_decision_is_the_conjunction_of_the_rules(
    attempts: int, max_attempts: int, retriable: bool, error_type: str,
    include: list[str], exclude: list[str],
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, include_errors=tuple(include),
                         exclude_errors=tuple(exclude))
    decision = decide(policy, attempts_started=attempts, retriable=retriable,
                      error_type=error_type)
    expected = (
        retriable
        and error_type not in exclude
        and (not include or error_type in include)
        and attempts < max_attempts
    )
    assert decision.retry is expected
    if not decision.retry:
        assert decision.delay == 0.0


# -- infrastructure failures ----------------------------------------------------------------------


def test_lost_attempts_retry_at_once_whatever_the_filters() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=50, include_errors=("Other",),
                         exclude_errors=("InfrastructureError",))
    decision = decide_lost_retry(policy, attempts_started=2, submitted_at=SUBMITTED,
                                 now=SUBMITTED + 100)
    assert decision == RetryDecision(True, 0.0, "retry 3 at once (infrastructure failure)")


def test_lost_attempts_respect_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    decision = decide_lost_retry(policy, attempts_started=3, submitted_at=SUBMITTED,
                                 now=SUBMITTED)
    assert decision == RetryDecision(False, 0.0, "all 3 attempts used")


def test_lost_attempts_respect_max_total_delay_inclusively() -> None:
    policy = RetryPolicy(max_attempts=None, max_total_delay=30)
    at_limit = decide_lost_retry(policy, attempts_started=1000, submitted_at=SUBMITTED,
                                 now=SUBMITTED + 30)
    assert at_limit.retry
    past = decide_lost_retry(policy, attempts_started=1000, submitted_at=SUBMITTED,
                             now=SUBMITTED + 30.001)
    assert past == RetryDecision(False, 0.0, "retrying would pass max_total_delay (30.0 s)")
