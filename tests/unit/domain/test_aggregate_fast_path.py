"""The lean event path of AzollaAggregate makes the same events and states as eventsourcing's."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from eventsourcing.domain import Aggregate

from azolla.domain.aggregate import AzollaAggregate, new_event
from azolla.domain.attempt import Attempt
from azolla.domain.retry import RetryPolicy
from azolla.domain.shepherd import Shepherd
from azolla.domain.task import Task
from azolla.domain.values import AttemptState, ErrorInfo

NOW = 1_700_000_000.25


def _generic_fold(events: list[Any]) -> Aggregate:
    """Fold events with eventsourcing's own (generic) mutate methods."""
    aggregate: Any = None
    for event in events:
        if isinstance(event, AzollaAggregate.Created):
            aggregate = Aggregate.Created.mutate(event, None)
        else:
            aggregate = Aggregate.Event.mutate(event, aggregate)
    assert aggregate is not None
    return aggregate


def _state(aggregate: Aggregate) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def _check(aggregate: Aggregate) -> None:
    events = list(aggregate.collect_events())
    assert events
    for event in events:
        fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
        # Every dataclass field is set, and the generic constructor accepts exactly them.
        assert type(event)(**fields) == event
    assert _state(_generic_fold(events)) == _state(aggregate)


def test_task_history_matches_generic_path() -> None:
    policy = RetryPolicy(max_attempts=3)
    task = Task.submit(task_id=uuid.uuid4(), name="t", args="[1]", kwargs="{}", now=NOW,
                       domain="d", group="g", policy=policy, idempotency_key="k", priority=3,
                       not_before=NOW + 1, timeout=2.0)
    assert task.start_attempt("s1", NOW + 1) == 1
    assert task.fail(1, ErrorInfo("E", "boom"), NOW + 2, 0.5) is True
    assert task.start_attempt("s1", NOW + 10) == 2
    assert task.lose(2, "gone", NOW + 11) is True
    assert task.start_attempt("s2", NOW + 12) == 3
    task.succeed(3, '"ok"', NOW + 13)
    _check(task)
    assert task.version == 7


def test_cancelled_task_matches_generic_path() -> None:
    task = Task.submit(task_id=uuid.uuid4(), name="t", args="[]", kwargs="{}", now=NOW)
    task.cancel("stop", NOW + 1)
    _check(task)


def test_attempt_history_matches_generic_path() -> None:
    attempt = Attempt.assign(task_id=uuid.uuid4(), number=2, shepherd_id="s",
                             lease_deadline=NOW + 9,
                             domain="d", partition_day=19_000, now=NOW)
    assert attempt.mark_running(NOW + 1)
    attempt.end(AttemptState.FAILED, NOW + 2, ErrorInfo("E", "x"))
    attempt.reject_outcome("succeeded", "late", NOW + 3)
    _check(attempt)


def test_shepherd_history_matches_generic_path() -> None:
    shepherd = Shepherd.register(shepherd_uuid="sh-1", domain="d", group="g", capacity=4,
                                 software_version="1", now=NOW)
    shepherd.connect(4, "1", NOW + 1)
    shepherd.drain(NOW + 2)
    shepherd.disconnect("bye", NOW + 3)
    _check(shepherd)


def test_new_event_with_missing_field_is_caught_by_the_check() -> None:
    """The test above would notice an event built without one of its fields."""
    event = new_event(Task.Succeeded, {"originator_id": uuid.uuid4(), "originator_version": 2,
                                       "attempt": 1})
    with pytest.raises(AttributeError):
        {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
