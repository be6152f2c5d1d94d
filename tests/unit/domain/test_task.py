"""Every transition of the Task aggregate, allowed and refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest

from azolla.domain import (
    ErrorInfo,
    InvalidTransition,
    RetryPolicy,
    StaleAttempt,
    Task,
    TaskAlreadyTerminal,
    TaskState,
    WaitKind,
)
from azolla.domain.events import decode, encode_pending, rebuild
from azolla.domain.ports import NewEvent
from azolla.domain.task import INFRASTRUCTURE_ERROR, TIMEOUT_ERROR, can_start, fence

from ._support import T0, TASK_ID, make_task, public_state, running_task, store

ERROR = ErrorInfo("ValueError", "boom", {"line": 3}, retriable=True)
FIXED_2S = RetryPolicy(max_attempts=3, wait=WaitKind.FIXED, initial_delay=2)


def at(now: float) -> datetime:
    """The event time recorded for a command run at ``now``."""
    return datetime.fromtimestamp(now, tz=UTC)


def pending_types(task: Task) -> list[str]:
    """Collect the task's pending events and return their type names."""
    return [type(e).TYPE for e in task.collect_events()]  # type: ignore[attr-defined]


# -- submit ---------------------------------------------------------------------------------------


def test_submit_records_the_spec() -> None:
    policy = RetryPolicy(max_attempts=2)
    task = Task.submit(
        task_id=TASK_ID, name="send", args="[1]", kwargs='{"a":2}', now=T0, domain="billing",
        group="gpu", policy=policy, idempotency_key="k1", priority=-3, not_before=T0 + 5,
        timeout=9.5,
    )
    assert task.id == TASK_ID
    assert task.version == 1
    assert (task.name, task.domain, task.group) == ("send", "billing", "gpu")
    assert (task.args, task.kwargs) == ("[1]", '{"a":2}')
    assert task.policy == policy
    assert task.idempotency_key == "k1"
    assert task.priority == -3
    assert task.not_before == T0 + 5
    assert task.timeout == 9.5
    assert task.submitted_at == T0
    assert task.partition_day == 19675
    assert task.state is TaskState.QUEUED
    assert task.attempts == 0
    assert task.current_attempt is None
    assert task.ready_at == T0 + 5
    assert task.result is None
    assert task.error is None
    assert task.last_error is None
    assert not task.is_terminal
    assert pending_types(task) == ["TaskSubmitted.v1"]


def test_submit_defaults() -> None:
    task = Task.submit(task_id=TASK_ID, name="n", args="[]", kwargs="{}", now=T0)
    assert task.domain == "default"
    assert task.group == "default"
    assert task.policy == RetryPolicy()
    assert task.idempotency_key is None
    assert task.priority == 0
    assert task.not_before is None
    assert task.timeout is None
    assert task.ready_at == T0


def test_not_before_in_the_past_means_ready_now() -> None:
    assert make_task(not_before=T0 - 100).ready_at == T0
    assert make_task(not_before=0.0).ready_at == T0
    early = make_task(now=0.25)
    assert early.submitted_at == early.ready_at == 0.25


@pytest.mark.parametrize("now", [T0 + 0.0000006, 1_000.0000004, 1_234.5678905, T0 + 0.9999996])
def test_a_task_can_start_at_the_instant_it_was_submitted(now: float) -> None:
    task = make_task(now=now)
    assert task.submitted_at <= now
    assert now - task.submitted_at < 1e-6
    assert task.start_attempt("s1", now) == 1


# -- start ----------------------------------------------------------------------------------------


def test_start_attempt() -> None:
    task = make_task()
    task.collect_events()
    assert task.start_attempt("shep-a", T0 + 1) == 1
    assert task.modified_on == at(T0 + 1)
    assert task.state is TaskState.RUNNING
    assert task.attempts == 1
    assert task.current_attempt == 1
    assert task.version == 2
    (event,) = task.collect_events()
    assert isinstance(event, Task.AttemptStarted)
    assert (event.attempt, event.shepherd_id) == (1, "shep-a")


