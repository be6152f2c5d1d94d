"""The persisted form of events: golden payloads, round trips, and rebuild == live.

The GOLDEN table is the contract of the event log. If a test here fails because a payload
changed shape, do not update the literal: add a new event ``TYPE`` version instead, and keep
the old one decodable (see :mod:`azolla.domain.events`).
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import Aggregate, OriginatorVersionError

from azolla.domain import (
    Attempt,
    AttemptState,
    ErrorInfo,
    RetryPolicy,
    Shepherd,
    Task,
    WaitKind,
    events,
)
from azolla.domain.events import (
    EVENT_CLASSES,
    TERMINAL_TYPES,
    decode,
    encode,
    encode_pending,
    payload_of,
    rebuild,
)
from azolla.domain.ports import NewEvent
from azolla.domain.values import attempt_stream_id, shepherd_stream_id

from ._support import T0, public_state, store

A = UUID("00000000-0000-4000-8000-00000000000a")
B = UUID("00000000-0000-4000-8000-00000000000b")
C = UUID("00000000-0000-4000-8000-00000000000c")
ATTEMPT = attempt_stream_id(A, 1)
SHEPHERD = shepherd_stream_id("shep-1")
ERROR = ErrorInfo("ValueError", "boom", {"line": 3}, retriable=True)
ERROR_JSON = {"type": "ValueError", "message": "boom", "data": {"line": 3}, "retriable": True}
DEFAULT_POLICY_JSON: dict[str, Any] = {
    "max_attempts": 5, "max_total_delay": None, "wait": "exponential_jitter",
    "initial_delay": 1.0, "multiplier": 2.0, "max_delay": 300.0, "include_errors": [],
    "exclude_errors": [],
}

# (type, stream, version, domain, partition_day, terminal, payload) in log order.
GOLDEN: list[tuple[str, UUID, int, str, int, bool, dict[str, Any]]] = [
    ("TaskSubmitted.v1", A, 1, "billing", 19675, False, {
        "name": "send_email", "domain": "billing", "group": "gpu", "args": '[1,"a"]',
        "kwargs": '{"k":true}',
        "retry_policy": {
            "max_attempts": 3, "max_total_delay": None, "wait": "fixed", "initial_delay": 1.5,
            "multiplier": 2.0, "max_delay": 300.0, "include_errors": ["ValueError"],
            "exclude_errors": ["KeyError"],
        },
        "idempotency_key": "key-1", "priority": 7, "not_before": 1700000000.5, "timeout": 30.0,
        "at": 1700000000.25,
    }),
    ("TaskAttemptStarted.v1", A, 2, "billing", 19675, False,
     {"attempt": 1, "shepherd_id": "shep-1", "at": 1700000001.0}),
    ("TaskRetryScheduled.v1", A, 3, "billing", 19675, False,
     {"attempt": 1, "outcome": "failed", "error": ERROR_JSON, "retry_at": 1700000003.5,
      "at": 1700000002.0}),
    ("TaskAttemptStarted.v1", A, 4, "billing", 19675, False,
     {"attempt": 2, "shepherd_id": "shep-2", "at": 1700000004.0}),
    ("TaskSucceeded.v1", A, 5, "billing", 19675, True,
     {"attempt": 2, "result": '{"v":1}', "at": 1700000005.0}),
    ("TaskSubmitted.v1", B, 1, "default", 19675, False, {
        "name": "n", "domain": "default", "group": "default", "args": "[]", "kwargs": "{}",
        "retry_policy": DEFAULT_POLICY_JSON, "idempotency_key": None, "priority": 0,
        "not_before": None, "timeout": None, "at": 1700000000.0,
    }),
    ("TaskAttemptStarted.v1", B, 2, "default", 19675, False,
     {"attempt": 1, "shepherd_id": "shep-1", "at": 1700000000.0}),
    ("TaskFailed.v1", B, 3, "default", 19675, True, {
        "attempt": 1, "outcome": "failed",
        "error": {"type": "Fatal", "message": "no", "data": {}, "retriable": False},
        "reason": "the error is not retriable", "at": 1700000001.0,
    }),
    ("TaskSubmitted.v1", C, 1, "default", 19675, False, {
        "name": "n", "domain": "default", "group": "default", "args": "[]", "kwargs": "{}",
        "retry_policy": {**DEFAULT_POLICY_JSON, "max_attempts": None, "max_total_delay": 60.0},
        "idempotency_key": None, "priority": 0, "not_before": None, "timeout": None,
        "at": 1700000000.0,
    }),
    ("TaskCancelled.v1", C, 2, "default", 19675, True,
     {"attempt": None, "reason": "user asked", "at": 1700000001.0}),
    ("AttemptAssigned.v1", ATTEMPT, 1, "billing", 19675, False, {
        "task_id": str(A), "number": 1, "shepherd_id": "shep-1", "lease_deadline": 1700000031.0,
        "domain": "billing", "partition_day": 19675, "at": 1700000001.0,
    }),
    ("AttemptRunning.v1", ATTEMPT, 2, "billing", 19675, False, {"at": 1700000001.5}),
    ("AttemptEnded.v1", ATTEMPT, 3, "billing", 19675, False,
     {"outcome": "failed", "error": ERROR_JSON, "at": 1700000002.0}),
    ("AttemptOutcomeRejected.v1", ATTEMPT, 4, "billing", 19675, False,
     {"reported": "succeeded", "reason": "attempt 1 already failed", "at": 1700000003.0}),
    ("ShepherdRegistered.v1", SHEPHERD, 1, "billing", 19675, False, {
        "shepherd_uuid": "shep-1", "domain": "billing", "group": "gpu", "capacity": 4,
        "software_version": "1.0", "at": 1700000000.0,
    }),
    ("ShepherdConnected.v1", SHEPHERD, 2, "billing", 19675, False,
     {"capacity": 8, "software_version": "1.1", "at": 1700000001.0}),
    ("ShepherdDrained.v1", SHEPHERD, 3, "billing", 19675, False, {"at": 1700000002.0}),
    ("ShepherdDisconnected.v1", SHEPHERD, 4, "billing", 19675, False,
     {"reason": "stream closed", "at": 1700000003.0}),
    ("ShepherdConnected.v1", SHEPHERD, 5, "billing", 19675, False,
     {"capacity": 8, "software_version": "1.1", "at": 1700000004.0}),
    ("ShepherdExpired.v1", SHEPHERD, 6, "billing", 19675, False, {"at": 1700000005.0}),
]


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 and ignores key order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def build_aggregates() -> list[Aggregate]:
    """Run the scenario whose events the GOLDEN table pins (events left pending)."""
    a = Task.submit(
        task_id=A, name="send_email", args='[1,"a"]', kwargs='{"k":true}', now=T0 + 0.25,
        domain="billing", group="gpu",
        policy=RetryPolicy(max_attempts=3, wait=WaitKind.FIXED, initial_delay=1.5,
                           include_errors=("ValueError",), exclude_errors=("KeyError",)),
        idempotency_key="key-1", priority=7, not_before=T0 + 0.5, timeout=30.0,
    )
    a.start_attempt("shep-1", T0 + 1)
    a.fail(1, ERROR, T0 + 2, 0.5)
    a.start_attempt("shep-2", T0 + 4)
    a.succeed(2, '{"v":1}', T0 + 5)
    b = Task.submit(task_id=B, name="n", args="[]", kwargs="{}", now=T0)
    b.start_attempt("shep-1", T0)
    b.fail(1, ErrorInfo("Fatal", "no", {}, retriable=False), T0 + 1, 0.0)
    c = Task.submit(task_id=C, name="n", args="[]", kwargs="{}", now=T0,
                    policy=RetryPolicy(max_attempts=None, max_total_delay=60))
    c.cancel("user asked", T0 + 1)
    attempt = Attempt.assign(task_id=A, number=1, shepherd_id="shep-1", lease_deadline=T0 + 31,
                             domain="billing", partition_day=19675, now=T0 + 1)
    attempt.mark_running(T0 + 1.5)
    attempt.end(AttemptState.FAILED, T0 + 2, ERROR)
    attempt.reject_outcome("succeeded", "attempt 1 already failed", T0 + 3)
    shepherd = Shepherd.register(shepherd_uuid="shep-1", domain="billing", group="gpu",
                                 capacity=4, software_version="1.0", now=T0)
    shepherd.connect(8, "1.1", T0 + 1)
    shepherd.drain(T0 + 2)
    shepherd.disconnect("stream closed", T0 + 3)
    shepherd.connect(8, "1.1", T0 + 4)
    shepherd.expire(T0 + 5)
    return [a, b, c, attempt, shepherd]


def live_events() -> list[tuple[Any, NewEvent]]:
    """Each live domain event of the scenario with its encoded form."""
    pairs = []
    for aggregate in build_aggregates():
        located: Any = aggregate
        for event in aggregate.collect_events():
            pairs.append(
                (event, encode(event, domain=located.domain, partition_day=located.partition_day))
            )
    return pairs


def test_every_event_type_has_a_golden_payload() -> None:
    assert {row[0] for row in GOLDEN} == set(EVENT_CLASSES)
    assert len(EVENT_CLASSES) == 15


def test_terminal_types() -> None:
    assert {"TaskSucceeded.v1", "TaskFailed.v1", "TaskCancelled.v1"} == TERMINAL_TYPES
    assert EVENT_CLASSES["TaskSubmitted.v1"] == (Task.Submitted, Task)
    assert EVENT_CLASSES["AttemptEnded.v1"] == (Attempt.Ended, Attempt)
    assert EVENT_CLASSES["ShepherdExpired.v1"] == (Shepherd.Expired, Shepherd)


@pytest.mark.parametrize("index", range(len(GOLDEN)), ids=[f"{r[0]}@{r[2]}" for r in GOLDEN])
def test_encode_produces_the_golden_payload(index: int) -> None:
    type_name, stream, version, domain, day, terminal, payload = GOLDEN[index]
    _, new = live_events()[index]
    assert (new.type, new.stream_id, new.version, new.domain, new.partition_day, new.terminal) == (
        type_name, stream, version, domain, day, terminal,
    )
    assert canonical(json.loads(new.payload)) == canonical(payload)
    assert "NaN" not in new.payload
    assert " " not in new.payload.replace("user asked", "").replace("stream closed", "").replace(
        "attempt 1 already failed", "").replace("the error is not retriable", "")


@pytest.mark.parametrize("index", range(len(GOLDEN)), ids=[f"{r[0]}@{r[2]}" for r in GOLDEN])
def test_decode_reads_the_golden_payload_back(index: int) -> None:
    type_name, stream, version, domain, day, terminal, payload = GOLDEN[index]
    live, _ = live_events()[index]
    (stored,) = store([NewEvent(stream, version, type_name, json.dumps(payload), domain, day,
                                terminal)])
    decoded = decode(stored)
    assert type(decoded) is type(live)
    assert decoded == live
    assert decoded.timestamp == live.timestamp
    assert payload_of(decoded) == payload


def test_decode_ignores_key_order() -> None:
    row = GOLDEN[2]
    reordered = json.dumps(dict(reversed(list(row[6].items()))))
    (stored,) = store([NewEvent(row[1], row[2], row[0], reordered, row[3], row[4], row[5])])
    assert decode(stored) == live_events()[2][0]


def test_unknown_type_and_missing_fields_are_errors() -> None:
    (unknown,) = store([NewEvent(A, 1, "TaskExploded.v1", '{"at": 1.0}', "default", 0)])
    with pytest.raises(KeyError):
        decode(unknown)
    (missing,) = store([NewEvent(A, 2, "TaskAttemptStarted.v1", '{"attempt": 1, "at": 1.0}',
                                 "default", 0)])
    with pytest.raises(KeyError):
        decode(missing)


def test_payloads_are_strict_json() -> None:
    """No NaN/Infinity tokens ever reach the log (PostgreSQL's jsonb refuses them)."""
    task = Task.submit(task_id=A, name="n", args="[]", kwargs="{}", now=T0,
                       timeout=float("inf"))
    try:
        (new,) = encode_pending(task)
    except ValueError:
        return
    json.loads(new.payload, parse_constant=_refuse)


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in a payload")


def test_encode_pending_clears_the_pending_list() -> None:
    for aggregate in build_aggregates():
        first = encode_pending(aggregate)
        assert first
        assert [e.version for e in first] == list(range(1, len(first) + 1))
        assert encode_pending(aggregate) == []


def test_encode_pending_locates_events_like_the_golden_table() -> None:
    encoded = [new for aggregate in build_aggregates() for new in encode_pending(aggregate)]
    assert [(e.type, e.stream_id, e.version, e.domain, e.partition_day, e.terminal)
            for e in encoded] == [row[:6] for row in GOLDEN]
    assert [canonical(json.loads(e.payload)) for e in encoded] == [
        canonical(row[6]) for row in GOLDEN
    ]


def test_event_registry_is_built_from_the_aggregates(monkeypatch: pytest.MonkeyPatch) -> None:
    assert events._event_classes() == EVENT_CLASSES
    monkeypatch.setattr(events, "_AGGREGATES", (Task, Shepherd, Task))
    with pytest.raises(RuntimeError, match=r"^duplicate event type TaskSubmitted\.v1$"):
        events._event_classes()


@pytest.mark.parametrize("index", range(5))
def test_rebuild_equals_live(index: int) -> None:
    live = build_aggregates()[index]
    stored = store(encode_pending(live))
    rebuilt = rebuild(stored)
    assert type(rebuilt) is type(live)
    assert public_state(rebuilt) == public_state(live)
    assert rebuilt is not None
    assert rebuilt.collect_events() == []


def test_rebuild_of_nothing_is_none() -> None:
    assert rebuild([]) is None


def test_rebuild_in_steps_matches_every_intermediate_state() -> None:
    task = Task.submit(task_id=A, name="n", args="[]", kwargs="{}", now=T0,
                       policy=RetryPolicy(wait=WaitKind.FIXED, initial_delay=1))
    log = store(encode_pending(task))
    assert public_state(rebuild(log)) == public_state(task)
    task.start_attempt("s", T0)
    log += store(encode_pending(task), start=len(log) + 1)
    assert public_state(rebuild(log)) == public_state(task)
    task.lose(1, "gone", T0 + 1)
    log += store(encode_pending(task), start=len(log) + 1)
    assert public_state(rebuild(log)) == public_state(task)
    task.start_attempt("s", T0 + 1)
    task.fail(2, ERROR, T0 + 2, 0.0)
    log += store(encode_pending(task), start=len(log) + 1)
    rebuilt = rebuild(log)
    assert public_state(rebuilt) == public_state(task)
    assert isinstance(rebuilt, Task)
    assert rebuilt.last_error == ERROR
    assert rebuilt.ready_at == T0 + 3


def test_rebuild_refuses_a_gap_in_versions() -> None:
    task = Task.submit(task_id=A, name="n", args="[]", kwargs="{}", now=T0)
    task.start_attempt("s", T0)
    task.succeed(1, "1", T0)
    first, _, third = store(encode_pending(task))
    with pytest.raises(OriginatorVersionError):
        rebuild([first, third])


def test_payloads_orjson_cannot_write_fall_back_to_pydantic_core() -> None:
    """orjson (the fast path) refuses integers beyond 64 bits; such a payload is still written."""
    task = Task.submit(task_id=A, name="n", args="[]", kwargs="{}", now=T0, priority=2**70)
    (new,) = encode_pending(task)
    assert json.loads(new.payload)["priority"] == 2**70
