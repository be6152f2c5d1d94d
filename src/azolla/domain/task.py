"""The Task aggregate: one submitted unit of work and its single terminal outcome.

Life: ``queued`` → (``running`` → ``retry_wait`` →)* ``running`` → exactly one of
``succeeded`` | ``failed`` | ``cancelled``. Decisions are plain functions (:func:`fence`,
:func:`can_start`) or live in :mod:`azolla.domain.retry`, so they can be tested and mutated
directly; the nested event classes only apply facts.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast
from uuid import UUID

from eventsourcing.domain import Aggregate

from azolla.domain.aggregate import AzollaAggregate
from azolla.domain.errors import InvalidTransition, StaleAttempt, TaskAlreadyTerminal
from azolla.domain.retry import (
    DEFAULT_POLICY,
    RetryPolicy,
    decide_lost_retry,
    decide_retry,
    has_attempts_left,
    policy_from_dict,
    policy_to_dict,
)
from azolla.domain.values import (
    DEFAULT_GROUP,
    TERMINAL_TASK_STATES,
    ErrorInfo,
    TaskState,
    event_time,
    partition_day,
)

__all__ = ["Task", "can_start", "fence"]

INFRASTRUCTURE_ERROR = "InfrastructureError"
TIMEOUT_ERROR = "TaskTimeout"




def fence(state: TaskState, current_attempt: int | None, reported: int) -> None:
    """Refuse an outcome, heartbeat or cancel that does not name the running attempt.

    Args:
        state: The task's state.
        current_attempt: The attempt now running, or None.
        reported: The attempt number the message names.

    Raises:
        TaskAlreadyTerminal: The task has ended; nothing may change it.
        StaleAttempt: ``reported`` is not the running attempt (superseded, or none runs).
    """
    if state in TERMINAL_TASK_STATES:
        raise TaskAlreadyTerminal(f"the task has already {state.value}; attempt {reported} "
                                  "cannot change it")
    if state is not TaskState.RUNNING or current_attempt != reported:
        raise StaleAttempt(
            f"attempt {reported} is not the task's running attempt "
            f"(current: {current_attempt if state is TaskState.RUNNING else 'none'})",
            reported=reported,
            current=current_attempt if state is TaskState.RUNNING else None,
        )


def can_start(state: TaskState, ready_at: float, now: float) -> None:
    """Refuse to start an attempt unless the task is waiting and due.

    Raises:
        TaskAlreadyTerminal: The task has ended.
        InvalidTransition: An attempt is running, or the task is not due yet.
    """
    if state in TERMINAL_TASK_STATES:
        raise TaskAlreadyTerminal(f"the task has already {state.value}")
    if state is TaskState.RUNNING:
        raise InvalidTransition("an attempt of this task is already running")
    if now < ready_at:
        raise InvalidTransition(f"the task is not due until {ready_at:.3f} (now {now:.3f})")


class Task(AzollaAggregate):
    """A submitted task. Create with :meth:`submit`; never mutate attributes directly.

    Attributes:
        name: Registered task name.
        domain: Isolation domain.
        group: Shepherd group that may run it.
        args: JSON array text.
        kwargs: JSON object text.
        policy: Its :class:`~azolla.domain.retry.RetryPolicy`.
        idempotency_key: The submitter's key, if any.
        priority: Higher runs first.
        timeout: Per-attempt timeout in seconds, or None.
        submitted_at: Submission time (epoch seconds).
        state: A :class:`~azolla.domain.values.TaskState`.
        attempts: Number of attempts started.
        current_attempt: The running attempt's number, or None.
        ready_at: Earliest time the next attempt may start.
        result: JSON text of the value when succeeded.
        error: The final :class:`~azolla.domain.values.ErrorInfo` when failed.
    """

    class Submitted(AzollaAggregate.Created):
        """The task was accepted."""

        TYPE: ClassVar[str] = "TaskSubmitted.v1"
        name: str
        domain: str
        group: str
        args: str
        kwargs: str
        retry_policy: dict[str, Any]
        idempotency_key: str | None
        priority: int
        not_before: float | None
        timeout: float | None

    class AttemptStarted(Aggregate.Event):
        """An attempt was assigned to a shepherd (committed before the push)."""

        TYPE: ClassVar[str] = "TaskAttemptStarted.v1"
        attempt: int
        shepherd_id: str

        def apply(self, aggregate: Aggregate) -> None:
            """Mark the attempt running."""
            aggregate = cast(Task, aggregate)
            aggregate.state = TaskState.RUNNING
            aggregate.attempts = self.attempt
            aggregate.current_attempt = self.attempt

    class RetryScheduled(Aggregate.Event):
        """The running attempt ended without success; another attempt will follow."""

        TYPE: ClassVar[str] = "TaskRetryScheduled.v1"
        attempt: int
        outcome: str
        error: dict[str, Any]
        retry_at: float

        def apply(self, aggregate: Aggregate) -> None:
            """Wait for the retry time."""
            aggregate = cast(Task, aggregate)
            aggregate.state = TaskState.RETRY_WAIT
            aggregate.current_attempt = None
            aggregate.ready_at = self.retry_at
            aggregate.last_error = ErrorInfo.from_dict(self.error)

    class Succeeded(Aggregate.Event):
        """Terminal: the running attempt returned a value."""

        TYPE: ClassVar[str] = "TaskSucceeded.v1"
        TERMINAL: ClassVar[bool] = True
        attempt: int
        result: str

        def apply(self, aggregate: Aggregate) -> None:
            """Record the value."""
            aggregate = cast(Task, aggregate)
            aggregate.state = TaskState.SUCCEEDED
            aggregate.current_attempt = None
            aggregate.result = self.result

    class Failed(Aggregate.Event):
        """Terminal: the task failed for good."""

        TYPE: ClassVar[str] = "TaskFailed.v1"
        TERMINAL: ClassVar[bool] = True
        attempt: int | None
        outcome: str
        error: dict[str, Any]
        reason: str

        def apply(self, aggregate: Aggregate) -> None:
            """Record the final error."""
            aggregate = cast(Task, aggregate)
            aggregate.state = TaskState.FAILED
            aggregate.current_attempt = None
            aggregate.error = ErrorInfo.from_dict(self.error)

    class Cancelled(Aggregate.Event):
        """Terminal: the task was cancelled."""

        TYPE: ClassVar[str] = "TaskCancelled.v1"
        TERMINAL: ClassVar[bool] = True
        attempt: int | None
        reason: str

        def apply(self, aggregate: Aggregate) -> None:
            """Record the cancellation."""
            aggregate = cast(Task, aggregate)
            aggregate.state = TaskState.CANCELLED
            aggregate.current_attempt = None

    def __init__(
        self,
        name: str,
        domain: str,
        group: str,
        args: str,
        kwargs: str,
        retry_policy: dict[str, Any],
        idempotency_key: str | None,
        priority: int,
        not_before: float | None,
        timeout: float | None,
    ) -> None:
        self.name = name
        self.domain = domain
        self.group = group
        self.args = args
        self.kwargs = kwargs
        self.policy = policy_from_dict(retry_policy)
        self.idempotency_key = idempotency_key
        self.priority = priority
        self.not_before = not_before
        self.timeout = timeout
        self.submitted_at = self.created_on.timestamp()
        self.partition_day = partition_day(self.submitted_at)
        self.state = TaskState.QUEUED
        self.attempts = 0
        self.current_attempt: int | None = None
        self.ready_at = max(self.submitted_at, not_before or 0.0)
        self.result: str | None = None
        self.error: ErrorInfo | None = None
        self.last_error: ErrorInfo | None = None

    # -- commands -------------------------------------------------------------------------

    @classmethod
    def submit(
        cls,
        *,
        task_id: UUID,
        name: str,
        args: str,
        kwargs: str,
        now: float,
        domain: str = "default",
        group: str = DEFAULT_GROUP,
        policy: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        not_before: float | None = None,
        timeout: float | None = None,
    ) -> Task:
        """Create a task. Inputs must already be validated (see :mod:`azolla.domain.values`)."""
        return cls._create(
            cls.Submitted,
            id=task_id,
            timestamp=event_time(now),
            name=name,
            domain=domain,
            group=group,
            args=args,
            kwargs=kwargs,
            retry_policy=policy_to_dict(policy or DEFAULT_POLICY),
            idempotency_key=idempotency_key,
            priority=priority,
            not_before=not_before,
            timeout=timeout,
        )

    @property
    def is_terminal(self) -> bool:
        """True once the task has its one outcome."""
        return self.state in TERMINAL_TASK_STATES

    def start_attempt(self, shepherd_id: str, now: float) -> int:
        """Start the next attempt on ``shepherd_id`` and return its number.

        Raises:
            TaskAlreadyTerminal: The task has ended.
            InvalidTransition: An attempt is running, the task is not due, or no attempt is left.
        """
        can_start(self.state, self.ready_at, now)
        if not has_attempts_left(self.policy, self.attempts):
            raise InvalidTransition(f"all {self.policy.max_attempts} attempts have been used")
        number = self.attempts + 1
        self.trigger_event(
            self.AttemptStarted, timestamp=event_time(now), attempt=number, shepherd_id=shepherd_id
        )
        return number

    def succeed(self, attempt: int, result: str, now: float) -> None:
        """Record the running attempt's value as the task's outcome.

        Raises:
            TaskAlreadyTerminal: The task has ended.
            StaleAttempt: ``attempt`` is not the running attempt.
        """
        fence(self.state, self.current_attempt, attempt)
        self.trigger_event(self.Succeeded, timestamp=event_time(now), attempt=attempt,
                           result=result)

    def fail(self, attempt: int, error: ErrorInfo, now: float, jitter: float,
             outcome: str = "failed") -> bool:
        """Record a failed attempt; schedule a retry or fail the task per the policy.

        Args:
            attempt: The attempt that failed.
            error: What went wrong.
            now: Current time.
            jitter: Uniform sample from [0, 1) for jittered waits.
            outcome: ``"failed"`` or ``"timed_out"`` (recorded with the decision).

        Returns:
            True when a retry was scheduled.

        Raises:
            TaskAlreadyTerminal: The task has ended.
            StaleAttempt: ``attempt`` is not the running attempt.
        """
        fence(self.state, self.current_attempt, attempt)
        decision = decide_retry(
            self.policy,
            attempts_started=self.attempts,
            error_type=error.type,
            retriable=error.retriable,
            submitted_at=self.submitted_at,
            now=now,
            jitter=jitter,
        )
        if decision.retry:
            self.trigger_event(self.RetryScheduled, timestamp=event_time(now), attempt=attempt,
                               outcome=outcome, error=error.to_dict(),
                               retry_at=now + decision.delay)
        else:
            self.trigger_event(self.Failed, timestamp=event_time(now), attempt=attempt,
                               outcome=outcome, error=error.to_dict(), reason=decision.reason)
        return decision.retry

    def lose(self, attempt: int, reason: str, now: float) -> bool:
        """Record that the running attempt was lost (shepherd gone, lease expired unheard).

        Infrastructure failures retry at once while attempts remain and ``max_total_delay``
        has not passed, whatever the error filters say (see :func:`decide_lost_retry`).

        Returns:
            True when a retry was scheduled.

        Raises:
            TaskAlreadyTerminal: The task has ended.
            StaleAttempt: ``attempt`` is not the running attempt.
        """
        fence(self.state, self.current_attempt, attempt)
        error = ErrorInfo(INFRASTRUCTURE_ERROR, reason, {}, True)
        decision = decide_lost_retry(self.policy, attempts_started=self.attempts,
                                     submitted_at=self.submitted_at, now=now)
        if decision.retry:
            self.trigger_event(self.RetryScheduled, timestamp=event_time(now), attempt=attempt,
                               outcome="lost", error=error.to_dict(), retry_at=now)
            return True
        self.trigger_event(self.Failed, timestamp=event_time(now), attempt=attempt, outcome="lost",
                           error=error.to_dict(), reason=decision.reason)
        return False

    def cancel(self, reason: str, now: float) -> int | None:
        """Cancel the task. Returns the attempt that was running (to be stopped), if any.

        Raises:
            TaskAlreadyTerminal: The task has ended.
        """
        if self.is_terminal:
            raise TaskAlreadyTerminal(f"the task has already {self.state.value}")
        running = self.current_attempt
        self.trigger_event(self.Cancelled, timestamp=event_time(now), attempt=running,
                           reason=reason)
        return running