def test_start_refused_while_an_attempt_runs() -> None:
    task = running_task()
    task.collect_events()
    with pytest.raises(InvalidTransition, match=r"^an attempt of this task is already running$"):
        task.start_attempt("s2", T0 + 1)
    assert task.collect_events() == []
    assert task.current_attempt == 1


def test_start_refused_before_due_and_allowed_at_due() -> None:
    task = make_task(not_before=T0 + 10)
    with pytest.raises(InvalidTransition, match=r"^the task is not due until .* \(now .*\)$"):
        task.start_attempt("s1", T0 + 9.999)
    assert task.state is TaskState.QUEUED
    assert task.start_attempt("s1", T0 + 10) == 1


def test_start_refused_when_terminal() -> None:
    task = make_task()
    task.cancel("no", T0)
    with pytest.raises(TaskAlreadyTerminal, match=r"^the task has already cancelled$"):
        task.start_attempt("s1", T0 + 1)


def test_start_refused_when_no_attempt_is_left() -> None:
    """Defence in depth: a log where the last attempt was followed by a retry (older code)."""
    task = running_task(policy=RetryPolicy(max_attempts=1))
    log = store(encode_pending(task))
    payload = {"attempt": 1, "outcome": "failed", "error": ERROR.to_dict(), "retry_at": T0,
               "at": T0}
    log += store([NewEvent(TASK_ID, 3, "TaskRetryScheduled.v1", json.dumps(payload), "default",
                           19675)], start=3)
    folded = rebuild(log)
    assert isinstance(folded, Task)
    assert folded.state is TaskState.RETRY_WAIT
    with pytest.raises(InvalidTransition, match=r"^all 1 attempts have been used$"):
        folded.start_attempt("s1", T0 + 1)


def test_attempt_numbers_increase_by_one() -> None:
    task = make_task(policy=RetryPolicy(max_attempts=4, wait=WaitKind.FIXED, initial_delay=0))
    numbers = []
    for i in range(4):
        numbers.append(task.start_attempt("s", T0 + i))
        task.lose(numbers[-1], "gone", T0 + i)
    assert numbers == [1, 2, 3, 4]
    assert task.state is TaskState.FAILED


# -- succeed --------------------------------------------------------------------------------------


def test_succeed() -> None:
    task = running_task()
    task.collect_events()
    task.succeed(1, '{"v":1}', T0 + 2)
    assert task.modified_on == at(T0 + 2)
    assert task.state is TaskState.SUCCEEDED
    assert task.result == '{"v":1}'
    assert task.current_attempt is None
    assert task.attempts == 1
    assert task.is_terminal
    (event,) = task.collect_events()
    assert isinstance(event, Task.Succeeded)
    assert (event.attempt, event.result) == (1, '{"v":1}')


def test_stale_success_is_refused_and_changes_nothing() -> None:
    task = running_task(policy=FIXED_2S)
    task.fail(1, ERROR, T0, 0.0)
    task.start_attempt("s2", T0 + 2)
    task.collect_events()
    before = public_state(task)
    with pytest.raises(StaleAttempt) as info:
        task.succeed(1, "1", T0 + 3)
    assert (info.value.reported, info.value.current) == (1, 2)
    assert info.value.message == "attempt 1 is not the task's running attempt (current: 2)"
    assert public_state(task) == before
    assert task.collect_events() == []


def test_future_attempt_numbers_are_refused_too() -> None:
    task = running_task()
    with pytest.raises(StaleAttempt) as info:
        task.succeed(2, "1", T0)
    assert (info.value.reported, info.value.current) == (2, 1)


