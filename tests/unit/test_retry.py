"""Unit tests of the client's retry policies (azolla.retry) and their wire form."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azolla.adapters.grpc.pb import common_pb2
from azolla.errors import ValidationError
from azolla.retry import (
    DEFAULT_RETRY_POLICY,
    ExponentialBackoff,
    FixedBackoff,
    LinearBackoff,
    RetryPolicy,
)

pytestmark = pytest.mark.timeout(30)


def wire_delay(wait: common_pb2.RetryPolicyWait, retry: int) -> float:
    """The (upper-bound) delay the orchestrator computes from a wire wait, per WIRE.md."""
    kind = wait.WhichOneof("kind")
    if kind == "fixed":
        return wait.fixed.delay
    w = wait.exponential if kind == "exponential" else wait.exponential_jitter
    return min(w.max_delay, w.initial_delay * w.multiplier ** (retry - 1))


def test_brief_example_converts_to_wire_version_1() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=ExponentialBackoff(initial=1.0))
    wire = policy.to_proto()
    assert wire.version == 1
    assert wire.stop.max_attempts == 3
    assert not wire.stop.HasField("max_delay")
    assert wire.wait.WhichOneof("kind") == "exponential_jitter"
    jitter = wire.wait.exponential_jitter
    assert (jitter.initial_delay, jitter.multiplier, jitter.max_delay) == (1.0, 2.0, 300.0)
    assert list(wire.retry.include_errors) == []
    assert list(wire.retry.exclude_errors) == []


def test_default_policy_equals_the_servers_default() -> None:
    # WIRE.md: 5 attempts, exponential full jitter, initial 1 s, multiplier 2, cap 300 s.
    assert RetryPolicy() == DEFAULT_RETRY_POLICY
    assert DEFAULT_RETRY_POLICY.max_attempts == 5
    assert DEFAULT_RETRY_POLICY.backoff == ExponentialBackoff(1.0, 2.0, 300.0, jitter=True)
    assert DEFAULT_RETRY_POLICY.max_total_delay is None
    assert DEFAULT_RETRY_POLICY.include_errors == ()


def test_exponential_without_jitter_uses_the_plain_exponential_kind() -> None:
    wire = RetryPolicy(backoff=ExponentialBackoff(0.5, 3.0, 10.0, jitter=False)).to_proto()
    assert wire.wait.WhichOneof("kind") == "exponential"
    assert wire.wait.exponential.initial_delay == 0.5
    assert wire.wait.exponential.multiplier == 3.0
    assert wire.wait.exponential.max_delay == 10.0


def test_fixed_backoff() -> None:
    policy = RetryPolicy(max_attempts=4, backoff=FixedBackoff(delay=2.5))
    wire = policy.to_proto()
    assert wire.wait.WhichOneof("kind") == "fixed"
    assert wire.wait.fixed.delay == 2.5
    assert [policy.delay_for(n) for n in (1, 2, 3)] == [2.5, 2.5, 2.5]


def test_first_retry_waits_the_initial_delay() -> None:
    backoff = ExponentialBackoff(initial=3.0, multiplier=2.0, max_delay=20.0)
    assert [backoff.delay_for(n) for n in (1, 2, 3, 4)] == [3.0, 6.0, 12.0, 20.0]
    assert backoff.delay_for(10_000) == 20.0  # no overflow


def test_error_filters_accept_classes_and_names() -> None:
    policy = RetryPolicy(
        include_errors=[ConnectionError, "TimeoutError", ConnectionError],
        exclude_errors=["ValueError"],
    )
    assert policy.include_errors == ("ConnectionError", "TimeoutError")
    wire = policy.to_proto()
    assert list(wire.retry.include_errors) == ["ConnectionError", "TimeoutError"]
    assert list(wire.retry.exclude_errors) == ["ValueError"]


@pytest.mark.parametrize("bad", ["ValueError", [""], [42], [int]])
def test_error_filters_reject_bad_entries(bad: object) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy(include_errors=bad)  # type: ignore[arg-type]


def test_total_delay_and_its_wire_alias() -> None:
    wire = RetryPolicy(max_total_delay=60).to_proto()
    assert wire.stop.HasField("max_delay")
    assert wire.stop.max_delay == 60.0
    assert RetryPolicy(max_delay=60) == RetryPolicy(max_total_delay=60)
    with pytest.raises(ValidationError, match="not both"):
        RetryPolicy(max_delay=1, max_total_delay=2)


def test_unlimited_attempts_need_a_time_limit() -> None:
    with pytest.raises(ValidationError, match="retry forever"):
        RetryPolicy(max_attempts=None)
    wire = RetryPolicy(max_attempts=None, max_total_delay=3600).to_proto()
    assert not wire.stop.HasField("max_attempts")
    assert wire.stop.max_delay == 3600


@pytest.mark.parametrize("attempts", [0, -1, 10_001, True, 2.5, "3"])
def test_max_attempts_range(attempts: object) -> None:
    with pytest.raises(ValidationError, match="max_attempts"):
        RetryPolicy(max_attempts=attempts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExponentialBackoff(initial=-1),
        lambda: ExponentialBackoff(initial=math.nan),
        lambda: ExponentialBackoff(multiplier=0.5),
        lambda: ExponentialBackoff(multiplier=1001),
        lambda: ExponentialBackoff(max_delay=math.inf),
        lambda: ExponentialBackoff(jitter="yes"),  # type: ignore[arg-type]
        lambda: FixedBackoff(delay=-0.1),
        lambda: FixedBackoff(delay=400 * 86_400),
        lambda: LinearBackoff(increment=-1),
        lambda: RetryPolicy(backoff="exponential"),  # type: ignore[arg-type]
        lambda: RetryPolicy(max_total_delay=-5),
    ],
)
def test_out_of_range_values_are_refused(make: object) -> None:
    with pytest.raises(ValidationError):
        make()  # type: ignore[operator]


def test_no_retry() -> None:
    assert RetryPolicy.no_retry().to_proto().stop.max_attempts == 1


def test_policies_are_immutable_values() -> None:
    policy = RetryPolicy(max_attempts=3)
    with pytest.raises(AttributeError):
        policy.max_attempts = 4
    assert policy == RetryPolicy(max_attempts=3)
    assert hash(policy) == hash(RetryPolicy(max_attempts=3))
    assert policy != RetryPolicy(max_attempts=4)
    assert "max_attempts=3" in repr(policy)
    # to_proto hands out copies: changing one leaves the policy alone.
    policy.to_proto().stop.max_attempts = 9
    assert policy.to_proto().stop.max_attempts == 3


def test_from_proto_round_trip() -> None:
    policy = RetryPolicy(
        max_attempts=7,
        backoff=ExponentialBackoff(0.25, 1.5, 30, jitter=False),
        max_total_delay=90,
        include_errors=["IOError"],
        exclude_errors=["KeyError"],
    )
    assert RetryPolicy.from_proto(policy.to_proto()) == policy
    bad = policy.to_proto()
    bad.version = 2
    with pytest.raises(ValidationError, match="version"):
        RetryPolicy.from_proto(bad)


@given(
    attempts=st.integers(1, 10_000),
    initial=st.floats(0, 3600),
    multiplier=st.floats(1, 1000),
    cap=st.floats(0, 86_400),
    jitter=st.booleans(),
)
def test_exponential_round_trips(
    attempts: int, initial: float, multiplier: float, cap: float, jitter: bool
) -> None:
    policy = RetryPolicy(attempts, ExponentialBackoff(initial, multiplier, cap, jitter))
    assert RetryPolicy.from_proto(policy.to_proto()) == policy


# LinearBackoff has no wire kind: it is sent only when an exponential (or fixed) wait
# reproduces it exactly, for every retry the policy allows.


@pytest.mark.parametrize(
    ("attempts", "backoff"),
    [
        (3, LinearBackoff(initial=2.0, increment=3.0)),  # two retries: 2, 5
        (2, LinearBackoff(initial=1.0, increment=100.0)),  # one retry
        (10, LinearBackoff(initial=4.0, increment=0.0)),  # constant: fixed
        (10, LinearBackoff(initial=5.0, increment=10.0, max_delay=12.0)),  # capped at once
        (2, LinearBackoff(initial=0.0, increment=1.0)),  # one retry, no wait
    ],
)
def test_linear_backoff_sent_exactly_when_possible(attempts: int, backoff: LinearBackoff) -> None:
    policy = RetryPolicy(max_attempts=attempts, backoff=backoff)
    wait = policy.to_proto().wait
    for retry in range(1, attempts):
        assert wire_delay(wait, retry) == pytest.approx(backoff.delay_for(retry))


@pytest.mark.parametrize(
    ("attempts", "backoff"),
    [
        (4, LinearBackoff(initial=2.0, increment=3.0)),
        (3, LinearBackoff(initial=0.0, increment=1.0)),
        (3, LinearBackoff(initial=0.001, increment=10.0)),  # multiplier would exceed 1000
    ],
)
def test_linear_backoff_refused_when_not_exact(attempts: int, backoff: LinearBackoff) -> None:
    with pytest.raises(ValidationError, match="cannot be sent exactly"):
        RetryPolicy(max_attempts=attempts, backoff=backoff)


def test_linear_backoff_refused_without_attempt_limit() -> None:
    with pytest.raises(ValidationError, match="unlimited"):
        RetryPolicy(max_attempts=None, max_total_delay=60, backoff=LinearBackoff())


@given(
    attempts=st.integers(1, 50),
    initial=st.floats(0, 100),
    increment=st.floats(0, 100),
    cap=st.floats(0, 500),
)
def test_linear_backoff_is_exact_or_refused(
    attempts: int, initial: float, increment: float, cap: float
) -> None:
    backoff = LinearBackoff(initial, increment, cap)
    try:
        policy = RetryPolicy(max_attempts=attempts, backoff=backoff)
    except ValidationError:
        return
    wait = policy.to_proto().wait
    for retry in range(1, attempts):
        assert wire_delay(wait, retry) == pytest.approx(backoff.delay_for(retry), rel=1e-9)


def test_validation_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError, match="max_attempts") as info:
        RetryPolicy(max_attempts=0)
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, ValidationError)
    assert str(again) == str(info.value)
