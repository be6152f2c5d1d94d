"""The PostgreSQL event store: the contract suite, plus what only a real database shows
(migrations, partitions and retention, durability settings, backpressure, failed batches,
outages)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from azolla.adapters.postgres.cluster import LocalCluster, PostgresCluster
from azolla.adapters.postgres.event_store import (
    APPEND_LOCK_KEY,
    PostgresEventStore,
    _packable,
)
from azolla.adapters.postgres.migrations import (
    Migration,
    MigrationError,
    apply_migrations,
    load_migrations,
)
from azolla.adapters.postgres.partitions import (
    drop_partitions_older_than,
    list_partitions,
    partition_name,
    partition_start,
    today,
)
from azolla.domain.errors import (
    StoreOverloaded,
    StoreUnavailable,
    UnsafeDatabaseSettings,
)
from azolla.domain.ports import EventStore, NewEvent
from azolla.testing.event_store_contract import DAY, EventStoreContract, StoreFactory, new_event

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


class TestPostgresEventStore(EventStoreContract):
    """The contract, on a fresh database per test."""

    @pytest.fixture
    async def open_store(self, fresh_database_url: str) -> AsyncIterator[StoreFactory]:
        stores: list[PostgresEventStore] = []

        async def factory() -> EventStore:
            stores.append(await PostgresEventStore.open(fresh_database_url))
            return stores[-1]

        yield factory
        for store in stores:
            await store.close()


class TestPipelinedPostgresEventStore(EventStoreContract):
    """The contract again, with two batches in flight on two writer connections."""

    @pytest.fixture
    async def open_store(self, fresh_database_url: str) -> AsyncIterator[StoreFactory]:
        stores: list[PostgresEventStore] = []

        async def factory() -> EventStore:
            stores.append(await PostgresEventStore.open(fresh_database_url, pipeline_depth=2))
            return stores[-1]

        yield factory
        for store in stores:
            await store.close()


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[PostgresEventStore]:
    store = await PostgresEventStore.open(url, **options)
    try:
        yield store
    finally:
        await store.close()


def _event(version: int = 1, stream: uuid.UUID | None = None, **kwargs: Any) -> list[NewEvent]:
    return [new_event(stream or uuid.uuid4(), version, **kwargs)]


# ------------------------------------------------------------------------------------------------
# The batch insert's encodings


@pytest.mark.parametrize("odd", ["a\x1fb", "", "\x1f"], ids=["separator", "empty", "only-sep"])
async def test_batches_round_trip_every_field_whatever_the_texts(
        fresh_database_url: str, odd: str) -> None:
    """A batch is sent packed (texts joined by a separator, numbers and flags as text) unless a
    domain or type name would not split back; either way every field lands as given."""
    plain = [new_event(uuid.uuid4(), v, type=f"T{v}.v1", domain=f"d{v % 3}",
                       partition_day=DAY - v, terminal=v % 2 == 0,
                       payload=f'{{"n": {v}}}') for v in range(1, 7)]
    strange = [new_event(uuid.uuid4(), 3, type=odd or "X.v1", domain=odd, terminal=True,
                         payload='{"s": "\\u001f"}'), *plain[:2]]
    strange[1:] = [new_event(uuid.uuid4(), e.version, type=e.type, domain=e.domain,
                             partition_day=e.partition_day, terminal=e.terminal,
                             payload=e.payload) for e in strange[1:]]
    used: list[str] = []

    class Spy:
        def __init__(self, name: str, statement: Any) -> None:
            self.name, self.statement = name, statement

        async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
            used.append(self.name)
            return await self.statement.fetchrow(*args, **kwargs)

    async with opened(fresh_database_url) as store:
        lane = store._lanes[0]
        lane.insert = Spy("packed", lane.insert)
        lane.insert_arrays = Spy("arrays", lane.insert_arrays)
        positions = await store.append(plain) + await store.append(strange)
        stored = await store.read_all(0, 100)
    assert used == ["packed", "arrays"]
    assert [e.position for e in stored] == positions
    for given, got in zip([*plain, *strange], stored, strict=True):
        assert (got.stream_id, got.version, got.type, got.payload, got.domain,
                got.partition_day, got.terminal) == (
            given.stream_id, given.version, given.type, given.payload, given.domain,
            given.partition_day, given.terminal)


def test_packable_is_true_only_when_the_texts_split_back() -> None:
    assert _packable(["a"], "a")
    assert _packable(["a", "b c", "ü"], "a\x1fb c\x1fü")
    assert not _packable(["a\x1fb"], "a\x1fb")
    assert not _packable([""], "")
    assert not _packable(["a", ""], "a\x1f")


# ------------------------------------------------------------------------------------------------
# Migrations


async def test_migrations_are_idempotent(fresh_database_url: str) -> None:
    async with connect(fresh_database_url) as conn:
        first = await apply_migrations(conn)
        assert first == [m.version for m in load_migrations()]
        assert 1 in first
        assert await apply_migrations(conn) == []
        rows = await conn.fetch("SELECT version, name FROM azolla_schema_migrations ORDER BY 1")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in load_migrations()
        ]
        assert (rows[0]["version"], rows[0]["name"]) == (1, "events")
        assert await conn.fetchval("SELECT to_regclass('azolla_events') IS NOT NULL")


async def test_migrations_from_two_connections_at_once(fresh_database_url: str) -> None:
    async with connect(fresh_database_url) as a, connect(fresh_database_url) as b:
        results = await asyncio.gather(apply_migrations(a), apply_migrations(b))
        assert sorted(results, key=len) == [[], [m.version for m in load_migrations()]]


async def test_migrations_from_two_processes_at_once(fresh_database_url: str) -> None:
    script = (
        "import asyncio, sys\n"
        "from azolla.adapters.postgres.migrations import apply_migrations_dsn\n"
        "print(asyncio.run(apply_migrations_dsn(sys.argv[1])))\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            fresh_database_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outputs]
    printed = sorted(o[0].decode().strip() for o in outputs)
    assert printed == sorted([str([m.version for m in load_migrations()]), "[]"])


async def test_edited_migration_is_refused(fresh_database_url: str) -> None:
    async with connect(fresh_database_url) as conn:
        await apply_migrations(conn)
        [first, *rest] = load_migrations()
        edited = Migration(first.version, first.name, first.sql + "\n-- edited", "0" * 64)
        with pytest.raises(MigrationError, match="edited"):
            await apply_migrations(conn, [edited, *rest])


async def test_migrations_ship_as_package_data() -> None:
    migrations = load_migrations()
    assert migrations[0].version == 1
    assert "CREATE TABLE azolla_events" in migrations[0].sql


# ------------------------------------------------------------------------------------------------
# Partitions and retention


async def test_partitions_are_created_ahead_and_on_demand(fresh_database_url: str) -> None:
    async with opened(fresh_database_url) as store, connect(fresh_database_url) as conn:
        names = {p.name for p in await list_partitions(conn)}
        assert partition_name(today()) in names
        assert partition_name(today() + 7) in names
        assert "azolla_events_default" in names
        far = today() + 400
        await store.append(_event(partition_day=far))
        where = await conn.fetchval(
            "SELECT tableoid::regclass::text FROM azolla_events WHERE partition_day = $1", far
        )
        assert where == partition_name(far)
        [part] = [p for p in await list_partitions(conn) if p.name == partition_name(far)]
        assert part.first_day == partition_start(far)
        assert part.end_day == partition_start(far) + 7
        # 1970-01-05 was a Monday: partitions start on Mondays.
        assert (part.first_day - 4) % 7 == 0


async def test_rows_in_the_default_partition_move_when_their_week_gets_a_partition(
    fresh_database_url: str,
) -> None:
    async with opened(fresh_database_url) as store, connect(fresh_database_url) as conn:
        day = today() + 1000
        stream = uuid.uuid4()
        # Bypass the store: with no partition for that week the row lands in DEFAULT (as if
        # the on-demand creation had failed).
        await conn.execute(
            "INSERT INTO azolla_events (domain, stream_id, version, type, payload,"
            " partition_day) VALUES ('d', $1, 1, 'T', '{}', $2)",
            stream,
            day,
        )
        assert await conn.fetchval("SELECT count(*) FROM azolla_events_default") == 1
        await store.append(_event(2, stream, partition_day=day))
        rows = await conn.fetch(
            "SELECT tableoid::regclass::text AS part, version FROM azolla_events"
            " WHERE stream_id = $1 ORDER BY version",
            stream,
        )
        assert [(r["part"], r["version"]) for r in rows] == [
            (partition_name(day), 1),
            (partition_name(day), 2),
        ]
        assert await conn.fetchval("SELECT count(*) FROM azolla_events_default") == 0


async def _task(
    store: PostgresEventStore, day: int, *, finished: bool, attempts: int = 0
) -> uuid.UUID:
    stream = uuid.uuid4()
    events = [new_event(stream, 1, type="TaskSubmitted.v1", partition_day=day)]
    for n in range(attempts):
        events.append(new_event(stream, n + 2, type="AttemptStarted.v1", partition_day=day))
    if finished:
        events.append(
            new_event(
                stream, len(events) + 1, type="TaskSucceeded.v1", partition_day=day, terminal=True
            )
        )
    await store.append(events)
    return stream


async def test_retention_drops_finished_weeks_and_keeps_unfinished_tasks(
    fresh_database_url: str,
) -> None:
    week = 7
    base = partition_start(today()) - 10 * week
    finished_week, unfinished_week, other_week, recent_week = (
        base,
        base + week,
        base + 2 * week,
        base + 9 * week,
    )
    async with opened(fresh_database_url) as store, connect(fresh_database_url) as conn:
        done = [await _task(store, finished_week + i, finished=True, attempts=i) for i in range(3)]
        kept_done = await _task(store, unfinished_week, finished=True)
        stuck = await _task(store, unfinished_week + 2, finished=False, attempts=1)
        shepherd = uuid.uuid4()
        await store.append(
            _event(1, shepherd, type="ShepherdRegistered.v1", partition_day=other_week)
        )
        recent = await _task(store, recent_week, finished=True)

        report = await drop_partitions_older_than(conn, cutoff_day=base + 3 * week)

        assert report.dropped == [partition_name(finished_week), partition_name(other_week)]
        assert list(report.skipped) == [partition_name(unfinished_week)]
        assert "1 unfinished" in report.skipped[partition_name(unfinished_week)]
        names = {p.name for p in await list_partitions(conn)}
        assert partition_name(finished_week) not in names
        assert partition_name(unfinished_week) in names
        for stream in done:
            assert await store.read_stream(stream) == []
        assert await store.read_stream(shepherd) == []
        assert len(await store.read_stream(stuck)) == 2
        assert len(await store.read_stream(kept_done)) == 2
        assert len(await store.read_stream(recent)) == 2
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'azolla_events_detached_%'"
        )
        # Once the stuck task finishes, its week goes too.
        await store.append(
            _event(3, stuck, type="TaskFailed.v1", partition_day=unfinished_week + 2, terminal=True)
        )
        again = await drop_partitions_older_than(conn, cutoff_day=base + 3 * week)
        assert again.dropped == [partition_name(unfinished_week)]
        assert again.skipped == {}
        # The log still works, positions keep increasing.
        before = await store.max_position()
        [position] = await store.append(_event())
        assert position > before


async def test_retention_can_archive_to_files_and_tables(fresh_database_url: str) -> None:
    old = partition_start(today()) - 70
    folder = Path(tempfile.mkdtemp(prefix="azolla-archive-"))
    try:
        async with opened(fresh_database_url) as store, connect(fresh_database_url) as conn:
            await _task(store, old, finished=True, attempts=2)
            await _task(store, old + 7, finished=True)
            report = await drop_partitions_older_than(
                conn, cutoff_day=old + 14, archive_dir=folder, keep_as_table=True
            )
            assert report.dropped == [partition_name(old), partition_name(old + 7)]
            csv = folder / f"{partition_name(old)}.csv"
            lines = csv.read_text().splitlines()
            assert lines[0].startswith("position,domain,stream_id,version,type,payload")
            assert len(lines) == 1 + 4
            archive = partition_name(old).replace("azolla_events_", "azolla_events_archive_")
            assert await conn.fetchval(f"SELECT count(*) FROM {archive}") == 4
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Durability settings


async def test_refuses_synchronous_commit_off(fresh_database_url: str) -> None:
    name = fresh_database_url.rsplit("/", 1)[1]
    async with connect(fresh_database_url) as conn:
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    with pytest.raises(UnsafeDatabaseSettings, match="synchronous_commit=off"):
        await PostgresEventStore.open(fresh_database_url)
    async with opened(fresh_database_url, allow_unsafe=True) as store:
        assert len(await store.append(_event())) == 1


async def test_refuses_synchronous_commit_off_for_the_session(fresh_database_url: str) -> None:
    # asyncpg passes unknown URL parameters as session settings.
    with pytest.raises(UnsafeDatabaseSettings):
        await PostgresEventStore.open(fresh_database_url + "?synchronous_commit=off")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_refuses_fsync_off() -> None:
    root = Path(tempfile.mkdtemp(prefix="azolla-unsafe-pg-"))
    await asyncio.to_thread(root.chmod, 0o755)
    cluster = LocalCluster(root / "data", settings={"fsync": "off"})
    try:
        dsn = await asyncio.to_thread(cluster.ensure_started)
        with pytest.raises(UnsafeDatabaseSettings, match="fsync=off"):
            await PostgresEventStore.open(dsn)
    finally:
        await asyncio.to_thread(cluster.destroy)
        shutil.rmtree(root, ignore_errors=True)


async def test_unreachable_database_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await PostgresEventStore.open(
            "postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=2
        )


# ------------------------------------------------------------------------------------------------
# Backpressure and failed batches


@contextlib.asynccontextmanager
async def writers_blocked(url: str) -> AsyncIterator[None]:
    """Hold the append advisory lock, so every batch waits (as if the disk were slow)."""
    async with connect(url) as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        try:
            yield
        finally:
            await tx.rollback()


async def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("depth", [1, 2])
async def test_full_queue_raises_overloaded_at_once(fresh_database_url: str, depth: int) -> None:
    async with opened(fresh_database_url, queue_limit=5, pipeline_depth=depth) as store:
        async with writers_blocked(fresh_database_url):
            in_flight: list[asyncio.Task[list[int]]] = []
            for _ in range(len(store._lanes)):  # one blocked batch per writer lane
                in_flight.append(asyncio.create_task(store.append(_event())))
                await asyncio.sleep(0)  # queued
                await _eventually(lambda: store._queued_events == 0)  # taken into a batch
            assert all(lane.busy for lane in store._lanes)
            queued = [asyncio.create_task(store.append(_event())) for _ in range(5)]
            await asyncio.sleep(0)
            started = time.monotonic()
            with pytest.raises(StoreOverloaded):
                await store.append(_event())
            assert time.monotonic() - started < 0.5
            assert not any(t.done() for t in in_flight)
        results = await asyncio.wait_for(asyncio.gather(*in_flight, *queued), 10)
        assert all(len(r) == 1 for r in results)
        assert len(await store.append(_event())) == 1


async def test_failed_batch_fails_only_its_callers(fresh_database_url: str) -> None:
    async with opened(fresh_database_url) as store, connect(fresh_database_url) as conn:
        await conn.execute(
            """
            CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.type = 'Poison.v1' THEN RAISE EXCEPTION 'poisoned batch'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER poison BEFORE INSERT ON azolla_events
                FOR EACH ROW EXECUTE FUNCTION poison();
            """
        )
        before = await store.append(_event())
        async with writers_blocked(fresh_database_url):
            first = asyncio.create_task(store.append(_event()))
            await asyncio.sleep(0)  # queued
            await _eventually(lambda: store._queued_events == 0)
            # These queue up behind the blocked batch and form the next batch together.
            doomed = [asyncio.create_task(store.append(_event())) for _ in range(5)]
            doomed.append(asyncio.create_task(store.append(_event(type="Poison.v1"))))
            await asyncio.sleep(0)
        assert len(await asyncio.wait_for(first, 10)) == 1
        outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), 10)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert "poisoned batch" in str(outcomes[0])
        after = await store.append(_event())
        assert after[0] > before[0]
        logged = await store.read_all()
        assert len(logged) == 3


# ------------------------------------------------------------------------------------------------
# Commit order across processes


@pytest.mark.parametrize("depth", [1, 2])
async def test_tailing_reader_never_misses_events_of_two_writers(
    fresh_database_url: str, depth: int
) -> None:
    async with (
        opened(fresh_database_url, pipeline_depth=depth) as a,
        opened(fresh_database_url, pipeline_depth=depth) as b,
        opened(fresh_database_url) as reader,
    ):
        total = 2 * 20 * 25
        seen: list[int] = []

        async def tail() -> None:
            after = 0
            for _ in range(100_000):  # bounded
                if len(seen) >= total:
                    return
                page = await reader.read_all(after, limit=500)
                if page:
                    seen.extend(e.position for e in page)
                    after = page[-1].position
                else:
                    await reader.wait_for_events(after, timeout=1)

        async def write(store: PostgresEventStore) -> list[int]:
            async def producer() -> list[int]:
                out: list[int] = []
                for _ in range(25):
                    out += await store.append(_event())
                return out

            parts = await asyncio.gather(*(producer() for _ in range(20)))
            return [p for part in parts for p in part]

        tailer = asyncio.create_task(tail())
        written = await asyncio.gather(write(a), write(b))
        await asyncio.wait_for(tailer, 30)
        assert sorted(seen) == sorted(written[0] + written[1])
        assert seen == sorted(seen)


# ------------------------------------------------------------------------------------------------
# Outage


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "depth"), [("fast", 1), ("immediate", 1), ("immediate", 2)])
async def test_survives_postgres_outage(
    pg_cluster: PostgresCluster, fresh_database_url: str, mode: str, depth: int
) -> None:
    store = await PostgresEventStore.open(
        fresh_database_url,
        backoff_initial=0.05,
        backoff_max=0.5,
        connect_timeout=2,
        pipeline_depth=depth,
    )
    observer = await PostgresEventStore.open(fresh_database_url, apply_migrations=False)
    stopped = False
    try:
        assert len(await store.append(_event())) == 1

        async def producer() -> list[object]:
            outcomes: list[object] = []
            for _ in range(200):  # bounded; stops at the first failure
                try:
                    outcomes.append(await store.append(_event()))
                except StoreUnavailable as exc:
                    outcomes.append(exc)
                    return outcomes
            return outcomes

        producers = [asyncio.create_task(producer()) for _ in range(20)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(pg_cluster.stop, mode)  # type: ignore[arg-type]
        stopped = True
        failed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*producers), 20)
        # Every producer ended with a clear StoreUnavailable, promptly.
        assert all(isinstance(r[-1], StoreUnavailable) for r in results)
        assert time.monotonic() - failed_at < 10
        # While the server is down, appends fail fast.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.append(_event())
        assert time.monotonic() - started < 3
        with pytest.raises(StoreUnavailable):
            await store.read_all()

        await asyncio.to_thread(pg_cluster.ensure_started)
        stopped = False
        # The same store object recovers on its own (bounded wait).
        deadline = time.monotonic() + 30
        while True:
            try:
                [position] = await store.append(_event())
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "store did not recover"
                await asyncio.sleep(0.1)
        logged = await store.read_all(limit=10_000)
        assert logged[-1].position == position
        acked = {p for r in results for o in r if isinstance(o, list) for p in o}
        assert acked <= {e.position for e in logged}  # nothing acknowledged was lost
        # The other store's listener reconnected too: it sees the new commit.
        waited = await observer.wait_for_events(position - 1, timeout=10)
        assert waited >= position
        # And its LISTEN works again for later commits.
        [later] = await store.append(_event())
        assert await observer.wait_for_events(position, timeout=10) >= later
    finally:
        if stopped:
            await asyncio.to_thread(pg_cluster.ensure_started)
        await store.close()
        await observer.close()
