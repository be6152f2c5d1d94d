"""The two ``azolla`` commands that talk to PostgreSQL directly: ``migrate`` and ``retention``.

Everything else goes through the orchestrator. These two are maintenance of the database
itself, like ``alembic upgrade``: they need the database URL (``--database-url``,
``DATABASE_URL`` or ``AZOLLA_DATABASE_URL``), not a running server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from azolla.app.cli_render import Output
from azolla.app.cli_support import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
)
from azolla.app.settings import redact_url

__all__ = ["check_url", "migrate", "retention"]

_CONNECT_TIMEOUT = 10.0


def check_url(url: str | None) -> str:
    """Return the database URL, or fail with a usage error if it is missing or not PostgreSQL.

    Raises:
        CliError: No URL, or not a ``postgresql://`` URL (exit code 2).
    """
    if not url or not url.strip():
        raise CliError("no database URL: give --database-url or set DATABASE_URL "
                       "(postgresql://user:password@host:5432/azolla)", EXIT_USAGE)
    url = url.strip()
    if urlsplit(url).scheme not in ("postgres", "postgresql"):
        raise CliError(f"--database-url must be a PostgreSQL URL such as "
                       f"postgresql://user:password@host:5432/azolla; got "
                       f"{redact_url(url)!r}", EXIT_USAGE)
    return url


@asynccontextmanager
async def _connect(url: str) -> AsyncIterator[Any]:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
        raise CliError(f"cannot connect to the database at {redact_url(url)}: "
                       f"{exc or type(exc).__name__}", EXIT_UNAVAILABLE) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise CliError(f"the database refused the login at {redact_url(url)}: {exc}",
                       EXIT_UNAVAILABLE) from None
    except asyncpg.PostgresError as exc:
        raise CliError(f"cannot use the database at {redact_url(url)}: {exc}",
                       EXIT_UNAVAILABLE) from None
    try:
        yield conn
    except asyncpg.PostgresError as exc:
        raise CliError(f"database error: {type(exc).__name__}: {exc}", EXIT_INTERNAL) from None
    finally:
        await conn.close()


async def migrate(out: Output, url: str, *, dry_run: bool) -> int:
    """``azolla migrate``: apply the pending schema migrations (or list them).

    Returns:
        0; with ``dry_run``, 1 when migrations are pending (so a deploy script can tell).
    """
    from azolla.adapters.postgres.migrations import (
        MigrationError,
        applied_migrations,
        apply_migrations,
        load_migrations,
    )

    url = check_url(url)
    async with _connect(url) as conn:
        known = load_migrations()
        before = await applied_migrations(conn)
        pending = [m for m in known if m.version not in before]
        if dry_run:
            applied: list[int] = []
        else:
            try:
                applied = await apply_migrations(conn)
            except MigrationError as exc:
                raise CliError(str(exc), EXIT_INTERNAL) from None
        after = before if dry_run else await applied_migrations(conn)
    current = max(after, default=0)
    names = {m.version: f"{m.version:04d}_{m.name}" for m in known}
    if out.json_mode:
        out.json({"database": redact_url(url), "dry_run": dry_run,
                  "pending": [names[m.version] for m in pending] if dry_run else [],
                  "applied": [names.get(v, str(v)) for v in applied],
                  "current_version": current})
    elif dry_run:
        if pending:
            out.line("pending migrations: " + ", ".join(names[m.version] for m in pending))
        else:
            out.line(f"the schema is up to date (version {current})")
    elif applied:
        out.line("applied " + ", ".join(names.get(v, str(v)) for v in applied)
                 + f"; the schema is at version {current}")
    else:
        out.line(f"the schema is up to date (version {current})")
    return EXIT_FAILED if dry_run and pending else EXIT_OK


def _day_text(day: int | None) -> str:
    if day is None:
        return "-"
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


async def retention(out: Output, url: str, *, older_than_days: int, dry_run: bool,
                    archive_dir: str | None, lock_timeout: float) -> int:
    """``azolla retention run``: drop event partitions older than the cutoff.

    A weekly partition is dropped only when all of its days are before the cutoff and every
    task in it has finished; the others are reported as skipped, with the reason.
    """
    from azolla.adapters.postgres import partitions

    url = check_url(url)
    cutoff = partitions.today() - older_than_days
    async with _connect(url) as conn:
        exists = await conn.fetchval("SELECT to_regclass('azolla_events') IS NOT NULL")
        if not exists:
            raise CliError("the database has no azolla_events table: run azolla migrate first",
                           EXIT_FAILED)
        candidates = [p for p in await partitions.list_partitions(conn)
                      if not p.is_default and p.end_day is not None and p.end_day <= cutoff]
        if dry_run:
            dropped: list[str] = []
            skipped: dict[str, str] = {}
            for part in candidates:
                # The same check drop_partitions_older_than makes before it takes any lock.
                unfinished = await partitions._unfinished_tasks(conn, part.name)
                if unfinished:
                    skipped[part.name] = f"{unfinished} unfinished task(s)"
                else:
                    dropped.append(part.name)
            archived: dict[str, str] = {}
        else:
            spinner = out.err.status(f"dropping {len(candidates)} partition(s) …") \
                if out.interactive and not out.json_mode and candidates else None
            if spinner is not None:
                spinner.start()
            try:
                report = await partitions.drop_partitions_older_than(
                    conn, cutoff, archive_dir=archive_dir, lock_timeout=lock_timeout)
            finally:
                if spinner is not None:
                    spinner.stop()
            dropped, skipped, archived = report.dropped, report.skipped, report.archived
    spans = {p.name: (p.first_day, p.end_day) for p in candidates}
    if out.json_mode:
        out.json({"cutoff": _day_text(cutoff), "dry_run": dry_run,
                  "dropped": dropped, "skipped": skipped, "archived": archived})
        return EXIT_OK
    verb = "would drop" if dry_run else "dropped"
    out.line(f"cutoff {_day_text(cutoff)}: {verb} {len(dropped)} partition(s), skipped "
             f"{len(skipped)}")
    if dropped or skipped:
        from rich.table import Table

        table = Table(expand=False)
        for column in ("partition", "first day", "last day", "result"):
            table.add_column(column)
        for name in sorted([*dropped, *skipped]):
            first, end = spans.get(name, (None, None))
            result = verb if name in dropped else f"skipped: {skipped[name]}"
            if name in archived:
                result += f" (archived to {archived[name]})"
            table.add_row(name, _day_text(first), _day_text(end - 1 if end else None), result)
        out.out.print(table)
    return EXIT_OK
