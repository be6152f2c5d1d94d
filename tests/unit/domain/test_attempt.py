"""Every transition of the Attempt aggregate, allowed and refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from azolla.domain import Attempt, AttemptNotRunning, AttemptState, ErrorInfo, InvalidTransition
from azolla.domain.attempt import ensure_live
from azolla.domain.values import attempt_stream_id

from ._support import T0, TASK_ID, make_attempt

OUTCOMES = [
    AttemptState.SUCCEEDED,
    AttemptState.FAILED,
    AttemptState.LOST,
    AttemptState.TIMED_OUT,
    AttemptState.CANCELLED,
]


def test_assign() -> None:
    attempt = Attempt.assign(
        task_id=TASK_ID, number=3, shepherd_id="shep", lease_deadline=T0 + 30, domain="d",
        partition_day=12, now=T0,
    )
    assert attempt.id == attempt_stream_id(TASK_ID, 3)
    assert attempt.version == 1
    assert attempt.task_id == str(TASK_ID)
    assert attempt.number == 3
    assert attempt.shepherd_id == "shep"
    assert attempt.lease_deadline == T0 + 30
    assert attempt.domain == "d"
    assert attempt.partition_day == 12
    assert attempt.state is AttemptState.ASSIGNED
    assert attempt.started_at == T0
    assert attempt.ended_at is None
    assert attempt.error is None
    assert attempt.rejections == 0
    (event,) = attempt.collect_events()
    assert isinstance(event, Attempt.Assigned)


def test_assign_without_lease() -> None:
    assert make_attempt(lease=None).lease_deadline is None


@pytest.mark.parametrize("number", [0, -1])
def test_attempt_numbers_start_at_one(number: int) -> None:
    with pytest.raises(InvalidTransition, match=rf"^attempt numbers start at 1, got {number}$"):
        make_attempt(number=number)
    assert make_attempt(number=1).number == 1


def test_mark_running_once() -> None:
    attempt = make_attempt()
    attempt.collect_events()
    assert attempt.mark_running(T0 + 1) is True
    assert attempt.modified_on == datetime.fromtimestamp(T0 + 1, tz=UTC)
    assert attempt.state is AttemptState.RUNNING
    assert attempt.mark_running(T0 + 2) is False
    (event,) = attempt.collect_events()
    assert isinstance(event, Attempt.Running)
    assert attempt.version == 2


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("acknowledged", [False, True])
def test_end_from_assigned_or_running(outcome: AttemptState, acknowledged: bool) -> None:
    attempt = make_attempt()
    if acknowledged:
        attempt.mark_running(T0)
    attempt.collect_events()
    error = ErrorInfo("E", "m") if outcome is not AttemptState.SUCCEEDED else None
    attempt.end(outcome, T0 + 5, error)
    assert attempt.state is outcome
    assert attempt.ended_at == T0 + 5
    assert attempt.error == error
    (event,) = attempt.collect_events()
    assert isinstance(event, Attempt.Ended)
    assert event.outcome == outcome.value
    assert event.error == (error.to_dict() if error else None)


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_an_ended_attempt_cannot_end_again_or_run(outcome: AttemptState) -> None:
    attempt = make_attempt(number=2)
    attempt.end(outcome, T0 + 1)
    attempt.collect_events()
    for again in OUTCOMES:
        with pytest.raises(
            AttemptNotRunning, match=rf"^attempt 2 has already ended \({outcome}\)$"
        ):
            attempt.end(again, T0 + 2, ErrorInfo("X"))
    with pytest.raises(AttemptNotRunning, match=r"^attempt 2 has already ended"):
        attempt.mark_running(T0 + 2)
    assert attempt.state is outcome
    assert attempt.ended_at == T0 + 1
    assert attempt.collect_events() == []


@pytest.mark.parametrize("outcome", [AttemptState.ASSIGNED, AttemptState.RUNNING])
def test_live_states_are_not_outcomes(outcome: AttemptState) -> None:
    attempt = make_attempt()
    attempt.collect_events()
    with pytest.raises(InvalidTransition, match=rf"^{outcome.value} is not an outcome$"):
        attempt.end(outcome, T0)
    assert attempt.state is AttemptState.ASSIGNED
    assert attempt.collect_events() == []


def test_reject_outcome_is_recorded_and_counted() -> None:
    attempt = make_attempt()
    attempt.end(AttemptState.LOST, T0 + 1, ErrorInfo("InfrastructureError"))
    attempt.collect_events()
    attempt.reject_outcome("succeeded", "attempt 1 already lost", T0 + 2)
    attempt.reject_outcome("failed", "again", T0 + 3)
    assert attempt.rejections == 2
    assert attempt.state is AttemptState.LOST
    first, second = attempt.collect_events()
    assert isinstance(first, Attempt.OutcomeRejected)
    assert (first.reported, first.reason) == ("succeeded", "attempt 1 already lost")
    assert isinstance(second, Attempt.OutcomeRejected)


def test_ensure_live() -> None:
    ensure_live(AttemptState.ASSIGNED, 1)
    ensure_live(AttemptState.RUNNING, 1)
    for state in OUTCOMES:
        with pytest.raises(AttemptNotRunning) as info:
            ensure_live(state, 7)
        assert info.value.message == f"attempt 7 has already ended ({state.value})"
    assert issubclass(AttemptNotRunning, InvalidTransition)
