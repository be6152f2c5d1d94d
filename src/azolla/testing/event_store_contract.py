"""Contract test suite for :class:`azolla.domain.ports.EventStore` adapters.

Every event store (the in-memory one included) must pass it. Use it from a test module by
subclassing and providing one fixture, ``open_store``: an async factory that opens a store on
one shared, initially empty log each time it is called (a second call is like a second process
on the same database), and closes whatever it opened when the test ends::

    class TestMyEventStore(EventStoreContract):
        @pytest.fixture
        async def open_store(self) -> AsyncIterator[StoreFactory]:
            log = MyLog()
            stores = []

            async def factory() -> EventStore:
                stores.append(MyEventStore(log))
                return stores[-1]

            yield factory
            for store in stores:
                await store.close()

The suite needs ``pytest-asyncio`` (``asyncio_mode = "auto"``) and ``pytest-timeout``; every test
is bounded in time, and every loop in it is bounded in count.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar
from uuid import UUID

import pytest

from azolla.domain.errors import (
    ConcurrencyConflict,
    DuplicateTerminalOutcome,
    StoreUnavailable,
)
from azolla.domain.ports import EventStore, NewEvent, StoredEvent

__all__ = ["EventStoreContract", "StoreFactory", "new_event", "positions_of"]

StoreFactory = Callable[[], Awaitable[EventStore]]
"""Opens another store on the log shared by one test."""

DAY = 20_000  # 2024-10-04; any fixed day works


def new_event(
    stream_id: UUID,
    version: int,
    *,
    type: str = "Something.v1",
    payload: str = "{}",
    domain: str = "default",
    partition_day: int = DAY,
    terminal: bool = False,
) -> NewEvent:
    """Build a :class:`NewEvent` with defaults suitable for tests."""
    return NewEvent(
        stream_id=stream_id,
        version=version,
        type=type,
        payload=payload,
        domain=domain,
        partition_day=partition_day,
        terminal=terminal,
    )


def _one(stream_id: UUID | None = None, version: int = 1, **kwargs: Any) -> list[NewEvent]:
    return [new_event(stream_id or uuid.uuid4(), version, **kwargs)]


async def _outcome(call: Awaitable[list[int]]) -> list[int] | BaseException:
    try:
        return await call
    except Exception as exc:
        return exc


class EventStoreContract:
    """The behaviour every :class:`~azolla.domain.ports.EventStore` must show.

    Subclasses provide the ``open_store`` fixture (see the module docstring). The ``store``
    fixture is the first store opened on the test's log.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.timeout(60)]

    @pytest.fixture
    def open_store(self) -> StoreFactory:
        """Provided by the adapter's test module: opens stores on one fresh, shared log."""
        raise NotImplementedError("subclasses of EventStoreContract provide open_store")

    @pytest.fixture
    async def store(self, open_store: StoreFactory) -> EventStore:
        """A store on the test's fresh, empty log."""
        return await open_store()

    # -- basics --------------------------------------------------------------------------------

    async def test_is_an_event_store(self, store: EventStore) -> None:
        assert isinstance(store, EventStore)

    async def test_empty_log(self, store: EventStore) -> None:
        assert await store.max_position() == 0
        assert await store.read_all() == []
        assert await store.read_stream(uuid.uuid4()) == []

    async def test_empty_append_records_nothing(self, store: EventStore) -> None:
        assert await store.append([]) == []
        assert await store.max_position() == 0

    async def test_append_returns_increasing_positions(self, store: EventStore) -> None:
        first = await store.append(_one())
        batch = await store.append([new_event(uuid.uuid4(), 1) for _ in range(5)])
        last = await store.append(_one())
        positions = first + batch + last
        assert len(positions) == 7
        assert positions == sorted(positions)
        assert len(set(positions)) == 7
        assert positions[0] >= 1
        assert await store.max_position() == positions[-1]

    async def test_stored_fields_round_trip(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        before = time.time()
        [position] = await store.append(
            [
                new_event(
                    stream,
                    1,
                    type="TaskSubmitted.v1",
                    payload='{"name": "add", "args": [1, 2]}',
                    domain="billing",
                    partition_day=DAY + 3,
                    terminal=True,
                )
            ]
        )
        [event] = await store.read_stream(stream)
        assert isinstance(event, StoredEvent)
        assert event.position == position
        assert event.stream_id == stream
        assert event.version == 1
        assert event.type == "TaskSubmitted.v1"
        assert event.payload == '{"name": "add", "args": [1, 2]}'
        assert event.domain == "billing"
        assert event.partition_day == DAY + 3
        assert event.terminal is True
        assert before - 60 <= event.recorded_at <= time.time() + 60

    async def test_read_stream_in_version_order_from_version(self, store: EventStore) -> None:
        stream, other = uuid.uuid4(), uuid.uuid4()
        await store.append([new_event(stream, 1), new_event(other, 1)])
        await store.append([new_event(stream, 2), new_event(stream, 3)])
        await store.append([new_event(other, 2), new_event(stream, 4)])
        events = await store.read_stream(stream)
        assert [e.version for e in events] == [1, 2, 3, 4]
        assert all(e.stream_id == stream for e in events)
        assert [e.version for e in await store.read_stream(stream, from_version=3)] == [3, 4]
        assert await store.read_stream(stream, from_version=5) == []

    async def test_read_after_commit(self, store: EventStore) -> None:
        for i in range(20):
            stream = uuid.uuid4()
            [position] = await store.append(_one(stream, payload=json.dumps({"i": i})))
            assert [e.position for e in await store.read_stream(stream)] == [position]
            tail = await store.read_all(after_position=position - 1, limit=1)
            assert [e.position for e in tail] == [position]
            assert await store.max_position() >= position

    async def test_invalid_version_is_refused(self, store: EventStore) -> None:
        with pytest.raises(ValueError, match="version"):
            await store.append(_one(version=0))
        assert await store.max_position() == 0

    # -- optimistic concurrency, atomicity, terminal uniqueness --------------------------------

    async def test_existing_version_is_a_conflict(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        await store.append([new_event(stream, 1), new_event(stream, 2)])
        with pytest.raises(ConcurrencyConflict):
            await store.append([new_event(stream, 2, payload='{"late": true}')])
        events = await store.read_stream(stream)
        assert [e.payload for e in events] == ["{}", "{}"]

    async def test_repeated_version_in_one_append_is_a_conflict(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        with pytest.raises(ConcurrencyConflict):
            await store.append([new_event(stream, 1), new_event(stream, 1)])
        assert await store.read_stream(stream) == []

    async def test_batch_is_atomic(self, store: EventStore) -> None:
        taken = uuid.uuid4()
        await store.append(_one(taken))
        before = await store.max_position()
        fresh = uuid.uuid4()
        with pytest.raises(ConcurrencyConflict):
            await store.append(
                [new_event(fresh, 1), new_event(fresh, 2), new_event(taken, 1), new_event(fresh, 3)]
            )
        assert await store.read_stream(fresh) == []
        assert await store.max_position() == before
        assert len(await store.read_all()) == 1
        # The fresh stream is still free.
        assert len(await store.append([new_event(fresh, 1)])) == 1

    async def test_second_terminal_event_is_refused(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        await store.append([new_event(stream, 1), new_event(stream, 2, terminal=True)])
        with pytest.raises(DuplicateTerminalOutcome):
            await store.append([new_event(stream, 3, terminal=True)])
        # A non-terminal event after the terminal one is the domain's business, not the log's.
        await store.append([new_event(stream, 3)])
        events = await store.read_stream(stream)
        assert [(e.version, e.terminal) for e in events] == [(1, False), (2, True), (3, False)]

    async def test_two_terminal_events_in_one_append_are_refused(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        with pytest.raises(DuplicateTerminalOutcome):
            await store.append(
                [new_event(stream, 1, terminal=True), new_event(stream, 2, terminal=True)]
            )
        assert await store.read_stream(stream) == []

    async def test_duplicate_terminal_is_a_concurrency_conflict(self) -> None:
        assert issubclass(DuplicateTerminalOutcome, ConcurrencyConflict)

    async def test_terminal_events_of_other_streams_are_independent(
        self, store: EventStore
    ) -> None:
        streams = [uuid.uuid4() for _ in range(5)]
        positions = await store.append([new_event(s, 1, terminal=True) for s in streams])
        assert len(positions) == 5

    # -- concurrency ---------------------------------------------------------------------------

    async def test_concurrent_appends_to_distinct_streams(self, store: EventStore) -> None:
        streams = [uuid.uuid4() for _ in range(300)]
        results = await asyncio.gather(*(store.append(_one(s)) for s in streams))
        positions = [p for r in results for p in r]
        assert len(set(positions)) == 300
        logged = await store.read_all(limit=1000)
        assert [e.position for e in logged] == sorted(positions)
        by_position = {e.position: e.stream_id for e in logged}
        for stream, [position] in zip(streams, results, strict=True):
            assert by_position[position] == stream

    async def test_concurrent_appends_to_one_stream_have_one_winner_per_version(
        self, store: EventStore
    ) -> None:
        stream = uuid.uuid4()
        contenders = 10
        versions = 20
        calls = [
            store.append([new_event(stream, v, payload=json.dumps({"by": c}))])
            for v in range(1, versions + 1)
            for c in range(contenders)
        ]
        bystanders = [store.append(_one()) for _ in range(50)]
        outcomes = await asyncio.gather(*(_outcome(c) for c in calls + bystanders))
        contested, innocent = outcomes[: len(calls)], outcomes[len(calls) :]
        wins = [o for o in contested if isinstance(o, list)]
        losses = [o for o in contested if not isinstance(o, list)]
        assert len(wins) == versions
        assert all(type(o) is ConcurrencyConflict for o in losses), losses[:3]
        assert all(isinstance(o, list) for o in innocent), innocent[:3]
        events = await store.read_stream(stream)
        assert [e.version for e in events] == list(range(1, versions + 1))

    async def test_concurrent_terminal_race_has_one_winner(self, store: EventStore) -> None:
        stream = uuid.uuid4()
        await store.append([new_event(stream, 1)])
        outcomes = await asyncio.gather(
            *(_outcome(store.append([new_event(stream, v, terminal=True)])) for v in range(2, 52))
        )
        assert sum(isinstance(o, list) for o in outcomes) == 1
        assert all(isinstance(o, list) or type(o) is DuplicateTerminalOutcome for o in outcomes), [
            o for o in outcomes if not isinstance(o, list)
        ][:3]
        assert sum(e.terminal for e in await store.read_stream(stream)) == 1

    async def test_concurrent_multi_event_appends_stay_atomic(self, store: EventStore) -> None:
        shared = uuid.uuid4()

        def call(i: int) -> Awaitable[list[int]]:
            own = uuid.uuid4()
            # Every call writes 3 events to its own stream and version 1 of the shared stream:
            # exactly one call wins, and the losers leave nothing behind.
            return store.append(
                [new_event(own, 1), new_event(own, 2), new_event(shared, 1), new_event(own, 3)]
            )

        outcomes = await asyncio.gather(*(_outcome(call(i)) for i in range(100)))
        wins = [o for o in outcomes if isinstance(o, list)]
        assert len(wins) == 1
        assert len(wins[0]) == 4
        logged = await store.read_all(limit=1000)
        assert len(logged) == 4
        assert [e.position for e in logged] == sorted(wins[0])

    async def test_two_stores_on_one_log_have_one_winner(self, open_store: StoreFactory) -> None:
        first, second = await open_store(), await open_store()
        stream = uuid.uuid4()
        outcomes = await asyncio.gather(
            *(
                _outcome(store.append([new_event(stream, v)]))
                for v in range(1, 11)
                for store in (first, second, first, second)
            )
        )
        assert sum(isinstance(o, list) for o in outcomes) == 10
        assert [e.version for e in await second.read_stream(stream)] == list(range(1, 11))
        positions = [e.position for e in await first.read_all()]
        assert positions == sorted(positions)

    # -- payloads ------------------------------------------------------------------------------

    async def test_large_payload(self, store: EventStore) -> None:
        payload = json.dumps({"blob": "x" * (1024 * 1024), "n": 1})
        stream = uuid.uuid4()
        await store.append(_one(stream, payload=payload))
        [event] = await store.read_stream(stream)
        assert event.payload == payload

    async def test_unicode(self, store: EventStore) -> None:
        payload = json.dumps(
            {"text": "Grüße, 世界, Ωμέγα, 🚀, \u200d", "k": "é"}, ensure_ascii=False
        )
        stream = uuid.uuid4()
        await store.append(_one(stream, payload=payload, type="Événement.v1", domain="dømæn-🌱"))
        [event] = await store.read_stream(stream)
        assert event.payload == payload
        assert event.type == "Événement.v1"
        assert event.domain == "dømæn-🌱"

    async def test_payload_text_is_kept_verbatim(self, store: EventStore) -> None:
        payloads = [
            r'{"quote": "\"", "backslash": "\\", "nul": "\u0000", "tab": "\t"}',
            '{"b": 1, "a": 2, "b": 3}',  # key order and duplicate keys are kept
            '{ "spaced" :  [ 1 , 2.50 , 1e3 ] }',  # whitespace and number spelling are kept
            '{"sql": "\'; DROP TABLE azolla_events; --", "dollar": "$1 $$"}',
            '{"surrogates": "\\ud83d\\ude80", "lone": "\\ud800"}',
            '"not an object"',
            "[]",
        ]
        stream = uuid.uuid4()
        await store.append([new_event(stream, i + 1, payload=p) for i, p in enumerate(payloads)])
        assert [e.payload for e in await store.read_stream(stream)] == payloads

    async def test_invalid_payload_is_refused_alone(self, store: EventStore) -> None:
        good = [uuid.uuid4() for _ in range(20)]
        bad = uuid.uuid4()
        calls = [store.append(_one(s)) for s in good[:10]]
        calls.append(store.append([new_event(bad, 1), new_event(bad, 2, payload="{oops")]))
        calls += [store.append(_one(s)) for s in good[10:]]
        outcomes = await asyncio.gather(*(_outcome(c) for c in calls))
        assert isinstance(outcomes[10], ValueError)
        assert "events refused" in str(outcomes[10])
        assert all(isinstance(o, list) for i, o in enumerate(outcomes) if i != 10)
        assert await store.read_stream(bad) == []
        for bad_payload in ('{"x": NaN}', '{"nul": "a\x00b"}', ""):
            with pytest.raises(ValueError, match="events refused"):
                await store.append(_one(payload=bad_payload))
        assert len(await store.read_all()) == 20

    # -- reading -------------------------------------------------------------------------------

    async def test_read_all_pagination(self, store: EventStore) -> None:
        written: list[int] = []
        for i in range(5):
            written += await store.append([new_event(uuid.uuid4(), 1) for _ in range(i + 3)])
        assert len(written) == 25
        seen: list[StoredEvent] = []
        after = 0
        for _ in range(10):  # bounded: 3 pages expected
            page = await store.read_all(after_position=after, limit=10)
            if not page:
                break
            assert len(page) <= 10
            seen += page
            after = page[-1].position
        assert [e.position for e in seen] == written
        assert await store.read_all(after_position=written[-1]) == []
        assert [e.position for e in await store.read_all(written[4], limit=3)] == written[5:8]
        assert await store.read_all(limit=0) == []

    # -- waiting -------------------------------------------------------------------------------

    async def test_wait_returns_at_once_when_newer_events_exist(self, store: EventStore) -> None:
        [position] = await store.append(_one())
        started = time.monotonic()
        assert await store.wait_for_events(position - 1, timeout=10) >= position
        assert time.monotonic() - started < 1

    async def test_wait_wakes_on_commit(self, store: EventStore) -> None:
        current = await store.max_position()
        waiter = asyncio.create_task(store.wait_for_events(current, timeout=20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = time.monotonic()
        [position] = await store.append(_one())
        result = await asyncio.wait_for(waiter, 5)
        assert result >= position
        assert time.monotonic() - started < 2

    async def test_wait_wakes_many_waiters(self, store: EventStore) -> None:
        current = await store.max_position()
        waiters = [
            asyncio.create_task(store.wait_for_events(current, timeout=20)) for _ in range(50)
        ]
        await asyncio.sleep(0.02)
        [position] = await store.append(_one())
        results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert all(r >= position for r in results)

    async def test_wait_times_out(self, store: EventStore) -> None:
        [position] = await store.append(_one())
        started = time.monotonic()
        result = await store.wait_for_events(position, timeout=0.3)
        elapsed = time.monotonic() - started
        assert result == position
        assert 0.25 <= elapsed < 2.0
        assert await store.wait_for_events(position, timeout=0) == position

    async def test_wait_wakes_on_another_stores_commit(self, open_store: StoreFactory) -> None:
        reader, writer = await open_store(), await open_store()
        current = await reader.max_position()
        waiter = asyncio.create_task(reader.wait_for_events(current, timeout=20))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        [position] = await writer.append(_one())
        assert await asyncio.wait_for(waiter, 10) >= position

    # -- closing -------------------------------------------------------------------------------

    async def test_close_flushes_pending_appends(self, open_store: StoreFactory) -> None:
        store = await open_store()
        streams = [uuid.uuid4() for _ in range(200)]
        calls = [asyncio.create_task(store.append(_one(s))) for s in streams]
        await asyncio.sleep(0)  # every call is now queued
        await store.close()
        results = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert all(len(r) == 1 for r in results)
        with pytest.raises(StoreUnavailable):
            await store.append(_one())
        await store.close()  # idempotent
        again = await open_store()
        logged = await again.read_all(limit=1000)
        assert sorted(e.stream_id for e in logged) == sorted(streams)

    async def test_close_wakes_waiters(self, open_store: StoreFactory) -> None:
        store = await open_store()
        waiter = asyncio.create_task(store.wait_for_events(10**9, timeout=30))
        await asyncio.sleep(0.02)
        await store.close()
        assert await asyncio.wait_for(waiter, 5) < 10**9


def positions_of(results: Sequence[list[int] | BaseException]) -> list[int]:
    """Flatten the positions of successful appends (helper for adapter-specific tests)."""
    return [p for r in results if isinstance(r, list) for p in r]
