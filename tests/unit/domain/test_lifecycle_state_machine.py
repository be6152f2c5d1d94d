"""Model-based test of the task lifecycle (RELIABILITY-NOTES 5.3), on the pure domain.

A Hypothesis ``RuleBasedStateMachine`` drives a few tasks, their attempts and two shepherds the
way the orchestrator does — submit (with repeated idempotency keys), start, success and
failure reports with the current and with stale attempt numbers, shepherd loss, lease expiry,
cancel, clock advances, restart (rebuild every aggregate from its encoded events) — and checks
the domain against a small independent model after every step.

Budget: ``AZOLLA_STATEFUL_EXAMPLES`` examples (default 200) of up to 50 steps, derandomized,
no example database, so CI runs are reproducible; ``scripts/mutation.sh`` lowers the budget,
and under mutmut (``MUTANT_UNDER_TEST`` set) a failure is reported without shrinking it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from uuid import UUID

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from azolla.domain import (
    Attempt,
    AttemptNotRunning,
    AttemptState,
    CapacityExceeded,
    ErrorInfo,
    InvalidTransition,
    RetryPolicy,
    Shepherd,
    ShepherdState,
    StaleAttempt,
    Task,
    TaskAlreadyTerminal,
    TaskState,
    WaitKind,
)
from azolla.domain.events import TERMINAL_TYPES, decode
from azolla.domain.task import INFRASTRUCTURE_ERROR, TIMEOUT_ERROR

from ._support import Log, public_state

START = 1_700_000_000.1234567  # not a whole microsecond: event times are truncated
LEASE = 30.0
ERROR_TYPES = ("ValueError", "KeyError", "IOError")
SHEPHERDS = ("shep-a", "shep-b")
EXAMPLES = int(os.environ.get("AZOLLA_STATEFUL_EXAMPLES", "200"))

error_lists = st.lists(st.sampled_from(ERROR_TYPES), max_size=2, unique=True).map(tuple)
limited = st.builds(
    RetryPolicy,
    max_attempts=st.integers(0, 3).map(lambda n: 4 - n),  # shrinks towards more attempts
    max_total_delay=st.sampled_from([None, None, 0.0, 5.0, 30.0]),
    wait=st.sampled_from(list(WaitKind)),
    initial_delay=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    multiplier=st.sampled_from([1.0, 2.0, 3.0]),
    max_delay=st.sampled_from([0.0, 2.0, 10.0, 300.0]),
    include_errors=error_lists,
    exclude_errors=error_lists,
)
unlimited = st.builds(
    RetryPolicy,
    max_attempts=st.none(),
    max_total_delay=st.sampled_from([5.0, 30.0]),
    wait=st.sampled_from(list(WaitKind)),
    initial_delay=st.sampled_from([0.0, 1.0]),
)
policies = st.none() | limited | unlimited
jitters = st.floats(0, 1, exclude_max=True)


@dataclass
class Expected:
    """What the model says about one task."""

    state: TaskState
    policy: RetryPolicy
    submitted_at: float
    ready_at: float
    attempts: int = 0
    current: int | None = None


def expected_delay(policy: RetryPolicy, failed_attempt: int, jitter: float) -> float:
    """The wait before the next attempt, straight from the rules in the retry docstring."""
    if policy.wait is WaitKind.FIXED:
        return policy.initial_delay
    bound = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (failed_attempt - 1))
    return bound if policy.wait is WaitKind.EXPONENTIAL else bound * jitter


def late_report(task: Task, reported: int, kind: str, now: float, jitter: float) -> None:
    """Send a report of ``kind`` naming attempt ``reported``."""
    if kind == "succeed":
        task.succeed(reported, '"late"', now)
    elif kind == "fail":
        task.fail(reported, ErrorInfo("ValueError", "late"), now, jitter)
    elif kind == "timeout":
        task.fail(reported, ErrorInfo(TIMEOUT_ERROR), now, jitter, outcome="timed_out")
    else:
        task.lose(reported, "late loss", now)


class Lifecycle(RuleBasedStateMachine):
    """Tasks, attempts and shepherds driven like the orchestrator drives them."""

    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.next_id = 1
        self.log = Log()
        self.tasks_by_id: dict[UUID, Task] = {}
        self.expected: dict[UUID, Expected] = {}
        self.idempotency: dict[tuple[str, str], UUID] = {}
        self.attempts: dict[tuple[UUID, int], Attempt] = {}
        self.shepherds: dict[str, Shepherd] = {}
        self.placed: dict[tuple[UUID, int], str] = {}  # running attempt -> shepherd
        self.stale_refused = 0
        self.verified: dict[UUID, int] = {}  # stream -> version whose rebuild matched

    # -- helpers --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Append every pending event to the log (the orchestrator's commit)."""
        for aggregate in (*self.tasks_by_id.values(), *self.attempts.values(),
                          *self.shepherds.values()):
            self.log.save(aggregate)

    def end_attempt(self, task_id: UUID, number: int, outcome: AttemptState,
                    error: ErrorInfo | None) -> None:
        """End the attempt aggregate and free its shepherd slot."""
        self.attempts[(task_id, number)].end(outcome, self.now, error)
        shepherd = self.placed.pop((task_id, number))
        self.shepherds[shepherd].release(str(task_id), number)

    def apply_failure(self, task_id: UUID, error: ErrorInfo, jitter: float,
                      outcome: AttemptState) -> None:
        """Report the running attempt's failure and check the retry decision against the model."""
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        number = model.current
        assert number is not None
        policy = model.policy
        delay = expected_delay(policy, number, jitter)
        should_retry = (
            error.retriable
            and error.type not in policy.exclude_errors
            and (not policy.include_errors or error.type in policy.include_errors)
            and (policy.max_attempts is None or model.attempts < policy.max_attempts)
            and (policy.max_total_delay is None
                 or self.now + delay - model.submitted_at <= policy.max_total_delay)
        )
        retried = task.fail(number, error, self.now, jitter, outcome=outcome.value)
        assert retried is should_retry
        if retried:
            waited = task.ready_at - self.now
            assert waited == pytest.approx(delay, abs=1e-6)
            # the delay stays inside the policy's bounds
            if policy.wait is WaitKind.FIXED:
                assert delay == policy.initial_delay
            else:
                assert 0.0 <= delay <= policy.max_delay
                assert delay <= policy.initial_delay * policy.multiplier ** (number - 1)
            if number == 1:
                assert delay <= policy.initial_delay
            model.state, model.ready_at = TaskState.RETRY_WAIT, task.ready_at
        else:
            model.state = TaskState.FAILED
            assert task.error == error
        model.current = None
        self.end_attempt(task_id, number, outcome, error)

    def refused_report(self, task_id: UUID, reported: int, kind: str, jitter: float) -> None:
        """Report an outcome for an attempt that is not running; nothing may change."""
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        before = public_state(task)
        expected_error: type[InvalidTransition] = (
            TaskAlreadyTerminal if model.state in (TaskState.SUCCEEDED, TaskState.FAILED,
                                                   TaskState.CANCELLED) else StaleAttempt
        )
        with pytest.raises(expected_error) as info:
            late_report(task, reported, kind, self.now, jitter)
        if isinstance(info.value, StaleAttempt):
            assert info.value.reported == reported
            assert info.value.current == (model.current if model.state is TaskState.RUNNING
                                          else None)
        assert public_state(task) == before
        assert task.collect_events() == []
        attempt = self.attempts.get((task_id, reported))
        if attempt is not None:
            # a stale attempt has ended: its aggregate refuses too, and records the rejection
            with pytest.raises(AttemptNotRunning):
                attempt.end(AttemptState.SUCCEEDED, self.now)
            attempt.reject_outcome(kind, str(info.value), self.now)
        self.stale_refused += 1

    # -- rules ----------------------------------------------------------------------------------

    @initialize()
    def shepherds_connect(self) -> None:
        for name in SHEPHERDS:
            shepherd = Shepherd.register(shepherd_uuid=name, domain="default",
                                         group="default", capacity=2, software_version="1",
                                         now=self.now)
            shepherd.connect(2, "1", self.now)
            self.shepherds[name] = shepherd
        self.flush()

    @precondition(lambda self: len(self.tasks_by_id) < 6)
    @rule(
        target=tasks,
        key=st.sampled_from([None, "k1", "k2"]),
        domain=st.sampled_from(["default", "other"]),
        policy=policies,
        delay_start=st.none() | st.floats(0, 20),
        timeout=st.none() | st.floats(1, 60),
    )
    def submit(self, key: str | None, domain: str, policy: RetryPolicy | None,
               delay_start: float | None, timeout: float | None) -> object:
        if key is not None and (domain, key) in self.idempotency:
            # the orchestrator answers a repeated key with the task it already has
            existing = self.idempotency[(domain, key)]
            assert self.tasks_by_id[existing].idempotency_key == key
            return multiple()
        task_id = UUID(int=self.next_id)
        self.next_id += 1
        not_before = None if delay_start is None else self.now + delay_start
        task = Task.submit(task_id=task_id, name="work", args="[]", kwargs="{}", now=self.now,
                           domain=domain, policy=policy, idempotency_key=key,
                           not_before=not_before, timeout=timeout)
        assert task.submitted_at <= self.now
        self.tasks_by_id[task_id] = task
        self.expected[task_id] = Expected(
            state=TaskState.QUEUED, policy=policy or RetryPolicy(),
            submitted_at=task.submitted_at, ready_at=max(task.submitted_at, not_before or 0.0),
        )
        if key is not None:
            self.idempotency[(domain, key)] = task_id
        self.flush()
        return task_id

    def waiting(self) -> list[UUID]:
        """Tasks waiting for an attempt, in submission order."""
        return [task_id for task_id, m in self.expected.items()
                if m.state in (TaskState.QUEUED, TaskState.RETRY_WAIT)]

    def running(self) -> list[UUID]:
        """Tasks with a running attempt, in submission order."""
        return [task_id for task_id, m in self.expected.items() if m.state is TaskState.RUNNING]

    def free_shepherd(self, preferred: str) -> Shepherd | None:
        """The preferred shepherd if it takes work, else any connected one with a free slot."""
        for name in (preferred, *SHEPHERDS):
            shepherd = self.shepherds[name]
            if shepherd.state is ShepherdState.CONNECTED and shepherd.free_slots > 0:
                return shepherd
            with pytest.raises((CapacityExceeded, InvalidTransition)):
                shepherd.reserve("probe", 1)
        return None

    @precondition(lambda self: bool(self.waiting()))
    @rule(pick=st.integers(0, 4), shepherd_name=st.sampled_from(SHEPHERDS),
          acknowledge=st.booleans(), wait_until_due=st.booleans())
    def dispatch(self, pick: int, shepherd_name: str, acknowledge: bool,
                 wait_until_due: bool) -> None:
        """Push a waiting task to a shepherd with a free slot (once due, or too early)."""
        waiting = self.waiting()
        task_id = waiting[pick % len(waiting)]
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        shepherd = self.free_shepherd(shepherd_name)
        if shepherd is None:
            return
        if wait_until_due:
            self.now = max(self.now, model.ready_at)
        if self.now < model.ready_at:
            before = public_state(task)
            with pytest.raises(InvalidTransition, match="not due"):
                task.start_attempt(shepherd.shepherd_uuid, self.now)
            assert public_state(task) == before
            return
        number = task.start_attempt(shepherd.shepherd_uuid, self.now)
        assert number == model.attempts + 1
        model.attempts, model.current, model.state = number, number, TaskState.RUNNING
        attempt = Attempt.assign(task_id=task_id, number=number,
                                 shepherd_id=shepherd.shepherd_uuid,
                                 lease_deadline=self.now + LEASE, domain=task.domain,
                                 partition_day=task.partition_day, now=self.now)
        if acknowledge:
            assert attempt.mark_running(self.now)
            assert not attempt.mark_running(self.now)
        self.attempts[(task_id, number)] = attempt
        shepherd.reserve(str(task_id), number)
        self.placed[(task_id, number)] = shepherd.shepherd_uuid
        self.flush()

    @rule(task_id=tasks)
    def start_refused(self, task_id: UUID) -> None:
        """A second dispatch of a running or finished task is refused."""
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        if model.state in (TaskState.QUEUED, TaskState.RETRY_WAIT):
            return
        before = public_state(task)
        terminal = model.state is not TaskState.RUNNING
        with pytest.raises(TaskAlreadyTerminal if terminal else InvalidTransition):
            task.start_attempt("shep-a", self.now)
        assert public_state(task) == before

    @precondition(lambda self: bool(self.running()))
    @rule(pick=st.integers(0, 4), succeeded=st.booleans(), fatal=st.booleans(),
          error_type=st.sampled_from(ERROR_TYPES), jitter=jitters)
    def report(self, pick: int, succeeded: bool, fatal: bool, error_type: str,
               jitter: float) -> None:
        """The running attempt of a task reports its value or its error."""
        running = self.running()
        task_id = running[pick % len(running)]
        model = self.expected[task_id]
        number = model.current
        assert number is not None
        if succeeded:
            self.tasks_by_id[task_id].succeed(number, '{"ok":1}', self.now)
            model.state, model.current = TaskState.SUCCEEDED, None
            assert self.tasks_by_id[task_id].result == '{"ok":1}'
            self.end_attempt(task_id, number, AttemptState.SUCCEEDED, None)
        else:
            error = ErrorInfo(error_type, "boom", {"n": number}, retriable=not fatal)
            self.apply_failure(task_id, error, jitter, AttemptState.FAILED)
        self.flush()

    @precondition(lambda self: bool(self.running()))
    @rule(pick=st.integers(0, 4), timed_out=st.booleans(), jitter=jitters)
    def lease_expires(self, pick: int, timed_out: bool, jitter: float) -> None:
        """The clock reaches a running attempt's lease deadline without word from it: it timed
        out (a failure, filtered like any error) or, when its shepherd is silent, it is lost."""
        running = self.running()
        task_id = running[pick % len(running)]
        number = self.expected[task_id].current
        assert number is not None
        deadline = self.attempts[(task_id, number)].lease_deadline
        assert deadline is not None
        self.now = max(self.now, deadline)
        if timed_out:
            error = ErrorInfo(TIMEOUT_ERROR, "no result within the lease", {}, True)
            self.apply_failure(task_id, error, jitter, AttemptState.TIMED_OUT)
        else:
            self.lose(task_id, "lease expired")
        self.flush()

    @rule(task_id=tasks, other=st.integers(0, 5),
          kind=st.sampled_from(["succeed", "fail", "timeout", "lose"]), jitter=jitters)
    def report_stale(self, task_id: UUID, other: int, kind: str, jitter: float) -> None:
        """A late or forged report names an attempt that is not running: refused, no change."""
        model = self.expected[task_id]
        reported = other
        if model.current is not None and reported == model.current:
            reported += 1 + other  # any number but the running one
        self.refused_report(task_id, reported, kind, jitter)
        self.flush()

    def lose(self, task_id: UUID, reason: str) -> None:
        """An attempt lost to infrastructure: retried at once while attempts and time remain."""
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        number = model.current
        assert number is not None
        policy = model.policy
        should_retry = (
            (policy.max_attempts is None or model.attempts < policy.max_attempts)
            and (policy.max_total_delay is None
                 or self.now - model.submitted_at <= policy.max_total_delay)
        )
        assert task.lose(number, reason, self.now) is should_retry
        error = ErrorInfo(INFRASTRUCTURE_ERROR, reason, {}, True)
        if should_retry:
            model.state, model.ready_at = TaskState.RETRY_WAIT, self.now
            assert task.last_error == error
        else:
            model.state = TaskState.FAILED
            assert task.error == error
        model.current = None
        self.end_attempt(task_id, number, AttemptState.LOST, error)

    @rule(shepherd_name=st.sampled_from(SHEPHERDS), expire=st.booleans(),
          reconnect=st.booleans())
    def shepherd_lost(self, shepherd_name: str, expire: bool, reconnect: bool) -> None:
        """A shepherd's stream closes (or it goes silent): its attempts are lost."""
        shepherd = self.shepherds[shepherd_name]
        if shepherd.state is not ShepherdState.CONNECTED:
            before = shepherd.state
            shepherd.disconnect("again", self.now)
            shepherd.expire(self.now)
            assert shepherd.state is before  # no-ops
            shepherd.connect(2, "1", self.now)
            self.flush()
            return
        for task_id, number in sorted(k for k, v in self.placed.items() if v == shepherd_name):
            assert self.expected[task_id].current == number
            self.lose(task_id, f"shepherd {shepherd_name} disconnected")
        assert shepherd.running == set()
        if expire:
            shepherd.expire(self.now)
        else:
            shepherd.disconnect("stream closed", self.now)
        assert shepherd.state is not ShepherdState.CONNECTED
        if reconnect:
            shepherd.connect(2, "1", self.now)
            with pytest.raises(InvalidTransition):
                shepherd.connect(2, "1", self.now)
        self.flush()

    @rule(task_id=tasks, mood=st.integers(0, 5))
    def cancel(self, task_id: UUID, mood: int) -> None:
        """A client cancels a task (a live one only now and then, so that most tasks finish)."""
        task, model = self.tasks_by_id[task_id], self.expected[task_id]
        if model.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
            before = public_state(task)
            with pytest.raises(TaskAlreadyTerminal):
                task.cancel("again", self.now)
            assert public_state(task) == before
            return
        if mood != 3:
            return
        running = task.cancel("user asked", self.now)
        assert running == model.current
        if running is not None:
            self.end_attempt(task_id, running, AttemptState.CANCELLED, None)
        model.state, model.current = TaskState.CANCELLED, None
        self.flush()

    @rule(seconds=st.floats(0, 40), to_next_retry=st.booleans())
    def advance_clock(self, seconds: float, to_next_retry: bool) -> None:
        """Time passes: by ``seconds``, or until the next retry is due."""
        waiting = [m.ready_at for m in self.expected.values() if m.state is TaskState.RETRY_WAIT]
        if to_next_retry and waiting:
            self.now = max(self.now, min(waiting))
        else:
            self.now += seconds

    @rule()
    def restart(self) -> None:
        """The orchestrator restarts: every aggregate is rebuilt from the log and replaces the
        live one; shepherds report the attempts they still run."""
        for task_id, task in list(self.tasks_by_id.items()):
            rebuilt = self.log.rebuild(task_id)
            assert isinstance(rebuilt, Task)
            assert public_state(rebuilt) == public_state(task)
            self.tasks_by_id[task_id] = rebuilt
        for key, attempt in list(self.attempts.items()):
            rebuilt_attempt = self.log.rebuild(attempt.id)
            assert isinstance(rebuilt_attempt, Attempt)
            assert public_state(rebuilt_attempt) == public_state(attempt)
            self.attempts[key] = rebuilt_attempt
        for name, shepherd in list(self.shepherds.items()):
            rebuilt_shepherd = self.log.rebuild(shepherd.id)
            assert isinstance(rebuilt_shepherd, Shepherd)
            assert public_state(rebuilt_shepherd) == public_state(shepherd)
            for (task_id, number), where in self.placed.items():
                if where == name:
                    rebuilt_shepherd.reserve(str(task_id), number)
            assert rebuilt_shepherd.running == shepherd.running
            self.shepherds[name] = rebuilt_shepherd

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def at_most_one_terminal_outcome(self) -> None:
        for task_id, model in self.expected.items():
            stream = self.log.stream(task_id)
            terminal = [e for e in stream if e.terminal]
            assert all(e.type in TERMINAL_TYPES for e in terminal)
            assert len([e for e in stream if e.type in TERMINAL_TYPES]) == len(terminal)
            assert len(terminal) <= 1
            assert (len(terminal) == 1) is (model.state in (
                TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED))
            if terminal:
                assert stream[-1] == terminal[0]  # nothing follows the outcome

    @invariant()
    def attempt_numbers_increase_within_the_limit(self) -> None:
        for task_id, model in self.expected.items():
            numbers = [
                decode(e).attempt  # type: ignore[attr-defined]
                for e in self.log.stream(task_id)
                if e.type == "TaskAttemptStarted.v1"
            ]
            assert numbers == list(range(1, len(numbers) + 1))
            assert len(numbers) == model.attempts
            if model.policy.max_attempts is not None:
                assert model.attempts <= model.policy.max_attempts

    @invariant()
    def live_matches_the_model(self) -> None:
        for task_id, model in self.expected.items():
            task = self.tasks_by_id[task_id]
            assert task.state is model.state
            assert task.attempts == model.attempts
            assert task.current_attempt == model.current
            assert task.is_terminal is (model.state in (
                TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED))
            if model.state in (TaskState.QUEUED, TaskState.RETRY_WAIT):
                assert task.ready_at == model.ready_at

    @invariant()
    def one_live_attempt_per_running_task(self) -> None:
        live = {key for key, attempt in self.attempts.items()
                if attempt.state in (AttemptState.ASSIGNED, AttemptState.RUNNING)}
        running = {(task_id, m.current) for task_id, m in self.expected.items()
                   if m.current is not None}
        assert live == running == set(self.placed)
        for name, shepherd in self.shepherds.items():
            assert shepherd.running == {
                (str(task_id), number) for (task_id, number), where in self.placed.items()
                if where == name
            }
            assert len(shepherd.running) <= shepherd.capacity

    @invariant()
    def idempotency_keys_name_one_task(self) -> None:
        for (domain, key), task_id in self.idempotency.items():
            holders = [t for t in self.tasks_by_id.values()
                       if (t.domain, t.idempotency_key) == (domain, key)]
            assert [t.id for t in holders] == [task_id]

    @invariant()
    def rebuilt_equals_live(self) -> None:
        """Folding the log gives the live state (checked when a stream grew; ``restart``
        compares every aggregate whatever its version)."""
        for aggregate in (*self.tasks_by_id.values(), *self.attempts.values(),
                          *self.shepherds.values()):
            assert aggregate.collect_events() == []  # everything was flushed
            if self.verified.get(aggregate.id) != aggregate.version:
                assert public_state(self.log.rebuild(aggregate.id)) == public_state(aggregate)
                self.verified[aggregate.id] = aggregate.version


Lifecycle.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    # a mutant only has to be detected, not explained: shrinking would cost minutes per mutant
    phases=(
        [Phase.explicit, Phase.generate] if "MUTANT_UNDER_TEST" in os.environ else list(Phase)
    ),
)
TestLifecycle = Lifecycle.TestCase
