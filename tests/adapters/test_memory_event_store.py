"""The in-memory event store: the contract suite, plus its test controls (pause, fail_next)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from azolla.adapters.memory.event_store import InMemoryEventLog, InMemoryEventStore
from azolla.domain.errors import StoreOverloaded, StoreUnavailable
from azolla.domain.ports import EventStore
from azolla.testing.event_store_contract import EventStoreContract, StoreFactory, new_event

pytestmark = pytest.mark.timeout(30)


class TestInMemoryEventStore(EventStoreContract):
    """The contract, on a fresh :class:`InMemoryEventLog` per test."""

    @pytest.fixture
    async def open_store(self) -> AsyncIterator[StoreFactory]:
        log = InMemoryEventLog()
        stores: list[InMemoryEventStore] = []

        async def factory() -> EventStore:
            stores.append(InMemoryEventStore(log))
            return stores[-1]

        yield factory
        for store in stores:
            await store.close()


async def test_full_queue_is_backpressure() -> None:
    store = InMemoryEventStore(queue_limit=10)
    store.pause()
    held = [asyncio.create_task(store.append([new_event(uuid.uuid4(), 1)])) for _ in range(10)]
    await asyncio.sleep(0)
    with pytest.raises(StoreOverloaded):
        await store.append([new_event(uuid.uuid4(), 1)])
    assert await store.max_position() == 0
    store.resume()
    results = await asyncio.wait_for(asyncio.gather(*held), 5)
    assert sorted(p for r in results for p in r) == list(range(1, 11))
    assert len(await store.append([new_event(uuid.uuid4(), 1)])) == 1
    await store.close()


async def test_an_append_larger_than_the_queue_passes_when_the_queue_is_empty() -> None:
    store = InMemoryEventStore(queue_limit=2)
    stream = uuid.uuid4()
    assert len(await store.append([new_event(stream, v) for v in range(1, 6)])) == 5
    await store.close()


async def test_simulated_failure_records_nothing() -> None:
    store = InMemoryEventStore()
    store.fail_next()
    stream = uuid.uuid4()
    with pytest.raises(StoreUnavailable):
        await store.append([new_event(stream, 1)])
    assert await store.read_stream(stream) == []
    assert await store.append([new_event(stream, 1)]) == [1]
    await store.close()


async def test_close_commits_paused_appends() -> None:
    store = InMemoryEventStore()
    store.pause()
    held = asyncio.create_task(store.append([new_event(uuid.uuid4(), 1)]))
    await asyncio.sleep(0)
    await asyncio.wait_for(store.close(), 5)
    assert await held == [1]
    with pytest.raises(StoreUnavailable):
        await store.read_all()
