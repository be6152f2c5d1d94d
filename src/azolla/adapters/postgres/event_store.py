"""PostgreSQL event store with group commit (the EventStream write path).

How an append travels:

1. :meth:`PostgresEventStore.append` validates the call, puts it with a future on a bounded queue
   (counted in events; full -> :class:`~azolla.domain.errors.StoreOverloaded` at once) and waits.
2. One writer task per store drains the queue: everything queued while the previous batch was
   committing forms the next batch (so a lone append commits at once and load gathers itself),
   up to ``max_batch`` events / ``max_batch_bytes`` payload bytes; optionally it lingers up to
   ``max_linger`` seconds for more when the previous batch showed concurrency.
3. The batch is ONE prepared statement, one round trip, one implicit transaction::

       WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(K)),
            ins AS (INSERT INTO azolla_events (...)
                    SELECT ... FROM lock, unnest(string_to_array($1::text, ...), ...)
                    RETURNING position)
       SELECT array_agg(position), pg_notify('azolla_events', max(position)::text) FROM ins

   The advisory lock is taken before any position is drawn and released after the commit is
   visible, so position order equals commit order even with several server processes; the NOTIFY
   is delivered at commit, one per batch.
4. Callers are answered (their futures resolved) only after the commit returned.

Failures: a unique violation fails only the conflicting appends (the writer finds them with one
query and commits the rest again); any other error raised by the database for the batch's data
(invalid JSON, a NUL character, ...) is isolated by bisection and fails only the offending
append, with :class:`ValueError`; a lost connection, a timeout or a server-side failure fails
the batch's callers with :class:`~azolla.domain.errors.StoreUnavailable` (when the connection
broke after the statement was sent, the outcome is unknown; the message says so). The writer then
reconnects with capped exponential backoff; meanwhile appends fail fast with StoreUnavailable;
once Postgres is back, appends succeed again without a restart.

Reads (``read_stream``, ``read_all``, ``max_position``) use a separate connection pool.
``wait_for_events`` wakes on the store's own commits in-process (no polling) and on other
processes' commits through LISTEN on the ``azolla_events`` channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from azolla.adapters._event_checks import MAX_PARTITION_DAY, check_new_events
from azolla.adapters.postgres.migrations import apply_migrations as _apply_migrations
from azolla.adapters.postgres.partitions import partition_start
from azolla.domain.errors import (
    ConcurrencyConflict,
    DuplicateTerminalOutcome,
    StoreOverloaded,
    StoreUnavailable,
    UnsafeDatabaseSettings,
)
from azolla.domain.ports import NewEvent, StoredEvent

__all__ = ["APPEND_LOCK_KEY", "NOTIFY_CHANNEL", "PostgresEventStore", "check_database_settings"]

_log = logging.getLogger(__name__)

#: Transaction-scoped advisory lock taken by every batch ("Azolla" in ASCII, then 0x0002).
APPEND_LOCK_KEY = 0x417A6F6C6C610002
#: LISTEN/NOTIFY channel; the payload is the batch's highest position.
NOTIFY_CHANNEL = "azolla_events"

_COLUMNS = (
    "position, stream_id, version, type, payload, domain, partition_day, terminal, recorded_at"
)
_READ_STREAM = (
    f"SELECT {_COLUMNS} FROM azolla_events WHERE stream_id = $1 AND version >= $2 ORDER BY version"
)
_READ_ALL = f"SELECT {_COLUMNS} FROM azolla_events WHERE position > $1 ORDER BY position LIMIT $2"
_MAX_POSITION = "SELECT coalesce(max(position), 0) FROM azolla_events"
_FIND_CONFLICTS = """
SELECT e.stream_id, e.version, false AS terminal_clash
FROM azolla_events e
JOIN unnest($1::uuid[], $2::int4[], $3::int4[]) AS k(stream_id, version, partition_day)
  ON e.stream_id = k.stream_id AND e.version = k.version AND e.partition_day = k.partition_day
UNION ALL
SELECT e.stream_id, e.version, true
FROM azolla_events e
JOIN unnest($4::uuid[], $5::int4[]) AS t(stream_id, partition_day)
  ON e.stream_id = t.stream_id AND e.partition_day = t.partition_day AND e.terminal
