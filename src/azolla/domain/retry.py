"""Retry policy and the decisions it drives.

Rules (the same in the docs, ``docs/concepts.md``):

* An attempt's error is retried only if **all** of these hold:

  1. the error's ``retriable`` flag is true (a worker's ``retriable=false`` always stops);
  2. its type is not in ``exclude_errors``;
  3. ``include_errors`` is empty **or** contains its type (an empty or absent include list
     means "every retriable error type", never "no error type");
  4. fewer than ``max_attempts`` attempts have started (``None``: no attempt limit);
  5. the retry would start no later than ``max_total_delay`` seconds after the task was
     submitted (``None``: no time limit).

* The wait before the retry that follows attempt *n* (n = 1, 2, ...):

  * ``fixed``: ``initial_delay``;
  * ``exponential``: ``min(max_delay, initial_delay * multiplier ** (n - 1))``, so the first
    retry waits exactly ``initial_delay``;
  * ``exponential_jitter`` (the default): a uniform sample from ``[0, bound]`` where ``bound``
    is the exponential value above ("full jitter"), so the first retry waits at most
    ``initial_delay``.

* Infrastructure failures (the shepherd running the attempt vanished, or its lease expired
  without word) are retried immediately while attempts remain, whatever the error filters say
  (rules 4 and 5 still apply; rules 1-3 do not).

Defaults (a request with no policy): 5 attempts, exponential with full jitter, initial 1 s,
multiplier 2, cap 300 s, no total limit, no filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from azolla.domain.errors import InvalidRetryPolicy

__all__ = [
    "RetryDecision",
    "RetryPolicy",
    "WaitKind",
    "decide_lost_retry",
    "decide_retry",
    "has_attempts_left",
    "policy_from_dict",
    "policy_to_dict",
    "retry_delay",
]

MAX_ATTEMPTS_LIMIT = 10_000
MAX_DELAY_SECONDS = 365 * 86_400.0


class WaitKind(StrEnum):
    """How the wait between attempts grows."""

    FIXED = "fixed"
    EXPONENTIAL = "exponential"
    EXPONENTIAL_JITTER = "exponential_jitter"


class RetryPolicy(BaseModel):
    """When and how soon a failed task is tried again. See the module docstring for the rules.

    Attributes:
        max_attempts: Most attempts in total (the first run counts), or None for no limit.
        max_total_delay: Latest start of a retry, in seconds after submission, or None.
        wait: The wait strategy.
        initial_delay: Seconds before the first retry (the upper bound with jitter); for
            ``fixed`` the wait before every retry.
        multiplier: Growth factor per attempt for the exponential strategies (>= 1).
        max_delay: Cap on a single wait of the exponential strategies, in seconds (a
            ``fixed`` wait is ``initial_delay`` as given: the wire's fixed wait has no cap).
        include_errors: Error types that may be retried; empty means all.
        exclude_errors: Error types that are never retried.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int | None = Field(default=5, ge=1, le=MAX_ATTEMPTS_LIMIT)
    max_total_delay: float | None = Field(default=None, ge=0, le=MAX_DELAY_SECONDS)
    wait: WaitKind = WaitKind.EXPONENTIAL_JITTER
    initial_delay: float = Field(default=1.0, ge=0, le=MAX_DELAY_SECONDS)
    multiplier: float = Field(default=2.0, ge=1.0, le=1000.0)
    max_delay: float = Field(default=300.0, ge=0, le=MAX_DELAY_SECONDS)
    include_errors: tuple[str, ...] = ()
    exclude_errors: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_bounds(self) -> RetryPolicy:
        if self.max_attempts is None and self.max_total_delay is None:
            raise ValueError("a policy without max_attempts needs max_total_delay")
        return self

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> RetryPolicy:
        """Validate a policy from its dict form.

        Raises:
            InvalidRetryPolicy: With a readable message when a value is out of range.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'policy'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidRetryPolicy(f"invalid retry policy: {problems}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in events."""
        return self.model_dump(mode="json")


DEFAULT_POLICY = RetryPolicy()


@lru_cache(maxsize=256)
def _policy_dict_by_value(policy: RetryPolicy) -> dict[str, Any]:
    return policy.to_dict()


_POLICY_DICT_BY_ID: dict[int, tuple[RetryPolicy, dict[str, Any]]] = {}


def policy_to_dict(policy: RetryPolicy) -> dict[str, Any]:
    """Return the JSON form of ``policy`` (cached: policies are immutable).

    Looked up by identity first (hashing a pydantic model hashes every field), then by value.
    The returned dict is shared; callers must not modify it.
    """
    hit = _POLICY_DICT_BY_ID.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    raw = _policy_dict_by_value(policy)
    if len(_POLICY_DICT_BY_ID) >= 1024:
        _POLICY_DICT_BY_ID.clear()
    _POLICY_DICT_BY_ID[id(policy)] = (policy, raw)  # the entry keeps ``policy`` (and its id) alive
    return raw


_DEFAULT_DICT = policy_to_dict(DEFAULT_POLICY)


def policy_from_dict(raw: dict[str, Any]) -> RetryPolicy:
    """Build a policy from its JSON form (the default policy is reused, not re-validated)."""
    if raw is _DEFAULT_DICT or raw == _DEFAULT_DICT:
        return DEFAULT_POLICY
    return RetryPolicy.model_validate(raw)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The outcome of :func:`decide_retry`.

    Attributes:
        retry: Whether another attempt will run.
        delay: Seconds to wait before it (0 when not retrying).
        reason: Why, in words (recorded and shown to operators).
    """

    retry: bool
    delay: float
    reason: str


def retry_delay(policy: RetryPolicy, failed_attempt: int, jitter: float) -> float:
    """Return the wait before the retry that follows attempt ``failed_attempt`` (from 1).

    Args:
        policy: The task's policy.
        failed_attempt: The number of the attempt that just failed.
        jitter: A uniform sample from [0, 1), used only by ``exponential_jitter``.
    """
    if policy.wait is WaitKind.FIXED:
        return policy.initial_delay
    exponent = max(failed_attempt - 1, 0)
    try:
        bound = policy.initial_delay * policy.multiplier**exponent
    except OverflowError:
        # multiplier ** exponent is past the float range: the cap applies, unless there is
        # no delay to grow (0 * anything is 0).
        bound = policy.max_delay if policy.initial_delay else 0.0
    bound = min(bound, policy.max_delay)
    if policy.wait is WaitKind.EXPONENTIAL:
        return bound
    return bound * min(max(jitter, 0.0), 1.0)


def has_attempts_left(policy: RetryPolicy, attempts_started: int) -> bool:
    """Return True when the policy allows another attempt after ``attempts_started``."""
    return policy.max_attempts is None or attempts_started < policy.max_attempts


def error_type_retries(policy: RetryPolicy, error_type: str, retriable: bool) -> bool:
    """Apply the retriable flag and the include/exclude filters to one error type."""
    if not retriable:
        return False
    if error_type in policy.exclude_errors:
        return False
    return not policy.include_errors or error_type in policy.include_errors


def decide_lost_retry(
    policy: RetryPolicy, *, attempts_started: int, submitted_at: float, now: float
) -> RetryDecision:
    """Decide whether an attempt lost to infrastructure (shepherd gone, lease expired) is retried.

    Such a retry starts at once and ignores the retriable flag and the error filters; the
    attempt limit and ``max_total_delay`` still apply, so a policy without an attempt limit
    does not retry a task forever on shepherds that keep dying.

    Args:
        policy: The task's policy.
        attempts_started: Attempts started so far, including the lost one.
        submitted_at: When the task was submitted (epoch seconds).
        now: The current time (epoch seconds).
    """
    if not has_attempts_left(policy, attempts_started):
        return RetryDecision(False, 0.0, f"all {policy.max_attempts} attempts used")
    if policy.max_total_delay is not None and now - submitted_at > policy.max_total_delay:
        return RetryDecision(False, 0.0, f"retrying would pass max_total_delay "
                                         f"({policy.max_total_delay} s)")
    return RetryDecision(True, 0.0, f"retry {attempts_started + 1} at once "
                                    "(infrastructure failure)")


def decide_retry(
    policy: RetryPolicy,
    *,
    attempts_started: int,
    error_type: str,
    retriable: bool,
    submitted_at: float,
    now: float,
    jitter: float,
) -> RetryDecision:
    """Decide whether a failed attempt is retried, and after how long.

    Args:
        policy: The task's policy.
        attempts_started: Attempts started so far, including the one that failed.
        error_type: The failure's type name.
        retriable: The failure's retriable flag.
        submitted_at: When the task was submitted (epoch seconds).
        now: The current time (epoch seconds).
        jitter: A uniform sample from [0, 1).
    """
    if not retriable:
        return RetryDecision(False, 0.0, "the error is not retriable")
    if not error_type_retries(policy, error_type, retriable):
        return RetryDecision(False, 0.0, f"the policy does not retry {error_type}")
    if not has_attempts_left(policy, attempts_started):
        return RetryDecision(False, 0.0, f"all {policy.max_attempts} attempts used")
    delay = retry_delay(policy, attempts_started, jitter)
    if policy.max_total_delay is not None and now + delay - submitted_at > policy.max_total_delay:
        return RetryDecision(False, 0.0, f"retrying would pass max_total_delay "
                                         f"({policy.max_total_delay} s)")
    return RetryDecision(True, delay, f"retry {attempts_started + 1} in {delay:.3f} s")