def test_outcome_when_no_attempt_runs_is_refused() -> None:
    task = make_task()
    with pytest.raises(StaleAttempt) as info:
        task.succeed(1, "1", T0)
    assert (info.value.reported, info.value.current) == (1, None)
    assert info.value.message == "attempt 1 is not the task's running attempt (current: none)"
    task = running_task(policy=FIXED_2S)
    task.fail(1, ERROR, T0, 0.0)
    assert task.state is TaskState.RETRY_WAIT
    with pytest.raises(StaleAttempt) as info:
        task.fail(1, ERROR, T0, 0.0)
    assert (info.value.reported, info.value.current) == (1, None)


@pytest.mark.parametrize("end", ["succeed", "fail", "cancel", "lose"])
def test_nothing_changes_a_terminal_task(end: str) -> None:
    task = running_task(policy=RetryPolicy(max_attempts=1))
    if end == "succeed":
        task.succeed(1, "1", T0)
    elif end == "fail":
        task.fail(1, ERROR, T0, 0.0)
    elif end == "lose":
        task.lose(1, "gone", T0)
    else:
        task.cancel("stop", T0)
    assert task.is_terminal
    task.collect_events()
    before = public_state(task)
    with pytest.raises(TaskAlreadyTerminal, match=r"^the task has already .*; attempt 1 cannot"):
        task.succeed(1, "2", T0 + 1)
    with pytest.raises(TaskAlreadyTerminal):
        task.fail(1, ERROR, T0 + 1, 0.0)
    with pytest.raises(TaskAlreadyTerminal):
        task.lose(1, "gone", T0 + 1)
    with pytest.raises(TaskAlreadyTerminal, match=r"^the task has already"):
        task.cancel("again", T0 + 1)
    with pytest.raises(TaskAlreadyTerminal):
        task.start_attempt("s", T0 + 1)
    assert public_state(task) == before
    assert task.collect_events() == []


# -- fail -----------------------------------------------------------------------------------------


def test_failure_with_attempts_left_schedules_a_retry() -> None:
    task = running_task(policy=FIXED_2S)
    task.collect_events()
    assert task.fail(1, ERROR, T0 + 5, 0.3) is True
    assert task.modified_on == at(T0 + 5)
    assert task.state is TaskState.RETRY_WAIT
    assert task.current_attempt is None
    assert task.attempts == 1
    assert task.ready_at == T0 + 7
    assert task.last_error == ERROR
    assert task.error is None
    assert not task.is_terminal
    (event,) = task.collect_events()
    assert isinstance(event, Task.RetryScheduled)
    assert (event.attempt, event.outcome, event.error, event.retry_at) == (
        1, "failed", ERROR.to_dict(), T0 + 7,
    )
    with pytest.raises(InvalidTransition, match=r"not due"):
        task.start_attempt("s", T0 + 6.9)
    assert task.start_attempt("s", T0 + 7) == 2


def test_jitter_is_used_for_the_retry_time() -> None:
    task = running_task(policy=RetryPolicy(initial_delay=4))
    task.fail(1, ERROR, T0 + 1, 0.25)
    assert task.ready_at == T0 + 2


def test_failure_of_the_last_attempt_fails_the_task() -> None:
    task = running_task(policy=RetryPolicy(max_attempts=1))
    task.collect_events()
    assert task.fail(1, ERROR, T0 + 1, 0.5) is False
    assert task.modified_on == at(T0 + 1)
    assert task.state is TaskState.FAILED
    assert task.error == ERROR
    assert task.current_attempt is None
    assert task.is_terminal
    (event,) = task.collect_events()
    assert isinstance(event, Task.Failed)
    assert (event.attempt, event.outcome, event.error, event.reason) == (
        1, "failed", ERROR.to_dict(), "all 1 attempts used",
    )


def test_non_retriable_error_fails_at_once() -> None:
    task = running_task(policy=RetryPolicy(max_attempts=10))
    error = ErrorInfo("Fatal", "no", retriable=False)
    assert task.fail(1, error, T0, 0.0) is False
    assert task.state is TaskState.FAILED
    (_, _, event) = task.collect_events()
    assert isinstance(event, Task.Failed)
    assert event.reason == "the error is not retriable"


