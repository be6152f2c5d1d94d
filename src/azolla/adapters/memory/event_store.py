"""In-memory event store with the same semantics as the Postgres one.

For unit tests and ``--store memory`` demos. It passes the same contract suite
(:mod:`azolla.testing.event_store_contract`) as :class:`~azolla.adapters.postgres.event_store.
PostgresEventStore`:

* an append is atomic (all events recorded or none), positions are global and strictly
  increasing, ``(stream_id, version)`` is unique, a stream has at most one terminal event;
* payloads must be JSON text (checked like PostgreSQL's ``json`` type: ``NaN`` and NUL
  characters are refused with :class:`ValueError`), and are stored verbatim;
* ``wait_for_events`` wakes on commits without polling;
* every ``append`` suspends at least once, as a real store does;
* backpressure and outages can be simulated: :meth:`InMemoryEventStore.pause` holds commits
  (appends queue up to ``queue_limit`` events, then ``StoreOverloaded``);
  :meth:`InMemoryEventStore.fail_next` makes the next commits fail with ``StoreUnavailable``.

Several stores may share one :class:`InMemoryEventLog`, like several processes sharing one
database; each store's waiters wake on every store's commits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from uuid import UUID

from azolla.adapters._event_checks import check_new_events
from azolla.domain.errors import (
    ConcurrencyConflict,
    DuplicateTerminalOutcome,
    StoreOverloaded,
    StoreUnavailable,
)
from azolla.domain.ports import NewEvent, StoredEvent

__all__ = ["InMemoryEventLog", "InMemoryEventStore"]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _check_values(event: NewEvent) -> None:
    """Refuse what PostgreSQL would refuse (``json`` input rules, NUL characters, bad UTF-8)."""
    for text in (event.type, event.domain, event.payload):
        if "\x00" in text:
            raise ValueError("events refused: text contains a NUL character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates cannot be stored
            raise ValueError(f"events refused: {exc}") from exc
    try:
        json.loads(event.payload, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ValueError(f"events refused: payload is not JSON: {exc}") from exc


class InMemoryEventLog:
    """The shared storage of one or more :class:`InMemoryEventStore` (one "database").

    Args:
        clock: Source of ``recorded_at`` (Unix epoch seconds).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.events: list[StoredEvent] = []
        """Every committed event, in position order."""
        self._clock = clock
        self._streams: dict[UUID, dict[int, StoredEvent]] = {}
        self._terminal: set[UUID] = set()
        self._stores: set[InMemoryEventStore] = set()

    @property
    def max_position(self) -> int:
        """The highest committed position (0 when empty)."""
        return self.events[-1].position if self.events else 0

    def commit(self, events: Sequence[NewEvent]) -> list[int]:
        """Record ``events`` atomically (all or none) and wake every attached store's waiters.

        Raises:
            ConcurrencyConflict: A ``(stream_id, version)`` exists already.
            DuplicateTerminalOutcome: A stream would get a second terminal event.
            ValueError: A payload is not JSON text, or a text holds a NUL character.
        """
        check_new_events(events)
        for event in events:
            _check_values(event)
            stream = self._streams.get(event.stream_id)
            if event.terminal and event.stream_id in self._terminal:
                raise DuplicateTerminalOutcome(
                    f"stream {event.stream_id} already has a terminal event"
                )
            if stream is not None and event.version in stream:
                raise ConcurrencyConflict(
                    f"stream {event.stream_id} version {event.version} already exists"
                )
        now = self._clock()
        positions: list[int] = []
        position = self.max_position
        for event in events:
            position += 1
            stored = StoredEvent(
                position=position,
                stream_id=event.stream_id,
                version=event.version,
                type=event.type,
                payload=event.payload,
                domain=event.domain,
                partition_day=event.partition_day,
                terminal=event.terminal,
                recorded_at=now,
            )
            self.events.append(stored)
            self._streams.setdefault(event.stream_id, {})[event.version] = stored
            if event.terminal:
                self._terminal.add(event.stream_id)
            positions.append(position)
        for store in tuple(self._stores):
            store._wake_waiters()
        return positions

    def read_stream(self, stream_id: UUID, from_version: int = 1) -> list[StoredEvent]:
        """Return one stream's events with version >= ``from_version``, in version order."""
        stream = self._streams.get(stream_id, {})
        return [stream[v] for v in sorted(stream) if v >= from_version]

    def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Return up to ``limit`` events with position > ``after_position``, in order."""
        if limit <= 0:
            return []
        # Positions are dense from 1, so the index of position p is p - 1.
        start = max(after_position, 0)
        return self.events[start : start + limit]

    def _attach(self, store: InMemoryEventStore) -> None:
        self._stores.add(store)

    def _detach(self, store: InMemoryEventStore) -> None:
        self._stores.discard(store)


class InMemoryEventStore:
    """The :class:`~azolla.domain.ports.EventStore` port in memory.

    Args:
        log: Shared storage; a fresh one by default.
        queue_limit: Most events waiting while commits are paused; beyond it ``append`` raises
            ``StoreOverloaded`` (an append larger than the limit is accepted only when nothing
            waits).
    """

    def __init__(self, log: InMemoryEventLog | None = None, *, queue_limit: int = 20_000) -> None:
        self.log = log if log is not None else InMemoryEventLog()
        """The storage this store writes to."""
        self._queue_limit = queue_limit
        self._waiting_events = 0
        self._gate = asyncio.Event()
        self._gate.set()
        self._closing = False
        self._closed = False
        self._failures: list[Exception] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.log._attach(self)

    # -- test controls -----------------------------------------------------------------------

    def pause(self) -> None:
        """Hold commits: appends wait (and count against ``queue_limit``) until :meth:`resume`."""
        self._gate.clear()

    def resume(self) -> None:
        """Let held appends commit, in arrival order."""
        self._gate.set()

    def fail_next(self, count: int = 1, error: Exception | None = None) -> None:
        """Make the next ``count`` commits fail (default ``StoreUnavailable``); nothing is
        recorded for them."""
        for _ in range(count):
            self._failures.append(error or StoreUnavailable("simulated database outage"))

    # -- the port ----------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Append ``events`` atomically; return their positions.

        Raises:
            ConcurrencyConflict: A ``(stream_id, version)`` exists already, or repeats in the call.
            DuplicateTerminalOutcome: A stream would get a second terminal event.
            StoreOverloaded: Too many events wait (only while paused).
            StoreUnavailable: The store is closed, or a simulated failure was armed.
            ValueError: Invalid events or payloads (see the module docstring).
        """
        n = len(events)
        if n == 0:
            return []
        if self._closing:
            raise StoreUnavailable("event store is closed")
        if self._waiting_events + n > self._queue_limit and self._waiting_events > 0:
            raise StoreOverloaded(
                f"event store queue full ({self._waiting_events} events waiting,"
                f" limit {self._queue_limit})"
            )
        check_new_events(events)
        events = tuple(events)
        self._waiting_events += n
        self._in_flight += 1
        self._idle.clear()
        try:
            await asyncio.sleep(0)
            if not self._gate.is_set():
                await self._gate.wait()
            if self._failures:
                raise self._failures.pop(0)
            return self.log.commit(events)
        finally:
            self._waiting_events -= n
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def read_stream(self, stream_id: UUID, from_version: int = 1) -> list[StoredEvent]:
        """Return the events of one stream in version order, from ``from_version``.

        Raises:
            StoreUnavailable: If the store is closed.
        """
        self._check_open()
        return self.log.read_stream(stream_id, from_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Return up to ``limit`` events with position > ``after_position``, in order.

        Raises:
            StoreUnavailable: If the store is closed.
        """
        self._check_open()
        return self.log.read_all(after_position, limit)

    async def max_position(self) -> int:
        """Return the highest committed position (0 for an empty log).

        Raises:
            StoreUnavailable: If the store is closed.
        """
        self._check_open()
        return self.log.max_position

    async def wait_for_events(self, after_position: int, timeout: float) -> int:
        """Wait until an event with position > ``after_position`` is committed, or ``timeout``.

        Returns:
            The highest committed position (``<= after_position`` on timeout).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self.log.max_position <= after_position and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                break
            finally:
                self._waiters.discard(waiter)
        return self.log.max_position

    async def close(self) -> None:
        """Commit the appends already made (even if paused), then refuse new ones. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._gate.set()
        await self._idle.wait()
        self._closed = True
        self.log._detach(self)
        self._wake_waiters()

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("event store is closed")

    def _wake_waiters(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
