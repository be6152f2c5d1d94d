"""Retry policies for tasks submitted with the client.

A :class:`RetryPolicy` says how often a failed task is tried again and how long Azolla waits
between attempts. The orchestrator applies it; the client only validates it and sends it as the
wire message ``azolla.common.RetryPolicy`` (version 1).

Example:
    >>> from azolla.retry import RetryPolicy, ExponentialBackoff
    >>> policy = RetryPolicy(max_attempts=3, backoff=ExponentialBackoff(initial=1.0))

Rules applied by the orchestrator (see the concepts page of the docs for the full text):

* An attempt's error is retried only if the error is *retriable* (a task that raises with
  ``retriable=False`` is never retried), its type is not in ``exclude_errors``, and
  ``include_errors`` is empty or contains its type. An empty include list means "every error
  type", never "no error type".
* ``max_attempts`` counts every attempt, the first run included: ``max_attempts=3`` means one
  run and at most two retries. ``max_total_delay`` stops retries that would start later than that
  many seconds after the task was submitted.
* The first retry waits the backoff's initial delay.

When a task is submitted without a policy the server's default applies, which equals
``RetryPolicy()``: 5 attempts, exponential backoff with full jitter, initial 1 s, multiplier 2,
cap 300 s, no total limit, no error filters.

The wire format knows three wait kinds: fixed, exponential and exponential with full jitter.
:class:`LinearBackoff` has none of its own: a policy that uses it is sent as an exponential wait
only when that reproduces the linear delays *exactly* for every retry the policy allows (see
:class:`LinearBackoff`), and is refused with a :class:`~azolla.errors.ValidationError` otherwise.
Azolla never silently runs a different schedule from the one asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from azolla.adapters.grpc.pb import common_pb2
from azolla.errors import ValidationError

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "Backoff",
    "ExponentialBackoff",
    "FixedBackoff",
    "LinearBackoff",
    "RetryPolicy",
]

#: Largest ``max_attempts`` the orchestrator accepts.
MAX_ATTEMPTS_LIMIT = 10_000
#: Largest delay (any kind) the orchestrator accepts, in seconds: one year.
MAX_DELAY_SECONDS = 365 * 86_400.0
#: Largest exponential multiplier the orchestrator accepts.
MAX_MULTIPLIER = 1000.0
#: Wire format version of ``azolla.common.RetryPolicy`` produced by this module.
WIRE_VERSION = 1


def _check_seconds(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{owner}.{name} must be a number of seconds, not {value!r}")
    as_float = float(value)
    if not math.isfinite(as_float) or as_float < 0:
        raise ValidationError(f"{owner}.{name} must be a finite number >= 0, not {value!r}")
    if as_float > MAX_DELAY_SECONDS:
        raise ValidationError(
            f"{owner}.{name} must be at most {MAX_DELAY_SECONDS:.0f} s (one year), not {value!r}"
        )
    return as_float


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """Waits that grow geometrically: ``min(max_delay, initial * multiplier ** (n - 1))``.

    ``n`` is the retry number (1 for the first retry), so the first retry waits ``initial``.
    With ``jitter=True`` (the default, "full jitter") each wait is a uniform random sample from
    ``[0, that value]``, which spreads the retries of many failing tasks over time.

    Args:
        initial: Wait before the first retry, in seconds.
        multiplier: Growth factor per retry, between 1 and 1000.
        max_delay: Cap on any single wait, in seconds.
        jitter: Randomise each wait with full jitter.

    Raises:
        ValidationError: A value is out of range.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        _check_seconds("ExponentialBackoff", "initial", self.initial)
        _check_seconds("ExponentialBackoff", "max_delay", self.max_delay)
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            raise ValidationError(f"ExponentialBackoff.multiplier must be a number, not {m!r}")
        if not 1.0 <= m <= MAX_MULTIPLIER:
            raise ValidationError(
                f"ExponentialBackoff.multiplier must be between 1 and {MAX_MULTIPLIER:.0f}, "
                f"not {m!r}"
            )
        if not isinstance(self.jitter, bool):
            raise ValidationError(f"ExponentialBackoff.jitter must be a bool, not {self.jitter!r}")

    def delay_for(self, retry: int) -> float:
        """Return the wait before retry number ``retry`` (from 1); with jitter, its upper bound.

        Args:
            retry: 1 for the first retry, 2 for the second, ...
        """
        try:
            value = float(self.initial) * float(self.multiplier) ** max(retry - 1, 0)
        except OverflowError:
            return float(self.max_delay)
        return min(value, float(self.max_delay))

    def to_proto(self) -> common_pb2.RetryPolicyWait:
        """Return the wire message ``azolla.common.RetryPolicyWait``."""
        fields = {
            "initial_delay": float(self.initial),
            "multiplier": float(self.multiplier),
            "max_delay": float(self.max_delay),
        }
        if self.jitter:
            return common_pb2.RetryPolicyWait(
                exponential_jitter=common_pb2.RetryPolicyExponentialJitterWait(**fields)
            )
        return common_pb2.RetryPolicyWait(
            exponential=common_pb2.RetryPolicyExponentialWait(**fields)
        )