"""
_KNOWN_PARTITIONS = """
SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'azolla_events'::regclass
"""

_SERVER_SETTINGS = {"application_name": "azolla-event-store", "jit": "off"}


#: Separates the domains and the type names packed into one text parameter (ASCII unit
#: separator; a batch where one of them contains it, or is empty, goes as arrays instead).
_SEP = "\x1f"


def _insert_sql(lock: bool, notify: bool, packed: bool = True) -> str:
    """The batch insert. ``packed``: every column travels as one parameter, not as an array:
    asyncpg checks every array element against three ``collections.abc`` classes in Python
    (~1.7 us of client CPU per event for the stream ids and payloads alone, against ~0.35 us
    packed). Stream ids are 16 bytes each in one ``bytea``; domains, type names and payloads
    are joined by ``\x1f`` (JSON text never holds a raw control character); versions and days
    by commas; terminal flags are one ``t``/``f`` character each."""
    lock_cte = (
        f"lock AS MATERIALIZED (SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY}) AS locked), "
        if lock
        else ""
    )
    notify_col = f", pg_notify('{NOTIFY_CHANNEL}', max(position)::text)" if notify else ""
    if packed:
        columns = ("u.domain, encode(substr($2::bytea, u.o::int4 * 16 - 15, 16), 'hex')::uuid, "
                   "u.version::int4, u.type, u.payload::json, u.partition_day::int4, "
                   "substr($7::text, u.o::int4, 1) = 't'")
        source = ("unnest(string_to_array($1::text, E'\\x1f'), "
                  "string_to_array($3::text, ','), string_to_array($4::text, E'\\x1f'), "
                  "string_to_array($5::text, E'\\x1f'), string_to_array($6::text, ',')) "
                  "WITH ORDINALITY AS u(domain, version, type, payload, partition_day, o)")
    else:
        columns = ("u.domain, u.stream_id, u.version, u.type, u.payload::json, "
                   "u.partition_day, u.terminal")
        source = ("unnest($1::text[], $2::uuid[], $3::int4[], $4::text[], $5::text[], "
                  "$6::int4[], $7::bool[]) "
                  "AS u(domain, stream_id, version, type, payload, partition_day, terminal)")
    return f"""
WITH {lock_cte}ins AS (
    INSERT INTO azolla_events (domain, stream_id, version, type, payload, partition_day, terminal)
    SELECT {columns}
    FROM {"lock, " if lock else ""}{source}
    RETURNING position
)
SELECT array_agg(position){notify_col} FROM ins
"""


def _packable(texts: list[str], packed: str) -> bool:
    """True when ``packed`` (``texts`` joined by :data:`_SEP`) splits back into ``texts``."""
    return packed.count(_SEP) == len(texts) - 1 and "" not in texts


_Pending = tuple[Sequence[NewEvent], "asyncio.Future[list[int]]"]
"""One queued append: its events and the future its caller awaits (a tuple: cheap to make)."""


class _Lane:
    """One writer connection and its prepared insert. The store pipelines batches over
    ``pipeline_depth`` lanes: while one batch commits, the next one is sent on another lane and
    waits for the append lock, so Python work overlaps the database's."""

    __slots__ = ("busy", "conn", "insert", "insert_arrays", "pid")

    def __init__(self) -> None:
        self.conn: Any = None
        self.insert: Any = None
        self.insert_arrays: Any = None
        self.pid = 0
        self.busy = False

    def usable(self) -> bool:
        return self.conn is not None and (self.busy or not self.conn.is_closed())


@dataclass(frozen=True, slots=True)
class _Options:
    max_batch: int
    max_batch_bytes: int
    max_linger: float
    queue_limit: int
    allow_unsafe: bool
    pool_size: int
    commit_timeout: float
    connect_timeout: float
    backoff_initial: float
    backoff_max: float
    lock: bool
    notify: bool
    listen: bool
    pipeline_depth: int


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # client-side encoding error
        return False
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InternalClientError,
    )


