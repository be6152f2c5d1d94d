"""The TaskSet: Azolla's in-memory scheduling state, folded from committed events only.

It answers "what is ready to run for this (domain, group)?", "when is the next retry or
not-before time due?", "which leases expire when?" and "how did task X end?" without a
database round trip. Because it changes only through :meth:`TaskSet.apply` (plus the
transient claims of the dispatcher, see :meth:`TaskSet.claim`), it can always be rebuilt by
folding the log, and a rebuilt TaskSet equals the live one (:meth:`TaskSet.snapshot`).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from pydantic_core import from_json

from azolla.domain.ports import StoredEvent
from azolla.domain.values import (
    TERMINAL_TASK_STATES,
    AttemptState,
    TaskState,
    attempt_stream_id,
    parse_uuid,
)

__all__ = ["AttemptRecord", "TaskRecord", "TaskSet"]

GroupKey = tuple[str, str]


@dataclass(slots=True)
class AttemptRecord:
    """One attempt as the TaskSet knows it (for status and history)."""

    number: int
    shepherd_id: str
    started_at: float
    state: AttemptState = AttemptState.ASSIGNED
    ended_at: float | None = None
    error: dict[str, Any] | None = None
    lease_deadline: float | None = None
    #: The attempt's stream id, once its assignment is applied (saves re-deriving it).
    stream_id: UUID | None = None


@dataclass(slots=True)
class TaskRecord:
    """One task as the TaskSet knows it."""

    task_id: UUID
    name: str
    domain: str
    group: str
    priority: int
    seq: int
    submitted_at: float
    ready_at: float
    args: str
    kwargs: str
    timeout: float | None
    max_attempts: int | None
    idempotency_key: str | None
    state: TaskState = TaskState.QUEUED
    attempts: list[AttemptRecord] = field(default_factory=list)
    current_attempt: int | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    ended_at: float | None = None
    stream_version: int = 1

    @property
    def terminal(self) -> bool:
        """True once the task has its outcome."""
        return self.state in TERMINAL_TASK_STATES


class TaskSet:
    """In-memory projection of the event log used for scheduling and queries.

    Args:
        outcome_cache: How many finished tasks to keep in memory; older ones are forgotten
            here and read back from the log when asked for.
    """

    def __init__(self, outcome_cache: int = 100_000) -> None:
        self._position = 0
        self._outcome_cache = outcome_cache
        self.tasks: dict[UUID, TaskRecord] = {}
        self._finished: OrderedDict[UUID, None] = OrderedDict()
        # (domain, group) -> task name -> heap of (-priority, seq, task_id)
        self._ready: dict[GroupKey, dict[str, list[tuple[int, int, UUID]]]] = {}
        self._ready_count: dict[GroupKey, int] = {}
        self._timers: list[tuple[float, int, UUID]] = []
        self._leases: list[tuple[float, UUID, int]] = []
        self._claimed: set[UUID] = set()
        # Tasks with a live entry in a ready queue (entries of tasks that left it are stale).
        self._in_ready: set[UUID] = set()
        self.idempotency: dict[tuple[str, str], UUID] = {}
        self.attempt_task: dict[UUID, tuple[UUID, int]] = {}
        self.shepherds: dict[str, dict[str, Any]] = {}
        self.now = 0.0

    # -- folding ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Position of the last applied event."""
        return self._position

    def apply(self, event: StoredEvent) -> None:
        """Fold one committed event (events must arrive in position order)."""
        self.apply_parsed(event.position, event.stream_id, event.version, event.type,
                          from_json(event.payload))

    def apply_parsed(self, position: int, stream_id: UUID, version: int, type_name: str,
                     payload: dict[str, Any]) -> None:
        """Fold one committed event whose payload is already parsed."""
        if position <= self._position:
            return
        handler = _HANDLERS.get(type_name)
        if handler is not None:
            handler(self, position, stream_id, version, payload)
        self._position = position

    def _on_submitted(self, position: int, sid: UUID, version: int, p: dict[str, Any]) -> None:
        at = p["at"]
        policy = p["retry_policy"]
        record = TaskRecord(
            task_id=sid, name=p["name"], domain=p["domain"], group=p["group"],
            priority=p["priority"], seq=position, submitted_at=at,
            ready_at=max(at, p["not_before"] or 0.0), args=p["args"], kwargs=p["kwargs"],
            timeout=p["timeout"], max_attempts=policy.get("max_attempts"),
            idempotency_key=p["idempotency_key"], stream_version=version,
        )
        self.tasks[sid] = record
        if record.idempotency_key is not None:
            self.idempotency[(record.domain, record.idempotency_key)] = sid
        self._schedule(record)

    def _on_attempt_started(self, position: int, sid: UUID, version: int,
                            p: dict[str, Any]) -> None:
        record = self.tasks.get(sid)
        if record is None:
            return
        self._claimed.discard(sid)
        self._leave_ready(record)
        record.state = TaskState.RUNNING
        record.current_attempt = p["attempt"]
        record.attempts.append(AttemptRecord(p["attempt"], p["shepherd_id"], p["at"]))
        record.stream_version = version

    def _on_retry_scheduled(self, position: int, sid: UUID, version: int,
                            p: dict[str, Any]) -> None:
        record = self.tasks.get(sid)
        if record is None:
            return
        record.state = TaskState.RETRY_WAIT
        record.current_attempt = None
        record.ready_at = p["retry_at"]
        record.stream_version = version
        self._schedule(record)

    def _on_terminal(self, state: TaskState, sid: UUID, version: int,
                     p: dict[str, Any]) -> None:
        record = self.tasks.get(sid)
        if record is None:
            return
        self._claimed.discard(sid)
        self._leave_ready(record)
        record.state = state
        record.current_attempt = None
        record.ended_at = p["at"]
        record.stream_version = version
        if state is TaskState.SUCCEEDED:
            record.result = p["result"]
        elif state is TaskState.FAILED:
            record.error = p["error"]
        else:
            record.error = {"type": "Cancelled", "message": p["reason"], "data": {},
                            "retriable": False}
        self._finished[sid] = None
        while len(self._finished) > self._outcome_cache:
            old, _ = self._finished.popitem(last=False)
            forgotten = self.tasks.pop(old, None)
            if forgotten is not None:
                for attempt in forgotten.attempts:
                    self.attempt_task.pop(
                        attempt.stream_id or _attempt_key(forgotten, attempt.number), None)

    def _on_succeeded(self, position: int, sid: UUID, version: int, p: dict[str, Any]) -> None:
        self._on_terminal(TaskState.SUCCEEDED, sid, version, p)

    def _on_failed(self, position: int, sid: UUID, version: int, p: dict[str, Any]) -> None:
        self._on_terminal(TaskState.FAILED, sid, version, p)

    def _on_cancelled(self, position: int, sid: UUID, version: int, p: dict[str, Any]) -> None:
        self._on_terminal(TaskState.CANCELLED, sid, version, p)

    def _attempt(self, sid: UUID) -> tuple[TaskRecord, AttemptRecord] | None:
        ref = self.attempt_task.get(sid)
        if ref is None:
            return None
        record = self.tasks.get(ref[0])
        if record is None:
            return None
        for attempt in reversed(record.attempts):
            if attempt.number == ref[1]:
                return record, attempt
        return None

    def _on_attempt_assigned(self, position: int, sid: UUID, version: int,
                             p: dict[str, Any]) -> None:
        task_id = parse_uuid(p["task_id"])
        self.attempt_task[sid] = (task_id, p["number"])
        found = self._attempt(sid)
        if found is None:
            return
        _, attempt = found
        attempt.stream_id = sid
        attempt.lease_deadline = p["lease_deadline"]
        if p["lease_deadline"] is not None:
            heapq.heappush(self._leases, (p["lease_deadline"], task_id, p["number"]))

    def _on_attempt_running(self, position: int, sid: UUID, version: int,
                            p: dict[str, Any]) -> None:
        found = self._attempt(sid)
        if found is not None:
            found[1].state = AttemptState.RUNNING

    def _on_attempt_ended(self, position: int, sid: UUID, version: int,
                          p: dict[str, Any]) -> None:
        found = self._attempt(sid)
        if found is not None:
            attempt = found[1]
            attempt.state = AttemptState(p["outcome"])
            attempt.ended_at = p["at"]
            attempt.error = p["error"]

    def _on_shepherd(self, position: int, sid: UUID, version: int, p: dict[str, Any]) -> None:
        info = self.shepherds.setdefault(str(sid), {})
        info.update({k: v for k, v in p.items() if k != "at"})
        info["updated_at"] = p["at"]

    # -- time and scheduling ---------------------------------------------------------------

    def _schedule(self, record: TaskRecord) -> None:
        if record.ready_at <= self.now:
            self._make_ready(record)
        else:
            heapq.heappush(self._timers, (record.ready_at, record.seq, record.task_id))

    def _make_ready(self, record: TaskRecord) -> None:
        if record.task_id in self._in_ready:
            return
        self._in_ready.add(record.task_id)
        key = (record.domain, record.group)
        by_name = self._ready.setdefault(key, {})
        heapq.heappush(by_name.setdefault(record.name, []),
                       (-record.priority, record.seq, record.task_id))
        self._ready_count[key] = self._ready_count.get(key, 0) + 1

    def _leave_ready(self, record: TaskRecord) -> None:
        """The task left the waiting states: its ready-queue entry (if any) is now stale."""
        if record.task_id in self._in_ready:
            self._in_ready.discard(record.task_id)
            self._ready_count[(record.domain, record.group)] -= 1

    def advance(self, now: float) -> None:
        """Move tasks whose retry or not-before time has come into the ready queues."""
        self.now = max(self.now, now)
        timers = self._timers
        while timers and timers[0][0] <= self.now:
            _, _, task_id = heapq.heappop(timers)
            record = self.tasks.get(task_id)
            if record is not None and record.state in (TaskState.QUEUED, TaskState.RETRY_WAIT) \
                    and record.ready_at <= self.now:
                self._make_ready(record)

    def next_timer(self) -> float | None:
        """When the next delayed task becomes ready, or None."""
        return self._timers[0][0] if self._timers else None

    def next_lease(self) -> float | None:
        """The earliest lease deadline among running attempts, or None."""
        while self._leases:
            deadline, task_id, number = self._leases[0]
            record = self.tasks.get(task_id)
            if record is not None and record.state is TaskState.RUNNING \
                    and record.current_attempt == number:
                return deadline
            heapq.heappop(self._leases)
        return None

    def expired_leases(self, now: float) -> list[tuple[UUID, int]]:
        """Pop and return the running attempts whose lease deadline has passed."""
        expired: list[tuple[UUID, int]] = []
        leases = self._leases
        while leases and leases[0][0] <= now:
            _, task_id, number = heapq.heappop(leases)
            record = self.tasks.get(task_id)
            if record is not None and record.state is TaskState.RUNNING \
                    and record.current_attempt == number:
                expired.append((task_id, number))
        return expired

    def ready_count(self, domain: str, group: str) -> int:
        """How many tasks of (domain, group) are ready and not claimed."""
        return self._ready_count.get((domain, group), 0)

    def claim(self, domain: str, group: str, limit: int) -> list[TaskRecord]:
        """Take up to ``limit`` ready tasks of (domain, group), by priority then age.

        Claimed tasks leave the ready queues until their attempt-started event is applied
        (or :meth:`unclaim` puts them back after a failed commit).
        """
        by_name = self._ready.get((domain, group))
        if not by_name or limit <= 0:
            return []
        taken: list[TaskRecord] = []
        while len(taken) < limit and by_name:
            if len(by_name) == 1:  # the common case: one task name per group
                best_name = next(iter(by_name))
            else:
                best_name = min(by_name, key=lambda n: by_name[n][0])
            heap = by_name[best_name]
            _, _, task_id = heapq.heappop(heap)
            if not heap:
                del by_name[best_name]
            if task_id not in self._in_ready:
                continue  # stale: the task started or ended after it was queued
            self._in_ready.discard(task_id)
            self._ready_count[(domain, group)] -= 1
            record = self.tasks.get(task_id)
            if record is None or task_id in self._claimed or record.state not in (
                    TaskState.QUEUED, TaskState.RETRY_WAIT) or record.ready_at > self.now:
                continue
            self._claimed.add(task_id)
            taken.append(record)
        return taken

    def unclaim(self, records: list[TaskRecord]) -> None:
        """Return claimed tasks to their ready queues (their start was not committed)."""
        for record in records:
            if record.task_id in self._claimed:
                self._claimed.discard(record.task_id)
                if not record.terminal:
                    self._make_ready(record)

    def groups_with_ready(self) -> Iterator[GroupKey]:
        """The (domain, group) pairs that have ready tasks."""
        return (key for key, count in self._ready_count.items() if count > 0)

    # -- comparison ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A comparable summary of the state (used to prove rebuild == live)."""
        waiting = (TaskState.QUEUED, TaskState.RETRY_WAIT)
        ready = sorted(
            (key, name, ids)
            for key, by_name in self._ready.items() for name, heap in by_name.items()
            if (ids := sorted({entry[2] for entry in heap if entry[2] in self.tasks
                               and entry[2] not in self._claimed
                               and self.tasks[entry[2]].state in waiting}))
        )
        return {
            "position": self._position,
            "tasks": {tid: _record_tuple(r) for tid, r in self.tasks.items()},
            "ready": [(k, n, ids) for k, n, ids in ready],
            "ready_counts": {k: n for k, n in self._ready_count.items() if n},
            "timers": sorted((t, i) for t, _, i in self._timers
                             if i in self.tasks and not self.tasks[i].terminal),
            "idempotency": dict(self.idempotency),
        }


