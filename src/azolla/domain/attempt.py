"""The Attempt aggregate: one execution of a task, fenced by its number.

Life: ``assigned`` (pushed to a shepherd, with a lease) → ``running`` (the shepherd
acknowledged) → exactly one of ``succeeded`` | ``failed`` | ``lost`` | ``timed_out`` |
``cancelled``. An outcome that reaches an attempt after it ended is refused with
:class:`~azolla.domain.errors.AttemptNotRunning` and may be recorded with
:meth:`Attempt.reject_outcome`, so refusals are visible in the log.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast
from uuid import UUID

from eventsourcing.domain import Aggregate

from azolla.domain.aggregate import AzollaAggregate
from azolla.domain.errors import AttemptNotRunning, InvalidTransition
from azolla.domain.values import (
    LIVE_ATTEMPT_STATES,
    AttemptState,
    ErrorInfo,
    attempt_stream_id,
    event_time,
    uuid_text,
)

__all__ = ["Attempt", "ensure_live"]




def ensure_live(state: AttemptState, number: int) -> None:
    """Refuse to end an attempt that has already ended.

    Raises:
        AttemptNotRunning: The attempt is past ``assigned``/``running``.
    """
    if state not in LIVE_ATTEMPT_STATES:
        raise AttemptNotRunning(f"attempt {number} has already ended ({state.value})")


class Attempt(AzollaAggregate):
    """One attempt of a task. Its stream id is ``attempt_stream_id(task_id, number)``.

    Attributes:
        task_id: The task.
        number: The attempt number (fencing token), from 1.
        shepherd_id: The shepherd it was pushed to.
        lease_deadline: When the orchestrator gives up on hearing from it (epoch seconds),
            or None when only the shepherd's liveness bounds it.
        domain: The task's domain.
        partition_day: The task's partition day (attempt events live with their task).
        state: An :class:`~azolla.domain.values.AttemptState`.
        started_at: Assignment time.
        ended_at: End time, or None.
        error: The failure, if it failed.
        rejections: How many late outcomes were refused and recorded.
    """

    class Assigned(AzollaAggregate.Created):
        """The attempt was pushed to a shepherd under a lease."""

        TYPE: ClassVar[str] = "AttemptAssigned.v1"
        task_id: str
        number: int
        shepherd_id: str
        lease_deadline: float | None
        domain: str
        partition_day: int

    class Running(Aggregate.Event):
        """The shepherd confirmed the attempt is running."""

        TYPE: ClassVar[str] = "AttemptRunning.v1"

        def apply(self, aggregate: Aggregate) -> None:
            """Mark it running."""
            aggregate = cast(Attempt, aggregate)
            aggregate.state = AttemptState.RUNNING

    class Ended(Aggregate.Event):
        """The attempt reached its outcome."""

        TYPE: ClassVar[str] = "AttemptEnded.v1"
        outcome: str
        error: dict[str, Any] | None

        def apply(self, aggregate: Aggregate) -> None:
            """Record the outcome."""
            aggregate = cast(Attempt, aggregate)
            aggregate.state = AttemptState(self.outcome)
            aggregate.ended_at = self.timestamp.timestamp()
            aggregate.error = ErrorInfo.from_dict(self.error) if self.error else None

    class OutcomeRejected(Aggregate.Event):
        """A late outcome for this attempt was refused (never applied)."""

        TYPE: ClassVar[str] = "AttemptOutcomeRejected.v1"
        reported: str
        reason: str

        def apply(self, aggregate: Aggregate) -> None:
            """Count the refusal."""
            aggregate = cast(Attempt, aggregate)
            aggregate.rejections += 1

    def __init__(
        self,
        task_id: str,
        number: int,
        shepherd_id: str,
        lease_deadline: float | None,
        domain: str,
        partition_day: int,
    ) -> None:
        self.task_id = task_id
        self.number = number
        self.shepherd_id = shepherd_id
        self.lease_deadline = lease_deadline
        self.domain = domain
        self.partition_day = partition_day
        self.state = AttemptState.ASSIGNED
        self.started_at = self.created_on.timestamp()
        self.ended_at: float | None = None
        self.error: ErrorInfo | None = None
        self.rejections = 0

    @classmethod
    def assign(
        cls,
        *,
        task_id: UUID,
        number: int,
        shepherd_id: str,
        lease_deadline: float | None,
        domain: str,
        partition_day: int,
        now: float,
    ) -> Attempt:
        """Create attempt ``number`` of ``task_id`` on ``shepherd_id``."""
        if number < 1:
            raise InvalidTransition(f"attempt numbers start at 1, got {number}")
        return cls._create(
            cls.Assigned,
            id=attempt_stream_id(task_id, number),
            timestamp=event_time(now),
            task_id=uuid_text(task_id),
            number=number,
            shepherd_id=shepherd_id,
            lease_deadline=lease_deadline,
            domain=domain,
            partition_day=partition_day,
        )

    def mark_running(self, now: float) -> bool:
        """Record the shepherd's acknowledgement. Returns False if already running.

        Raises:
            AttemptNotRunning: The attempt has ended.
        """
        ensure_live(self.state, self.number)
        if self.state is AttemptState.RUNNING:
            return False
        self.trigger_event(self.Running, timestamp=event_time(now))
        return True

    def end(self, outcome: AttemptState, now: float, error: ErrorInfo | None = None) -> None:
        """End the attempt with ``outcome`` (any state but assigned/running).

        Raises:
            AttemptNotRunning: The attempt has already ended.
            InvalidTransition: ``outcome`` is not an end state.
        """
        ensure_live(self.state, self.number)
        if outcome in LIVE_ATTEMPT_STATES:
            raise InvalidTransition(f"{outcome.value} is not an outcome")
        self.trigger_event(self.Ended, timestamp=event_time(now), outcome=outcome.value,
                           error=error.to_dict() if error else None)

    def reject_outcome(self, reported: str, reason: str, now: float) -> None:
        """Record that a late outcome for this attempt was refused."""
        self.trigger_event(self.OutcomeRejected, timestamp=event_time(now), reported=reported,
                           reason=reason)