def _is_data_error(exc: BaseException) -> bool:
    """True for errors caused by the values of one append (isolated by bisection)."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state.startswith(("22", "23", "54"))  # data exception, integrity, size limit
    return isinstance(exc, UnicodeError | ValueError | TypeError | OverflowError)


async def check_database_settings(conn: Any) -> list[str]:
    """Return the unsafe durability settings of a session (empty when safe).

    Args:
        conn: An ``asyncpg.Connection``.

    Returns:
        Human-readable problems, e.g. ``["synchronous_commit=off"]``.
    """
    problems: list[str] = []
    fsync = await conn.fetchval("SHOW fsync")
    if str(fsync).lower() != "on":
        problems.append(f"fsync={fsync}")
    sync_commit = await conn.fetchval("SHOW synchronous_commit")
    if str(sync_commit).lower() == "off":
        problems.append(f"synchronous_commit={sync_commit}")
    return problems


class PostgresEventStore:
    """The :class:`~azolla.domain.ports.EventStore` port on PostgreSQL (asyncpg), group commit.

    Create it with :meth:`open`; one store is one writer. See the module docstring for how
    appends are batched, and what each failure becomes.
    """

    def __init__(self, dsn: str, options: _Options) -> None:
        """Do not call directly: use :meth:`open`."""
        self._dsn = dsn
        self._opts = options
        self._insert_sql = _insert_sql(options.lock, options.notify)
        self._insert_arrays_sql = _insert_sql(options.lock, options.notify, packed=False)
        self._queue: deque[_Pending] = deque()
        self._queue_limit = options.queue_limit
        self._loop: asyncio.AbstractEventLoop  # set by _start
        self._queued_events = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._lanes = [_Lane() for _ in range(options.pipeline_depth)]
        self._inflight: set[asyncio.Task[None]] = set()
        self._own_pids: set[int] = set()
        self._unavailable: str | None = "not started"
        self._closing = False
        self._closed = False
        self._known_days: set[int] = set()
        self._ahead_checked_day = -1
        self._last_position = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._prev_batch_appends = 0
        self._prev_batch_events = 0
        self._pool: Any = None
        self._writer_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._close_event = asyncio.Event()
        self.batches_committed = 0
        """Number of batches committed (statistics, for benchmarks and tests)."""
        self.events_committed = 0
        """Number of events committed (statistics)."""

    # ----------------------------------------------------------------------------------------
    # Opening and closing

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        max_batch: int = 1000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        max_linger: float = 0.0,
        queue_limit: int = 20_000,
        allow_unsafe: bool = False,
        apply_migrations: bool = True,
        pool_size: int = 4,
        commit_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        cross_process_lock: bool = True,
        notify: bool = True,
        listen: bool = True,
        pipeline_depth: int = 1,
    ) -> PostgresEventStore:
        """Connect, check durability settings, migrate, and start the writer.

        Args:
            dsn: libpq connection URL.
            max_batch: Most events committed in one batch (an append larger than this is
                committed alone).
            max_batch_bytes: Most payload characters in one batch (at least one append).
            max_linger: Seconds the writer may wait for more appends before committing a batch
                that is smaller than the previous one, when the previous one held several
                appends (0 = commit as soon as the previous batch is done; group commit then
                happens on its own while a batch is in flight).
            queue_limit: Most events waiting for a batch; beyond it ``append`` raises
                ``StoreOverloaded`` (an append larger than the limit is accepted only when the
                queue is empty).
            allow_unsafe: Run even when ``fsync`` or ``synchronous_commit`` is off.
            apply_migrations: Apply pending schema migrations first.
            pool_size: Connections of the read pool.
            commit_timeout: Seconds a batch may take before the connection is considered lost.
            connect_timeout: Seconds per connection attempt.
            backoff_initial: First reconnection delay, seconds (doubles, with jitter).
            backoff_max: Largest reconnection delay, seconds.
            cross_process_lock: Take the append advisory lock in every batch, so that position
                order equals commit order across processes writing the same log.
            notify: NOTIFY ``azolla_events`` with each batch (for other processes' waiters).
            listen: LISTEN for other processes' commits (for ``wait_for_events``).
            pipeline_depth: Batches in flight at once, each on its own writer connection. With
                2, the next batch is sent while the previous one commits and waits for the
                append lock, so position order stays commit order while Python, the network
                and the database work at the same time: worth it when the database is remote
                (a round trip per batch to hide) or has cores to spare. On a 2-core machine
                with a local server it measured no better than 1 (smaller batches cost more
                per event than the overlap saves; see docs/benchmarks.md). Forced to 1
                without ``cross_process_lock`` (nothing would then order the commits).

        Returns:
            A running store.

        Raises:
            UnsafeDatabaseSettings: If fsync or synchronous_commit is off and not
                ``allow_unsafe``.
            StoreUnavailable: If the database cannot be reached.
        """
        if max_batch < 1 or queue_limit < 1 or max_batch_bytes < 1 or pipeline_depth < 1:
            raise ValueError(
                "max_batch, max_batch_bytes, queue_limit and pipeline_depth must be >= 1"
            )
        options = _Options(
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            max_linger=max_linger,
            queue_limit=queue_limit,
            allow_unsafe=allow_unsafe,
            pool_size=pool_size,
            commit_timeout=commit_timeout,
            connect_timeout=connect_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            lock=cross_process_lock,
            notify=notify,
            listen=listen,
            pipeline_depth=pipeline_depth if cross_process_lock else 1,
        )
        store = cls(dsn, options)
        try:
            await store._start(apply_migrations)
        except BaseException:
            await store._release()
            raise
        return store

    async def _start(self, migrate: bool) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            conn = await self._connect()
            try:
                if migrate:
                    await _apply_migrations(conn)
            except BaseException:
                conn.terminate()
                raise
            await self._setup_lanes(conn)  # terminates the connection if it fails
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._opts.pool_size,
                timeout=self._opts.connect_timeout,
                server_settings=_SERVER_SETTINGS,
            )
        except (UnsafeDatabaseSettings, StoreUnavailable):
            raise
        except Exception as exc:
            if _is_connection_error(exc):
                raise StoreUnavailable(f"event store database unreachable: {exc!r}") from exc
            raise
        loop = asyncio.get_running_loop()
        if self._opts.listen:
            ready: asyncio.Future[None] = loop.create_future()
            self._listener_task = asyncio.create_task(
                self._listener_main(ready), name="azolla-event-store-listener"
            )
            # LISTEN before reading max(position), so no commit falls between the two.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ready), self._opts.connect_timeout)
        self._note_position(await self._fetch_max_position())
        self._writer_task = asyncio.create_task(self._writer_main(), name="azolla-event-writer")

    async def _connect(self) -> Any:
        """Open a connection and check its durability settings."""
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._opts.connect_timeout,
            server_settings=_SERVER_SETTINGS,
        )
        try:
            problems = await check_database_settings(conn)
            if problems and not self._opts.allow_unsafe:
                raise UnsafeDatabaseSettings(
                    "refusing to run: " + ", ".join(problems) + " (committed events could be"
                    " lost on a crash; pass allow_unsafe=True to run anyway)"
                )
            if problems:
                _log.warning("event store running with unsafe settings: %s", ", ".join(problems))
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _setup_lanes(self, first: Any | None) -> None:
        """Connect every lane that has no connection (``first``, if given, is a fresh checked
        connection to use); refresh the partition cache and create the partitions ahead.

        Lanes connected before a failure stay connected; the caller retries the rest.
        """
        for lane in self._lanes:
            if lane.conn is not None:
                continue
            conn = first if first is not None else await self._connect()
            first = None
            try:
                if not self._own_pids:  # first lane of this (re)connection: refresh the cache
                    self._known_days = set()
                    self._load_partition_bounds(await conn.fetch(_KNOWN_PARTITIONS))
                    self._ahead_checked_day = -1
                    await self._ensure_days(conn, {self._today(), self._today() + 7})
                lane.insert = await conn.prepare(self._insert_sql)
                lane.insert_arrays = await conn.prepare(self._insert_arrays_sql)
                conn.add_termination_listener(self._on_writer_terminated)
            except BaseException:
                conn.terminate()
                raise
            lane.conn = conn
            lane.pid = conn.get_server_pid()
            self._own_pids.add(lane.pid)
        self._unavailable = None

    @property
    def writer_pids(self) -> list[int]:
        """Server process ids of the writer connections (for diagnostics and benchmarks)."""
        return [lane.pid for lane in self._lanes if lane.conn is not None]

    def _load_partition_bounds(self, rows: Sequence[Any]) -> None:
        for row in rows:
            bound = str(row[0])
            if "FROM (" not in bound:
                continue
            lo_text, hi_text = bound.split("FROM (", 1)[1].split(") TO (", 1)
            self._known_days.update(range(int(lo_text), int(hi_text.rstrip(")"))))

    @staticmethod
    def _today() -> int:
        return int(time.time() // 86400)

    async def _ensure_days(self, conn: Any, days: set[int]) -> None:
        for start in sorted({partition_start(d) for d in days if d not in self._known_days}):
            try:
                await conn.fetchval("SELECT azolla_ensure_event_partition($1)", start)
            except asyncpg.PostgresError as exc:
                if _is_connection_error(exc):
                    raise
                # The DEFAULT partition takes the rows; a later call moves them.
                _log.warning("could not create the partition for day %d: %r", start, exc)
                continue
            self._known_days.update(range(start, start + 7))

    def _on_writer_terminated(self, conn: Any) -> None:
        if any(lane.conn is conn for lane in self._lanes):
            self._wake_writer()

    async def close(self) -> None:
        """Flush pending appends, stop the writer and release connections.

        Appends queued before the call are committed (or failed, if the database is down);
        appends made after it raise ``StoreUnavailable``. Idempotent.
        """
        if self._closed:
            return
        self._closing = True
        self._close_event.set()
        self._wake_writer()
        if self._writer_task is not None:
            with contextlib.suppress(Exception):
                await self._writer_task
        await self._release()

    async def _release(self) -> None:
        self._closing = True
        self._closed = True
        self._close_event.set()
        if self._unavailable is None:
            self._unavailable = "event store is closed"
        for task in (self._listener_task, self._writer_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._fail_queued(StoreUnavailable("event store is closed"))
        for lane in self._lanes:
            if lane.conn is not None:
                conn, lane.conn, lane.insert, lane.insert_arrays = lane.conn, None, None, None
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except BaseException:
                    conn.terminate()
        self._own_pids.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except BaseException:
                pool.terminate()
        self._wake_waiters()

    # ----------------------------------------------------------------------------------------
    # Appending

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Append ``events`` atomically; return their positions once committed.

        A caller cancelled before its batch is sent records nothing; one cancelled later may
        still have its events recorded (as with any database call).

        Args:
            events: The events; all are committed in one transaction, or none.

        Returns:
            The positions assigned, in the order of ``events``.

        Raises:
            ConcurrencyConflict: A ``(stream_id, version)`` exists already, or repeats in the call.
            DuplicateTerminalOutcome: A stream would get a second terminal event.
            StoreOverloaded: The queue is full; nothing was queued.
            StoreUnavailable: The database is unreachable or the store is closed; or the commit
                failed (if the connection broke after sending, the outcome is unknown and the
                message says so).
            ValueError: The events are invalid (version < 1, partition day out of range) or the
                database refused their values (payload that is not JSON, NUL characters).
        """
        n = len(events)
        if n == 0:
            return []
        if self._unavailable is not None or self._closing:
            reason = "event store is closed" if self._closing else self._unavailable
            raise StoreUnavailable(f"event store unavailable: {reason}")
        queued = self._queued_events
        if queued + n > self._queue_limit and queued > 0:
            raise StoreOverloaded(
                f"event store queue full ({queued} events waiting, limit {self._queue_limit})"
            )
        if n == 1:
            event = events[0]
            if event.version < 1 or not 0 <= event.partition_day <= MAX_PARTITION_DAY:
                check_new_events(events)  # raises ValueError
        else:
            check_new_events(events)
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._queue.append((events, future))
        self._queued_events = queued + n
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await future

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            _events, future = self._queue.popleft()
            if not future.done():
                future.set_exception(error)
        self._queued_events = 0

    async def _writer_main(self) -> None:
        """Dispatch queued appends to free lanes; reconnect lanes whose connection broke."""
        loop = asyncio.get_running_loop()
        lanes = self._lanes
        try:
            while True:
                if not all(lane.usable() for lane in lanes):
                    if self._inflight:  # let the other lanes finish first
                        await self._wait_wakeup(loop)
                        continue
                    for lane in lanes:
                        if lane.conn is not None and not lane.usable():
                            self._lose_lane(lane, "connection closed")
                    if self._closing:
                        self._fail_queued(StoreUnavailable("event store is closed"))
                        return
                    await self._reconnect()
                    continue
                if not self._queue:
                    if self._closing and not self._inflight:
                        return
                    await self._wait_wakeup(loop)
                    continue
                free = [lane for lane in lanes if not lane.busy]
                if not free:
                    await self._wait_wakeup(loop)
                    continue
                if (
                    self._opts.max_linger > 0
                    and len(free) == len(lanes)
                    and self._prev_batch_appends > 1
                    and self._queued_events < min(self._prev_batch_events, self._opts.max_batch)
                    and not self._closing
                ):
                    await self._linger(loop)
                # Share what is queued between the free lanes (an idle store sends a lone
                # append at once on one lane; a busy one keeps every lane fed).
                for index, lane in enumerate(free):
                    share = -(-self._queued_events // (len(free) - index))
                    batch = self._take_batch(share)
                    if not batch:
                        break
                    lane.busy = True
                    task = loop.create_task(self._run_batch(lane, batch))
                    self._inflight.add(task)
                    if not self._queue:
                        break
        except asyncio.CancelledError:
            for task in list(self._inflight):
                task.cancel()
            self._fail_queued(StoreUnavailable("event store is closed"))
            raise
        except BaseException as exc:  # pragma: no cover - a bug; never leave callers hanging
            _log.exception("event store writer crashed")
            self._unavailable = f"writer crashed: {exc!r}"
            self._fail_queued(StoreUnavailable(f"event store writer crashed: {exc!r}"))
            raise

    async def _wait_wakeup(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wakeup = loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _run_batch(self, lane: _Lane, batch: list[_Pending]) -> None:
        """Commit one batch on one lane; always answers every caller of the batch."""
        try:
            await self._commit(batch, lane)
        except asyncio.CancelledError:
            self._settle_error(
                batch, StoreUnavailable("event store is closed (the commit outcome is unknown)")
            )
            raise
        except BaseException as exc:  # pragma: no cover - a bug; never leave callers hanging
            _log.exception("event store batch crashed")
            self._settle_error(batch, StoreUnavailable(f"event store batch crashed: {exc!r}"))
        finally:
            lane.busy = False
            task = asyncio.current_task()
            if task is not None:
                self._inflight.discard(task)
            self._wake_writer()

    async def _linger(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (yielding to the loop) until the queue is as full as the previous batch, or the
        linger time is up."""
        target = min(self._prev_batch_events, self._opts.max_batch)
        deadline = loop.time() + self._opts.max_linger
        for _ in range(10_000):
            if self._queued_events >= target or loop.time() >= deadline:
                return
            await asyncio.sleep(0)

    def _take_batch(self, limit: int) -> list[_Pending]:
        """Pop the next batch (up to ``limit`` events) off the queue, leaving out cancelled
        callers."""
        batch: list[_Pending] = []
        events = 0
        nbytes = 0
        queue = self._queue
        max_batch = min(self._opts.max_batch, max(limit, 1))
        max_bytes = self._opts.max_batch_bytes
        while queue:
            pending = queue[0]
            appended = pending[0]
            n = len(appended)
            size = len(appended[0].payload) if n == 1 else sum(len(e.payload) for e in appended)
            if batch and (events + n > max_batch or nbytes + size > max_bytes):
                break
            queue.popleft()
            self._queued_events -= n
            if pending[1].done():  # the caller was cancelled: not sent, not recorded
                continue
            batch.append(pending)
            events += n
            nbytes += size
        return batch

    async def _commit(self, batch: list[_Pending], lane: _Lane) -> None:
        """Commit a batch on ``lane``; answer every caller in it (positions or an error)."""
        events: list[NewEvent] = []
        for appended, _future in batch:
            events.extend(appended)
        single = len(events) == len(batch)  # one event per append (the common case)
        if len(batch) > 1 and len({e.stream_id.int for e in events}) < len(events):
            # Some stream appears twice: look for collisions between appends (slow path).
            batch = self._drop_in_batch_conflicts(batch)
            if not batch:
                return
            events = []
            for appended, _future in batch:
                events.extend(appended)
            single = len(events) == len(batch)
        days = [e.partition_day for e in events]
        conn = lane.conn
        sent = False
        try:
            today = self._today()
            needed = set(days)
            if today != self._ahead_checked_day:
                needed.add(today + 7)
            if not needed.issubset(self._known_days):
                await self._ensure_days(conn, needed)
            self._ahead_checked_day = today
            sent = True
            domains = [e.domain for e in events]
            types = [e.type for e in events]
            payloads = [e.payload for e in events]
            packed_domains = _SEP.join(domains)
            packed_types = _SEP.join(types)
            packed_payloads = _SEP.join(payloads)
            if (_packable(domains, packed_domains) and _packable(types, packed_types)
                    and _packable(payloads, packed_payloads)):
                row = await lane.insert.fetchrow(
                    packed_domains,
                    b"".join([e.stream_id.int.to_bytes(16, "big") for e in events]),
                    ",".join(map(str, [e.version for e in events])),
                    packed_types,
                    packed_payloads,
                    ",".join(map(str, days)),
                    "".join(["t" if e.terminal else "f" for e in events]),
                    timeout=self._opts.commit_timeout,
                )
            else:
                row = await lane.insert_arrays.fetchrow(
                    domains,
                    [e.stream_id for e in events],
                    [e.version for e in events],
                    types,
                    payloads,
                    days,
                    [e.terminal for e in events],
                    timeout=self._opts.commit_timeout,
                )
        except asyncpg.UniqueViolationError:
            await self._resolve_conflicts(batch, lane)
            return
        except Exception as exc:
            await self._handle_failure(batch, exc, sent, lane)
            return
        positions: list[int] = row[0]
        if len(positions) != len(events):  # pragma: no cover - would be a bug in the statement
            self._settle_error(
                batch, StoreUnavailable("event store returned an unexpected number of positions")
            )
            return
        self.batches_committed += 1
        self.events_committed += len(positions)
        self._prev_batch_appends = len(batch)
        self._prev_batch_events = len(positions)
        if single:
            for (_appended, future), position in zip(batch, positions, strict=True):
                if not future.done():
                    future.set_result([position])
        else:
            start = 0
            for appended, future in batch:
                end = start + len(appended)
                if not future.done():
                    future.set_result(positions[start:end])
                start = end
        self._note_position(positions[-1])

    def _drop_in_batch_conflicts(self, batch: list[_Pending]) -> list[_Pending]:
        """Fail the appends that collide with an earlier append of the same batch."""
        if len(batch) < 2:
            return batch
        keys: set[tuple[UUID, int]] = set()
        terminal: set[UUID] = set()
        kept: list[_Pending] = []
        for pending in batch:
            appended, future = pending
            error: ConcurrencyConflict | None = None
            for e in appended:
                if e.terminal and e.stream_id in terminal:
                    error = DuplicateTerminalOutcome(
                        f"stream {e.stream_id} already has a terminal event"
                    )
                    break
                if (e.stream_id, e.version) in keys:
                    error = ConcurrencyConflict(
                        f"stream {e.stream_id} version {e.version} already exists"
                    )
                    break
            if error is not None:
                if not future.done():
                    future.set_exception(error)
                continue
            for e in appended:
                keys.add((e.stream_id, e.version))
                if e.terminal:
                    terminal.add(e.stream_id)
            kept.append(pending)
        return kept

    async def _resolve_conflicts(self, batch: list[_Pending], lane: _Lane) -> None:
        """After a unique violation: fail the appends that conflict with the log, retry the rest."""
        try:
            stream_ids: list[UUID] = []
            versions: list[int] = []
            days: list[int] = []
            term_ids: list[UUID] = []
            term_days: list[int] = []
            for appended, _future in batch:
                for e in appended:
                    stream_ids.append(e.stream_id)
                    versions.append(e.version)
                    days.append(e.partition_day)
                    if e.terminal:
                        term_ids.append(e.stream_id)
                        term_days.append(e.partition_day)
            rows = await lane.conn.fetch(
                _FIND_CONFLICTS,
                stream_ids,
                versions,
                days,
                term_ids,
                term_days,
                timeout=self._opts.commit_timeout,
            )
        except Exception as exc:
            await self._handle_failure(batch, exc, False, lane)
            return
        existing = {(r[0], r[1]) for r in rows if not r[2]}
        terminal_streams = {r[0] for r in rows if r[2]}
        rest: list[_Pending] = []
        for pending in batch:
            appended, future = pending
            error: ConcurrencyConflict | None = None
            for e in appended:
                if e.terminal and e.stream_id in terminal_streams:
                    error = DuplicateTerminalOutcome(
                        f"stream {e.stream_id} already has a terminal event"
                    )
                    break
                if (e.stream_id, e.version) in existing:
                    error = ConcurrencyConflict(
                        f"stream {e.stream_id} version {e.version} already exists"
                    )
                    break
            if error is None:
                rest.append(pending)
            elif not future.done():
                future.set_exception(error)
        if len(rest) == len(batch):
            # The offenders could not be told apart (they committed and vanished?): split.
            if len(batch) == 1:
                self._settle_error(
                    batch, ConcurrencyConflict("append conflicts with events in the log")
                )
                return
            half = len(batch) // 2
            await self._commit(batch[:half], lane)
            await self._commit(batch[half:], lane)
            return
        if rest:
            await self._commit(rest, lane)

    async def _handle_failure(
        self, batch: list[_Pending], exc: Exception, sent: bool, lane: _Lane
    ) -> None:
        conn = lane.conn
        if _is_connection_error(exc) or conn is None or conn.is_closed():
            outcome = " (the commit outcome is unknown)" if sent else ""
            self._settle_error(
                batch, StoreUnavailable(f"event store connection lost{outcome}: {exc!r}")
            )
            self._lose_lane(lane, repr(exc))
            return
        if _is_data_error(exc):
            if len(batch) == 1:
                self._settle_error(batch, ValueError(f"events refused by the database: {exc}"))
                return
            half = len(batch) // 2
            await self._commit(batch[:half], lane)
            await self._commit(batch[half:], lane)
            return
        _log.warning("event store batch of %d append(s) failed: %r", len(batch), exc)
        self._settle_error(batch, StoreUnavailable(f"event store commit failed: {exc!r}"))

    @staticmethod
    def _settle_error(batch: list[_Pending], error: Exception) -> None:
        for _appended, future in batch:
            if not future.done():
                future.set_exception(error)

    def _lose_lane(self, lane: _Lane, reason: str) -> None:
        """Mark the store unavailable, drop the lane's connection, fail what is queued."""
        if lane.conn is not None:
            conn, lane.conn, lane.insert, lane.insert_arrays = lane.conn, None, None, None
            self._own_pids.discard(lane.pid)
            conn.terminate()
        self._unavailable = f"database connection lost: {reason}"
        _log.warning("event store writer lost its connection: %s", reason)
        self._fail_queued(StoreUnavailable(f"event store unavailable: {reason}"))

    async def _reconnect(self) -> None:
        """Reconnect the writer with capped exponential backoff (returns when connected or
        closing)."""
        delay = self._opts.backoff_initial
        while not self._closing:
            try:
                await self._setup_lanes(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._unavailable = f"reconnecting: {exc!r}"
                self._fail_queued(StoreUnavailable(f"event store unavailable: {exc!r}"))
                _log.info("event store reconnect failed, retrying in %.2fs: %r", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_event.wait(), delay * random.uniform(1, 1.5))
                delay = min(delay * 2, self._opts.backoff_max)
                continue
            _log.info("event store writer reconnected")
            return

    # ----------------------------------------------------------------------------------------
    # Reading and waiting

    async def read_stream(self, stream_id: UUID, from_version: int = 1) -> list[StoredEvent]:
        """Return the events of one stream in version order, from ``from_version``.

        Raises:
            StoreUnavailable: If the database cannot be reached or the store is closed.
        """
        rows = await self._read(_READ_STREAM, stream_id, from_version)
        return [_stored(r) for r in rows]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Return up to ``limit`` committed events with position > ``after_position``, in order.

        Raises:
            StoreUnavailable: If the database cannot be reached or the store is closed.
        """
        if limit <= 0:
            return []
        rows = await self._read(_READ_ALL, after_position, limit)
        events = [_stored(r) for r in rows]
        if events:
            self._note_position(events[-1].position)
        return events

    async def max_position(self) -> int:
        """Return the highest committed position (0 for an empty log).

        Raises:
            StoreUnavailable: If the database cannot be reached or the store is closed.
        """
        position = await self._fetch_max_position()
        self._note_position(position)
        return max(position, self._last_position)

    async def _fetch_max_position(self) -> int:
        rows = await self._read(_MAX_POSITION)
        return int(rows[0][0])

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        pool = self._pool
        if pool is None or self._closed:
            raise StoreUnavailable("event store is closed")
        try:
            async with pool.acquire(timeout=self._opts.connect_timeout) as conn:
                result: list[Any] = await conn.fetch(sql, *args, timeout=self._opts.commit_timeout)
                return result
        except Exception as exc:
            if _is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError):
                raise StoreUnavailable(f"event store read failed: {exc!r}") from exc
            raise

    async def wait_for_events(self, after_position: int, timeout: float) -> int:
        """Wait until an event with position > ``after_position`` is committed, or ``timeout``.

        Wakes on this store's own commits without touching the database, and on other
        processes' commits through LISTEN/NOTIFY.

        Returns:
            The highest committed position known (``<= after_position`` on timeout).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._last_position <= after_position and not self._closed:
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
        return self._last_position

    def _note_position(self, position: int) -> None:
        if position > self._last_position:
            self._last_position = position
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _listener_main(self, ready: asyncio.Future[None]) -> None:
        """Hold a LISTEN connection; reconnect with backoff; catch up after each reconnect."""
        delay = self._opts.backoff_initial
        while not self._closing:
            lost = asyncio.Event()
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._opts.connect_timeout,
                    server_settings=_SERVER_SETTINGS,
                )
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self._note_position(
                    int(await conn.fetchval(_MAX_POSITION, timeout=self._opts.commit_timeout))
                )
                if not ready.done():
                    ready.set_result(None)
                delay = self._opts.backoff_initial
                closing = asyncio.ensure_future(self._close_event.wait())
                lost_wait = asyncio.ensure_future(lost.wait())
                try:
                    await asyncio.wait({closing, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                    lost_wait.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.info("event store listener: %r; retrying in %.2fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_event.wait(), delay * random.uniform(1, 1.5))
                delay = min(delay * 2, self._opts.backoff_max)
            finally:
                if conn is not None:
                    conn.terminate()

    def _on_notify(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return
        with contextlib.suppress(ValueError):
            self._note_position(int(payload))


def _setter(event: asyncio.Event) -> Any:
    def callback(_conn: Any) -> None:
        event.set()

    return callback


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                       row[8].timestamp())
