"""Versioned schema migrations, applied when a store starts.

Migrations are the SQL files ``NNNN_name.sql`` shipped as package data in the ``migrations/``
folder next to this module (numbered from ``0001``; gaps are allowed, a number is never reused).
:func:`apply_migrations` applies, in order, each one whose number is not yet recorded in the
``azolla_schema_migrations`` table, each in its own transaction together with its record. It is:

* idempotent: applied migrations are skipped (their checksum is compared, and an edited applied
  migration is refused with :class:`MigrationError` rather than silently ignored);
* safe from several processes at once: the whole run holds a session-level advisory lock
  (key :data:`MIGRATION_LOCK_KEY`), so a second process waits for the first, then finds nothing
  left to do.

Example:
    >>> conn = await asyncpg.connect(dsn)  # doctest: +SKIP
    >>> await apply_migrations(conn)  # doctest: +SKIP
    [1]
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationError",
    "applied_migrations",
    "apply_migrations",
    "apply_migrations_dsn",
    "load_migrations",
]

#: Advisory lock key held while migrations run ("Azolla" in ASCII, then 0x0001).
MIGRATION_LOCK_KEY = 0x417A6F6C6C610001

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS azolla_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations on disk and the ones recorded in the database disagree."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL migration file.

    Attributes:
        version: Its number (the ``NNNN`` prefix of the file name).
        name: The rest of the file name, without ``.sql``.
        sql: The SQL text (may hold several statements).
        checksum: SHA-256 of the SQL text, hex.
    """

    version: int
    name: str
    sql: str
    checksum: str


def load_migrations() -> list[Migration]:
    """Return the migrations shipped with the package, in version order.

    Raises:
        MigrationError: If two files share a number or a file name is malformed.
    """
    folder = resources.files(__package__ or "azolla.adapters.postgres").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"malformed migration file name: {entry.name!r}")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version:04d}")
        sql = entry.read_text(encoding="utf-8")
        found[version] = Migration(
            version=version,
            name=match.group(2),
            sql=sql,
            checksum=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
        )
    return [found[v] for v in sorted(found)]


async def applied_migrations(conn: Any) -> dict[int, str]:
    """Return ``{version: checksum}`` of the migrations recorded in the database.

    Args:
        conn: An ``asyncpg.Connection``.
    """
    exists = await conn.fetchval("SELECT to_regclass('azolla_schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM azolla_schema_migrations")
    return {int(r["version"]): str(r["checksum"]) for r in rows}


async def apply_migrations(conn: Any, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the migrations that are not applied yet, holding the migration advisory lock.

    Args:
        conn: An ``asyncpg.Connection`` (not in a transaction).
        migrations: The migrations to apply; default :func:`load_migrations`.

    Returns:
        The versions applied by this call, in order (empty when the schema was up to date).

    Raises:
        MigrationError: If an applied migration's checksum differs from the file's.
        asyncpg.PostgresError: If a migration fails (that migration is rolled back; the ones
            before it stay applied).
    """
    todo = load_migrations() if migrations is None else sorted(migrations, key=_version)
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        done = await applied_migrations(conn)
        for migration in todo:
            recorded = done.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it"
                        " was applied (checksum differs); add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO azolla_schema_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def apply_migrations_dsn(dsn: str) -> list[int]:
    """Connect to ``dsn``, apply pending migrations, disconnect.

    Args:
        dsn: A libpq connection URL.

    Returns:
        The versions applied (see :func:`apply_migrations`).
    """
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


def _version(migration: Migration) -> int:
    return migration.version