def _record_tuple(r: TaskRecord) -> tuple[Any, ...]:
    return (r.name, r.domain, r.group, r.priority, r.state, r.current_attempt, r.ready_at,
            r.result, r.error, r.ended_at,
            [(a.number, a.state, a.shepherd_id, a.ended_at, a.error) for a in r.attempts])


def _attempt_key(record: TaskRecord, number: int) -> UUID:
    return attempt_stream_id(record.task_id, number)


_HANDLERS = {
    "TaskSubmitted.v1": TaskSet._on_submitted,
    "TaskAttemptStarted.v1": TaskSet._on_attempt_started,
    "TaskRetryScheduled.v1": TaskSet._on_retry_scheduled,
    "TaskSucceeded.v1": TaskSet._on_succeeded,
    "TaskFailed.v1": TaskSet._on_failed,
    "TaskCancelled.v1": TaskSet._on_cancelled,
    "AttemptAssigned.v1": TaskSet._on_attempt_assigned,
    "AttemptRunning.v1": TaskSet._on_attempt_running,
    "AttemptEnded.v1": TaskSet._on_attempt_ended,
    "ShepherdRegistered.v1": TaskSet._on_shepherd,
    "ShepherdConnected.v1": TaskSet._on_shepherd,
    "ShepherdDisconnected.v1": TaskSet._on_shepherd,
    "ShepherdExpired.v1": TaskSet._on_shepherd,
    "ShepherdDrained.v1": TaskSet._on_shepherd,
}