def test_excluded_error_type_fails_at_once() -> None:
    task = running_task(policy=RetryPolicy(exclude_errors=("ValueError",)))
    assert task.fail(1, ERROR, T0, 0.0) is False
    assert task.error == ERROR


def test_retry_past_max_total_delay_fails() -> None:
    policy = RetryPolicy(max_attempts=None, max_total_delay=10, wait=WaitKind.FIXED,
                         initial_delay=3)
    task = running_task(policy=policy)
    assert task.fail(1, ERROR, T0 + 7, 0.0) is True  # retry at T0 + 10: allowed
    task.start_attempt("s", T0 + 10)
    assert task.fail(2, ERROR, T0 + 10, 0.0) is False
    assert task.state is TaskState.FAILED


def test_timeout_is_recorded_as_such() -> None:
    timeout = ErrorInfo(TIMEOUT_ERROR, "ran past 30 s")
    task = running_task(policy=RetryPolicy(max_attempts=2, wait=WaitKind.FIXED, initial_delay=0))
    task.collect_events()
    assert task.fail(1, timeout, T0, 0.0, outcome="timed_out") is True
    task.start_attempt("s", T0)
    assert task.fail(2, timeout, T0, 0.0, outcome="timed_out") is False
    retry, _, failed = task.collect_events()
    assert isinstance(retry, Task.RetryScheduled)
    assert isinstance(failed, Task.Failed)
    assert retry.outcome == failed.outcome == "timed_out"
    assert task.error == timeout
    assert TIMEOUT_ERROR == "TaskTimeout"


def test_timeout_can_be_filtered_out_of_retries() -> None:
    task = running_task(policy=RetryPolicy(exclude_errors=(TIMEOUT_ERROR,)))
    assert task.fail(1, ErrorInfo(TIMEOUT_ERROR), T0, 0.0, outcome="timed_out") is False


# -- lose -----------------------------------------------------------------------------------------


def test_lost_attempt_retries_at_once_whatever_the_filters() -> None:
    policy = RetryPolicy(max_attempts=2, initial_delay=100, include_errors=("Nothing",),
                         exclude_errors=(INFRASTRUCTURE_ERROR,))
    task = running_task(policy=policy)
    task.collect_events()
    assert task.lose(1, "shepherd s1 disconnected", T0 + 4) is True
    assert task.modified_on == at(T0 + 4)
    assert task.state is TaskState.RETRY_WAIT
    assert task.ready_at == T0 + 4
    assert task.current_attempt is None
    infra = ErrorInfo(INFRASTRUCTURE_ERROR, "shepherd s1 disconnected", {}, True)
    assert task.last_error == infra
    (event,) = task.collect_events()
    assert isinstance(event, Task.RetryScheduled)
    assert (event.attempt, event.outcome, event.error, event.retry_at) == (
        1, "lost", infra.to_dict(), T0 + 4,
    )
    assert task.start_attempt("s2", T0 + 4) == 2


def test_lost_last_attempt_fails_the_task() -> None:
    task = running_task(policy=RetryPolicy(max_attempts=1))
    task.collect_events()
    assert task.lose(1, "lease expired", T0 + 1) is False
    assert task.modified_on == at(T0 + 1)
    assert task.state is TaskState.FAILED
    assert task.error == ErrorInfo(INFRASTRUCTURE_ERROR, "lease expired", {}, True)
    assert task.error.retriable
    (event,) = task.collect_events()
    assert isinstance(event, Task.Failed)
    assert (event.outcome, event.reason, event.attempt) == ("lost", "all 1 attempts used", 1)


def test_lost_attempts_stop_at_max_total_delay() -> None:
    policy = RetryPolicy(max_attempts=None, max_total_delay=60)
    task = running_task(policy=policy)
    assert task.lose(1, "gone", T0 + 60) is True
    task.start_attempt("s", T0 + 60)
    assert task.lose(2, "gone", T0 + 60.5) is False
    assert task.state is TaskState.FAILED
    (*_, event) = task.collect_events()
    assert isinstance(event, Task.Failed)
    assert event.reason == "retrying would pass max_total_delay (60.0 s)"