@dataclass(frozen=True, slots=True)
class FixedBackoff:
    """The same wait before every retry.

    Args:
        delay: Seconds to wait before each retry.

    Raises:
        ValidationError: The delay is negative, not finite or over one year.
    """

    delay: float = 1.0

    def __post_init__(self) -> None:
        _check_seconds("FixedBackoff", "delay", self.delay)

    def delay_for(self, retry: int) -> float:
        """Return the wait before retry number ``retry`` (always ``delay``).

        Args:
            retry: 1 for the first retry, 2 for the second, ...
        """
        del retry
        return float(self.delay)

    def to_proto(self) -> common_pb2.RetryPolicyWait:
        """Return the wire message ``azolla.common.RetryPolicyWait``."""
        return common_pb2.RetryPolicyWait(
            fixed=common_pb2.RetryPolicyFixedWait(delay=float(self.delay))
        )


@dataclass(frozen=True, slots=True)
class LinearBackoff:
    """Waits that grow by a constant step: ``min(max_delay, initial + increment * (n - 1))``.

    The wire format has no linear wait, so a policy using this backoff is sent as the wait that
    reproduces it exactly, and refused when none does:

    * ``increment == 0``: a fixed wait of ``initial`` (capped by ``max_delay``);
    * otherwise, with ``initial > 0``, an exponential wait (no jitter) with
      ``initial_delay=initial``, ``multiplier=(initial + increment) / initial`` (at most 1000)
      and the same cap. It matches the first two retries always, and every later retry when
      the cap is reached by the second (``initial + increment >= max_delay``);
    * with ``initial == 0``, a fixed zero wait for a single retry.

    So a linear backoff is accepted with ``max_attempts <= 3`` (at most two retries), with a
    zero increment, or when the cap is reached at once. Otherwise constructing the
    :class:`RetryPolicy` raises :class:`~azolla.errors.ValidationError` naming the alternatives:
    use :class:`ExponentialBackoff` or :class:`FixedBackoff` for longer schedules.

    Args:
        initial: Wait before the first retry, in seconds.
        increment: Seconds added for each further retry.
        max_delay: Cap on any single wait, in seconds.

    Raises:
        ValidationError: A value is out of range.
    """

    initial: float = 1.0
    increment: float = 1.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        _check_seconds("LinearBackoff", "initial", self.initial)
        _check_seconds("LinearBackoff", "increment", self.increment)
        _check_seconds("LinearBackoff", "max_delay", self.max_delay)

    def delay_for(self, retry: int) -> float:
        """Return the wait before retry number ``retry`` (from 1).

        Args:
            retry: 1 for the first retry, 2 for the second, ...
        """
        value = float(self.initial) + float(self.increment) * max(retry - 1, 0)
        return min(value, float(self.max_delay))

    def to_proto_for(self, retries: int | None) -> common_pb2.RetryPolicyWait:
        """Return the exact wire wait for a policy allowing ``retries`` retries.

        Args:
            retries: How many retries the policy allows (``max_attempts - 1``), or None for
                no limit.

        Raises:
            ValidationError: No wire wait reproduces this schedule exactly.
        """
        initial, increment, cap = float(self.initial), float(self.increment), float(self.max_delay)
        if increment == 0:
            return common_pb2.RetryPolicyWait(
                fixed=common_pb2.RetryPolicyFixedWait(delay=min(initial, cap))
            )
        if initial > 0:
            multiplier = (initial + increment) / initial
            reaches_cap = initial + increment >= cap
            few_retries = retries is not None and retries <= 2
            if multiplier <= MAX_MULTIPLIER and (reaches_cap or few_retries):
                return common_pb2.RetryPolicyWait(
                    exponential=common_pb2.RetryPolicyExponentialWait(
                        initial_delay=initial, multiplier=multiplier, max_delay=cap
                    )
                )
        elif retries is not None and retries <= 1:
            return common_pb2.RetryPolicyWait(fixed=common_pb2.RetryPolicyFixedWait(delay=0.0))
        allowed = "unlimited" if retries is None else str(retries)
        raise ValidationError(
            f"{self!r} cannot be sent exactly: the wire format has no linear wait, and an "
            f"exponential wait reproduces it only for at most two retries (this policy allows "
            f"{allowed}), a zero increment, or initial + increment >= max_delay. Use "
            f"max_attempts <= 3, FixedBackoff or ExponentialBackoff instead."
        )


