"""Weekly partitions of ``azolla_events``: creation ahead of time and retention.

The partition scheme is described in ``migrations/0001_events.sql``: one partition per week
(Monday to Sunday) of the streams' creation day, plus a DEFAULT partition as a safety net.

Retention drops whole partitions (``DETACH`` then ``DROP``), never ``DELETE``s rows. A partition
is dropped only when every *task stream* in it is finished: a task stream is a stream whose first
event (version 1) has type ``TaskSubmitted.v1``; it is finished when it has a terminal event.
Non-task streams (attempts, shepherds) do not hold a partition back.

Example:
    >>> report = await drop_partitions_older_than(conn, cutoff_day=today - 30)  # doctest: +SKIP
    >>> report.dropped  # doctest: +SKIP
    ['azolla_events_20240101']
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

__all__ = [
    "TASK_SUBMITTED_TYPE",
    "PartitionInfo",
    "RetentionReport",
    "day_of",
    "drop_partitions_older_than",
    "ensure_partitions",
    "list_partitions",
    "partition_name",
    "partition_start",
    "today",
]

#: Event type that starts a task stream.
TASK_SUBMITTED_TYPE = "TaskSubmitted.v1"

_EPOCH = dt.date(1970, 1, 1)
_WEEK = 7


def partition_start(day: int) -> int:
    """Return the first day (a Monday) of the weekly partition holding ``day``.

    Args:
        day: Days since 1970-01-01 (UTC).
    """
    return day - (day - 4) % _WEEK  # day 4 (1970-01-05) was a Monday


def partition_name(day: int) -> str:
    """Return the name of the weekly partition holding ``day`` (``azolla_events_YYYYMMDD``)."""
    start = _EPOCH + dt.timedelta(days=partition_start(day))
    return f"azolla_events_{start:%Y%m%d}"


def day_of(moment: dt.datetime | dt.date) -> int:
    """Return the day number (days since 1970-01-01 UTC) of a date or an aware datetime."""
    if isinstance(moment, dt.datetime):
        moment = moment.astimezone(dt.UTC).date()
    return (moment - _EPOCH).days


def today() -> int:
    """Return today's day number (UTC)."""
    return day_of(dt.datetime.now(dt.UTC))


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition of ``azolla_events``.

    Attributes:
        name: Table name.
        first_day: First day covered (inclusive); None for the DEFAULT partition.
        end_day: First day not covered (exclusive); None for the DEFAULT partition.
    """

    name: str
    first_day: int | None
    end_day: int | None

    @property
    def is_default(self) -> bool:
        """True for the DEFAULT (catch-all) partition."""
        return self.first_day is None


@dataclass(slots=True)
class RetentionReport:
    """What :func:`drop_partitions_older_than` did.

    Attributes:
        dropped: Partitions detached and dropped (or kept as archive tables), oldest first.
        skipped: ``{partition: reason}`` for old partitions left in place (unfinished tasks, or
            a lock that could not be taken in time).
        archived: ``{partition: where}`` (file path or table name) for archived partitions.
    """

    dropped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    archived: dict[str, str] = field(default_factory=dict)


async def ensure_partitions(conn: Any, days: Iterable[int]) -> list[str]:
    """Create (unless present) the weekly partitions holding ``days``.

    Args:
        conn: An ``asyncpg.Connection``.
        days: Day numbers; one call per distinct week.

    Returns:
        The names of the partitions, one per distinct week, in ascending order.
    """
    starts = sorted({partition_start(d) for d in days})
    names: list[str] = []
    for start in starts:
        names.append(str(await conn.fetchval("SELECT azolla_ensure_event_partition($1)", start)))
    return names


async def list_partitions(conn: Any) -> list[PartitionInfo]:
    """Return the partitions of ``azolla_events``: weekly ones by first day, DEFAULT last.

    Args:
        conn: An ``asyncpg.Connection``.
    """
    rows = await conn.fetch(
        """
        SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'azolla_events'::regclass
        """
    )
    found: list[PartitionInfo] = []
    default: list[PartitionInfo] = []
    for row in rows:
        bound = str(row["bound"])
        if bound == "DEFAULT":
            default.append(PartitionInfo(str(row["name"]), None, None))
            continue
        # "FOR VALUES FROM (19695) TO (19702)"
        lo_text, hi_text = bound.split("FROM (", 1)[1].split(") TO (", 1)
        found.append(PartitionInfo(str(row["name"]), int(lo_text), int(hi_text.rstrip(")"))))
    found.sort(key=lambda p: p.first_day or 0)
    return found + default


async def _unfinished_tasks(conn: Any, table: str, after_position: int = 0) -> int:
    ident = _quote_ident(table)
    value = await conn.fetchval(
        f"""
        SELECT count(*) FROM {ident} s
        WHERE s.position > $1 AND s.version = 1 AND s.type = $2
          AND NOT EXISTS (SELECT 1 FROM {ident} t
                          WHERE t.stream_id = s.stream_id AND t.partition_day = s.partition_day
                            AND t.terminal)
        """,
        after_position,
        TASK_SUBMITTED_TYPE,
    )
    return int(value)


async def drop_partitions_older_than(
    conn: Any,
    cutoff_day: int,
    *,
    archive_dir: str | os.PathLike[str] | None = None,
    keep_as_table: bool = False,
    lock_timeout: float = 2.0,
) -> RetentionReport:
    """Drop the weekly partitions that end on or before ``cutoff_day`` and hold no unfinished task.

    For each candidate partition (all its days ``< cutoff_day``), oldest first:

    1. count unfinished task streams without any lock (a scan of that partition only); skip the
       partition if there are some;
    2. in a short transaction: take ``ACCESS EXCLUSIVE`` on ``azolla_events`` (waiting at most
       ``lock_timeout``; writers pause meanwhile), re-check only the rows appended since step 1
       (through the position index), ``DETACH`` the partition and rename it
       ``azolla_events_detached_YYYYMMDD``; commit;
    3. optionally copy it to ``archive_dir/<partition>.csv`` (CSV with header) — outside any lock
       of the live table;
    4. ``DROP`` it, or keep it as table ``azolla_events_archive_YYYYMMDD`` when
       ``keep_as_table``.

    The DEFAULT partition is never dropped. A stream that receives an event after its partition
    was dropped starts again in a recreated partition (history before the cutoff is gone: that is
    what retention means).

    Args:
        conn: An ``asyncpg.Connection`` (not in a transaction).
        cutoff_day: Day number; partitions whose last day is before it are candidates.
        archive_dir: If set, write each dropped partition there as CSV first.
        keep_as_table: Keep each detached partition as a standalone archive table instead of
            dropping it.
        lock_timeout: Seconds to wait for the table lock before skipping a partition.

    Returns:
        What was dropped, archived and skipped (with reasons).
    """
    report = RetentionReport()
    for part in await list_partitions(conn):
        if part.is_default or part.end_day is None or part.end_day > cutoff_day:
            continue
        seen = int(
            await conn.fetchval(f"SELECT coalesce(max(position), 0) FROM {_quote_ident(part.name)}")
        )
        unfinished = await _unfinished_tasks(conn, part.name)
        if unfinished:
            report.skipped[part.name] = f"{unfinished} unfinished task(s)"
            continue
        detached = part.name.replace("azolla_events_", "azolla_events_detached_", 1)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
                await conn.execute("LOCK TABLE azolla_events IN ACCESS EXCLUSIVE MODE")
                late = await _unfinished_tasks(conn, part.name, after_position=seen)
                if late:
                    report.skipped[part.name] = f"{late} unfinished task(s) appended meanwhile"
                    continue
                await conn.execute(
                    f"ALTER TABLE azolla_events DETACH PARTITION {_quote_ident(part.name)}"
                )
                await conn.execute(
                    f"ALTER TABLE {_quote_ident(part.name)} RENAME TO {_quote_ident(detached)}"
                )
        except asyncpg.LockNotAvailableError:
            report.skipped[part.name] = f"lock not obtained within {lock_timeout}s"
            continue
        if archive_dir is not None:
            path = Path(archive_dir) / f"{part.name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            await conn.copy_from_table(detached, output=str(path), format="csv", header=True)
            report.archived[part.name] = str(path)
        if keep_as_table:
            archive = part.name.replace("azolla_events_", "azolla_events_archive_", 1)
            await conn.execute(
                f"ALTER TABLE {_quote_ident(detached)} RENAME TO {_quote_ident(archive)}"
            )
            report.archived.setdefault(part.name, archive)
        else:
            await conn.execute(f"DROP TABLE {_quote_ident(detached)}")
        report.dropped.append(part.name)
    return report


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