def test_stale_loss_is_refused() -> None:
    task = running_task(policy=FIXED_2S)
    task.lose(1, "gone", T0)
    task.start_attempt("s", T0)
    with pytest.raises(StaleAttempt):
        task.lose(1, "gone again", T0)
    assert task.state is TaskState.RUNNING
    assert task.current_attempt == 2


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_queued() -> None:
    task = make_task()
    task.collect_events()
    assert task.cancel("user asked", T0 + 1) is None
    assert task.state is TaskState.CANCELLED
    assert task.is_terminal
    assert task.modified_on == at(T0 + 1)
    (event,) = task.collect_events()
    assert isinstance(event, Task.Cancelled)
    assert (event.attempt, event.reason) == (None, "user asked")


def test_cancel_running_returns_the_attempt_to_stop() -> None:
    task = running_task()
    task.collect_events()
    assert task.cancel("user asked", T0 + 1) == 1
    assert task.state is TaskState.CANCELLED
    assert task.current_attempt is None
    assert task.modified_on == at(T0 + 1)
    (event,) = task.collect_events()
    assert isinstance(event, Task.Cancelled)
    assert (event.attempt, event.reason) == (1, "user asked")
    with pytest.raises(TaskAlreadyTerminal):
        task.succeed(1, "late", T0 + 2)


def test_cancel_waiting_for_retry() -> None:
    task = running_task(policy=FIXED_2S)
    task.fail(1, ERROR, T0, 0.0)
    assert task.cancel("enough", T0 + 1) is None
    assert task.state is TaskState.CANCELLED
    assert task.last_error == ERROR


# -- the decision functions -----------------------------------------------------------------------


@pytest.mark.parametrize("state", [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
def test_fence_refuses_terminal_states_first(state: TaskState) -> None:
    with pytest.raises(TaskAlreadyTerminal) as info:
        fence(state, None, 3)
    assert info.value.message == (
        f"the task has already {state.value}; attempt 3 cannot change it"
    )


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.RETRY_WAIT])
def test_fence_refuses_when_nothing_runs(state: TaskState) -> None:
    with pytest.raises(StaleAttempt) as info:
        fence(state, 2, 2)  # even a matching number: no attempt is running
    assert info.value.current is None
    assert info.value.reported == 2


def test_fence_accepts_only_the_running_attempt() -> None:
    fence(TaskState.RUNNING, 4, 4)
    for reported in (3, 5, 0, -4):
        with pytest.raises(StaleAttempt) as info:
            fence(TaskState.RUNNING, 4, reported)
        assert (info.value.reported, info.value.current) == (reported, 4)
    assert issubclass(StaleAttempt, InvalidTransition)
    assert StaleAttempt.code == "stale_attempt"


def test_can_start() -> None:
    can_start(TaskState.QUEUED, 10.0, 10.0)
    can_start(TaskState.RETRY_WAIT, 10.0, 11.0)
    with pytest.raises(
        InvalidTransition, match=r"^the task is not due until 10\.000 \(now 9\.500\)$"
    ):
        can_start(TaskState.QUEUED, 10.0, 9.5)
    with pytest.raises(InvalidTransition, match=r"already running"):
        can_start(TaskState.RUNNING, 0.0, 10.0)
    with pytest.raises(TaskAlreadyTerminal, match=r"^the task has already succeeded$"):
        can_start(TaskState.SUCCEEDED, 0.0, 10.0)


def test_submitted_event_round_trips_its_policy() -> None:
    policy = RetryPolicy(max_attempts=7, include_errors=("A",))
    task = make_task(policy=policy)
    (new,) = store(encode_pending(task))
    event = decode(new)
    assert isinstance(event, Task.Submitted)
    assert RetryPolicy.parse(event.retry_policy) == policy
    other = rebuild([new])
    assert isinstance(other, Task)
    assert other.policy == policy
    assert other.id == UUID(int=TASK_ID.int)