#: Any of the backoff strategies.
Backoff: TypeAlias = ExponentialBackoff | FixedBackoff | LinearBackoff


def _error_names(owner: str, values: Iterable[str | type[BaseException]]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ValidationError(f"RetryPolicy.{owner} must be a list of error types, not a string")
    names: list[str] = []
    for value in values:
        if isinstance(value, type) and issubclass(value, BaseException):
            names.append(value.__name__)
        elif isinstance(value, str) and value.strip():
            names.append(value.strip())
        else:
            raise ValidationError(
                f"RetryPolicy.{owner} entries must be exception classes or non-empty type "
                f"names, not {value!r}"
            )
    return tuple(dict.fromkeys(names))


class RetryPolicy:
    """How often a failed task is retried and how long Azolla waits in between.

    Args:
        max_attempts: Most attempts in total, the first run included (1 = never retry), or
            None for no attempt limit (then ``max_total_delay`` is required).
        backoff: The wait between attempts; default ``ExponentialBackoff()`` (initial 1 s,
            multiplier 2, cap 300 s, full jitter).
        max_total_delay: No retry starts later than this many seconds after submission;
            None for no time limit. Sent as the wire's ``stop.max_delay``.
        include_errors: Error types that may be retried (exception classes or type names such
            as ``"ConnectionError"``); empty means every retriable error type.
        exclude_errors: Error types that are never retried; wins over ``include_errors``.
        max_delay: Alias of ``max_total_delay`` (the wire's name for it). It is *not* the cap on
            a single wait: that is the backoff's own ``max_delay``.

    Raises:
        ValidationError: A value is out of range, or both ``max_delay`` and
            ``max_total_delay`` are given.

    Example:
        >>> policy = RetryPolicy(max_attempts=3, backoff=ExponentialBackoff(initial=1.0))
        >>> policy.delay_for(2)
        2.0
    """

    __slots__ = (
        "_wire",
        "backoff",
        "exclude_errors",
        "include_errors",
        "max_attempts",
        "max_total_delay",
    )

    max_attempts: int | None
    backoff: Backoff
    max_total_delay: float | None
    include_errors: tuple[str, ...]
    exclude_errors: tuple[str, ...]
    _wire: common_pb2.RetryPolicy

    def __init__(
        self,
        max_attempts: int | None = 5,
        backoff: Backoff | None = None,
        *,
        max_total_delay: float | None = None,
        include_errors: Iterable[str | type[BaseException]] = (),
        exclude_errors: Iterable[str | type[BaseException]] = (),
        max_delay: float | None = None,
    ) -> None:
        if max_delay is not None:
            if max_total_delay is not None:
                raise ValidationError(
                    "give RetryPolicy either max_total_delay or its alias max_delay, not both"
                )
            max_total_delay = max_delay
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
        ):
            raise ValidationError(
                f"RetryPolicy.max_attempts must be an int from 1 to {MAX_ATTEMPTS_LIMIT} (the "
                f"first run counts), or None, not {max_attempts!r}"
            )
        if max_total_delay is not None:
            max_total_delay = _check_seconds("RetryPolicy", "max_total_delay", max_total_delay)
        if max_attempts is None and max_total_delay is None:
            raise ValidationError(
                "RetryPolicy with max_attempts=None needs max_total_delay, or it would retry "
                "forever"
            )
        if backoff is None:
            backoff = ExponentialBackoff()
        if not isinstance(backoff, ExponentialBackoff | FixedBackoff | LinearBackoff):
            raise ValidationError(
                "RetryPolicy.backoff must be ExponentialBackoff, FixedBackoff or LinearBackoff, "
                f"not {backoff!r}"
            )
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_total_delay", max_total_delay)
        object.__setattr__(self, "include_errors", _error_names("include_errors", include_errors))
        object.__setattr__(self, "exclude_errors", _error_names("exclude_errors", exclude_errors))
        # Built once: validates a LinearBackoff now, and makes every submit cheaper.
        object.__setattr__(self, "_wire", self._build_proto())

    @classmethod
    def no_retry(cls) -> RetryPolicy:
        """Return a policy that runs a task once and never retries it."""
        return cls(max_attempts=1)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RetryPolicy is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RetryPolicy is immutable (cannot delete {name!r})")

    def _key(self) -> tuple[object, ...]:
        return (
            self.max_attempts,
            self.backoff,
            self.max_total_delay,
            self.include_errors,
            self.exclude_errors,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RetryPolicy):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts!r}, backoff={self.backoff!r}, "
            f"max_total_delay={self.max_total_delay!r}, include_errors={self.include_errors!r}, "
            f"exclude_errors={self.exclude_errors!r})"
        )

    def delay_for(self, retry: int) -> float:
        """Return the wait before retry number ``retry`` (from 1); with jitter, its upper bound.

        Args:
            retry: 1 for the first retry, 2 for the second, ...
        """
        return self.backoff.delay_for(retry)

    def _wait_proto(self) -> common_pb2.RetryPolicyWait:
        if isinstance(self.backoff, LinearBackoff):
            retries = None if self.max_attempts is None else self.max_attempts - 1
            return self.backoff.to_proto_for(retries)
        return self.backoff.to_proto()

    def to_proto(self) -> common_pb2.RetryPolicy:
        """Return the wire message ``azolla.common.RetryPolicy`` (version 1), a fresh copy."""
        message = common_pb2.RetryPolicy()
        message.CopyFrom(self._wire)
        return message

    def wire_message(self) -> common_pb2.RetryPolicy:
        """Return the cached wire message; callers must not modify it (use :meth:`to_proto`)."""
        return self._wire

    def _build_proto(self) -> common_pb2.RetryPolicy:
        stop = common_pb2.RetryPolicyStop()
        if self.max_attempts is not None:
            stop.max_attempts = self.max_attempts
        if self.max_total_delay is not None:
            stop.max_delay = self.max_total_delay
        return common_pb2.RetryPolicy(
            version=WIRE_VERSION,
            stop=stop,
            wait=self._wait_proto(),
            retry=common_pb2.RetryPolicyRetry(
                include_errors=list(self.include_errors),
                exclude_errors=list(self.exclude_errors),
            ),
        )

    @classmethod
    def from_proto(cls, message: common_pb2.RetryPolicy) -> RetryPolicy:
        """Build a policy from its wire message (the inverse of :meth:`to_proto`).

        Args:
            message: An ``azolla.common.RetryPolicy``.

        Raises:
            ValidationError: The message holds values out of range or an unknown version.
        """
        if message.version not in (0, WIRE_VERSION):
            raise ValidationError(f"unsupported retry policy version {message.version}")
        kind = message.wait.WhichOneof("kind")
        backoff: Backoff
        if kind == "fixed":
            backoff = FixedBackoff(delay=message.wait.fixed.delay)
        elif kind == "exponential":
            w = message.wait.exponential
            backoff = ExponentialBackoff(w.initial_delay, w.multiplier, w.max_delay, jitter=False)
        elif kind == "exponential_jitter":
            j = message.wait.exponential_jitter
            backoff = ExponentialBackoff(j.initial_delay, j.multiplier, j.max_delay, jitter=True)
        else:
            backoff = ExponentialBackoff()
        stop = message.stop
        return cls(
            max_attempts=stop.max_attempts if stop.HasField("max_attempts") else None,
            backoff=backoff,
            max_total_delay=stop.max_delay if stop.HasField("max_delay") else None,
            include_errors=tuple(message.retry.include_errors),
            exclude_errors=tuple(message.retry.exclude_errors),
        )


#: The policy the orchestrator applies to a task submitted without one.
DEFAULT_RETRY_POLICY = RetryPolicy()
