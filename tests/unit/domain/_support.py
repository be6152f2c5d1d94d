"""Helpers shared by the domain tests: builders, a log to fold, and state snapshots."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from azolla.domain import Attempt, RetryPolicy, Shepherd, Task
from azolla.domain.events import encode_pending, rebuild
from azolla.domain.ports import NewEvent, StoredEvent

T0 = 1_700_000_000.0
TASK_ID = UUID("00000000-0000-4000-8000-000000000001")
OTHER_TASK_ID = UUID("00000000-0000-4000-8000-000000000002")

#: Attributes that are liveness kept in memory, not facts folded from events.
IN_MEMORY_ONLY = frozenset({"running"})


def make_task(
    *,
    task_id: UUID = TASK_ID,
    now: float = T0,
    policy: RetryPolicy | None = None,
    **kwargs: Any,
) -> Task:
    """Submit a task with plain defaults."""
    return Task.submit(
        task_id=task_id,
        name=kwargs.pop("name", "work"),
        args=kwargs.pop("args", "[]"),
        kwargs=kwargs.pop("kwargs", "{}"),
        now=now,
        policy=policy,
        **kwargs,
    )


def running_task(*, policy: RetryPolicy | None = None, now: float = T0) -> Task:
    """A task whose first attempt runs on shepherd ``s1``."""
    task = make_task(policy=policy, now=now)
    task.start_attempt("s1", now)
    return task


def make_attempt(*, number: int = 1, now: float = T0, lease: float | None = T0 + 30) -> Attempt:
    """Assign attempt ``number`` of :data:`TASK_ID` to shepherd ``s1``."""
    return Attempt.assign(
        task_id=TASK_ID,
        number=number,
        shepherd_id="s1",
        lease_deadline=lease,
        domain="default",
        partition_day=19675,
        now=now,
    )


def make_shepherd(*, capacity: int = 2, now: float = T0, connect: bool = True) -> Shepherd:
    """Register (and by default connect) shepherd ``shep-1``."""
    shepherd = Shepherd.register(
        shepherd_uuid="shep-1", domain="default", group="default", capacity=capacity,
        software_version="1.0", now=now,
    )
    if connect:
        shepherd.connect(capacity, "1.0", now)
    return shepherd


def store(events: Sequence[NewEvent], start: int = 1) -> list[StoredEvent]:
    """Turn new events into stored ones, numbering positions from ``start``."""
    return [
        StoredEvent(
            position=start + i,
            stream_id=e.stream_id,
            version=e.version,
            type=e.type,
            payload=e.payload,
            domain=e.domain,
            partition_day=e.partition_day,
            terminal=e.terminal,
            recorded_at=T0,
        )
        for i, e in enumerate(events)
    ]


class Log:
    """An append-only list of stored events, filled from aggregates' pending events."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self._streams: dict[UUID, list[StoredEvent]] = {}

    def save(self, aggregate: Aggregate) -> list[NewEvent]:
        """Collect and store the aggregate's pending events; return them."""
        new = encode_pending(aggregate)
        stored = store(new, start=len(self.events) + 1)
        self.events.extend(stored)
        for event in stored:
            self._streams.setdefault(event.stream_id, []).append(event)
        return new

    def stream(self, stream_id: UUID) -> list[StoredEvent]:
        """The stored events of one stream, in order."""
        return list(self._streams.get(stream_id, ()))

    def rebuild(self, stream_id: UUID) -> Aggregate | None:
        """Fold one stream."""
        return rebuild(self.stream(stream_id))


def public_state(aggregate: Aggregate | None) -> dict[str, Any]:
    """Every public, event-sourced attribute of an aggregate, plus id/version/times."""
    assert aggregate is not None
    state = {
        name: value
        for name, value in vars(aggregate).items()
        if not name.startswith("_") and name not in IN_MEMORY_ONLY
    }
    state.update(
        id=aggregate.id,
        version=aggregate.version,
        created_on=aggregate.created_on,
        modified_on=aggregate.modified_on,
        type=type(aggregate),
    )
    return state


def rebuilt_equals_live(aggregate: Aggregate, events: Iterable[StoredEvent]) -> bool:
    """True when folding ``events`` yields the same public state as ``aggregate``."""
    return public_state(rebuild(events)) == public_state(aggregate)
