"""``azolla migrate`` and ``azolla retention run`` against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from typer.testing import CliRunner

from azolla.adapters.postgres.cluster import free_port
from azolla.adapters.postgres.event_store import PostgresEventStore
from azolla.adapters.postgres.migrations import load_migrations
from azolla.adapters.postgres.partitions import (
    list_partitions,
    partition_name,
    partition_start,
    today,
)
from azolla.app.cli import app
from azolla.testing.event_store_contract import new_event

pytestmark = [pytest.mark.timeout(60)]

T = TypeVar("T")
NO_DB_ENV = {"DATABASE_URL": "", "AZOLLA_DATABASE_URL": ""}


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


def azolla(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={**NO_DB_ENV, **(env or {})},
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("azolla: error: ")
    return lines[0]


async def _fetch(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_migrate_applies_once_and_dry_run_reports_pending(fresh_database_url: str) -> None:
    versions = [m.version for m in load_migrations()]
    code, out, _ = azolla("--json", "migrate", "--dry-run", "--database-url", fresh_database_url)
    assert code == 1  # pending migrations
    assert len(json.loads(out)["pending"]) == len(versions)

    code, out, err = azolla("--json", "migrate", "--database-url", fresh_database_url)
    assert code == 0, err
    document = json.loads(out)
    assert [int(name[:4]) for name in document["applied"]] == versions
    assert document["current_version"] == versions[-1]
    assert document["database"] == fresh_database_url  # no password in it to hide
    assert run(lambda: _fetch(fresh_database_url,
                              "SELECT to_regclass('azolla_events') IS NOT NULL"))

    code, out, _ = azolla("migrate", env={"DATABASE_URL": fresh_database_url})  # from the env
    assert code == 0
    assert "up to date" in out
    code, out, _ = azolla("migrate", "--dry-run", "--database-url", fresh_database_url)
    assert code == 0
    assert "up to date" in out


def test_migrate_without_or_with_a_bad_database_url() -> None:
    code, _, err = azolla("migrate")
    assert code == 2
    assert "no database URL" in one_line(err)
    code, _, err = azolla("migrate", "--database-url", "mysql://x@y/z")
    assert code == 2
    assert "PostgreSQL URL" in one_line(err)
    code, _, err = azolla("migrate", "--database-url",
                          f"postgresql://nobody:secret@127.0.0.1:{free_port()}/azolla")
    assert code == 3
    message = one_line(err)
    assert "cannot connect to the database" in message
    assert "secret" not in message


async def _task(store: PostgresEventStore, day: int, *, finished: bool) -> uuid.UUID:
    stream = uuid.uuid4()
    events = [new_event(stream, 1, type="TaskSubmitted.v1", partition_day=day)]
    if finished:
        events.append(new_event(stream, 2, type="TaskSucceeded.v1", partition_day=day,
                                terminal=True))
    await store.append(events)
    return stream


async def _history(url: str) -> dict[str, int]:
    week = 7
    old = partition_start(today()) - 10 * week
    store = await PostgresEventStore.open(url)
    try:
        await _task(store, old, finished=True)
        await _task(store, old + 1, finished=True)
        await _task(store, old + week, finished=True)
        await _task(store, old + week + 2, finished=False)  # holds its week back
        await _task(store, partition_start(today()), finished=True)  # recent: kept
    finally:
        await store.close()
    return {"finished": old, "unfinished": old + week}


async def _partitions(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        return {p.name for p in await list_partitions(conn)}
    finally:
        await conn.close()


def test_retention_drops_finished_weeks_and_reports_skipped(fresh_database_url: str) -> None:
    days = run(lambda: _history(fresh_database_url))
    finished, unfinished = partition_name(days["finished"]), partition_name(days["unfinished"])

    code, out, err = azolla("--json", "retention", "run", "--older-than", "30d", "--dry-run",
                            "--database-url", fresh_database_url)
    assert code == 0, err
    dry = json.loads(out)
    assert dry["dry_run"] is True
    assert dry["dropped"] == [finished]
    assert list(dry["skipped"]) == [unfinished]
    assert "1 unfinished" in dry["skipped"][unfinished]
    assert finished in run(lambda: _partitions(fresh_database_url))  # nothing dropped yet

    code, out, err = azolla("retention", "run", "--older-than", "4w", "--database-url",
                            fresh_database_url)
    assert code == 0, err
    assert "dropped 1 partition(s), skipped 1" in out
    assert finished in out
    assert unfinished in out
    assert "unfinished task(s)" in out
    left = run(lambda: _partitions(fresh_database_url))
    assert finished not in left
    assert unfinished in left
    assert partition_name(partition_start(today())) in left

    code, out, _ = azolla("--json", "retention", "run", "--older-than", "30",
                          "--database-url", fresh_database_url)
    assert code == 0
    assert json.loads(out)["dropped"] == []


def test_retention_needs_a_migrated_database(fresh_database_url: str) -> None:
    code, _, err = azolla("retention", "run", "--older-than", "30d", "--database-url",
                          fresh_database_url)
    assert code == 1
    assert "run azolla migrate first" in one_line(err)
    code, _, err = azolla("retention", "run", "--database-url", fresh_database_url)
    assert code == 2
    assert "--older-than" in one_line(err)
