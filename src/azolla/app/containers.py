"""The composition root: the one place where concrete adapters are chosen and wired.

:class:`Container` (dependency-injector) assembles ``azolla-server`` from :class:`Settings`:

* ``event_store`` is a ``Selector`` on ``settings.store``: the in-memory store or the PostgreSQL
  store (whose URL comes from ``database_url``: the configured one, or the embedded PostgreSQL
  cluster started in ``settings.data_dir`` and stopped again at shutdown if this process
  started it);
* ``orchestrator``, ``metrics`` and ``grpc_server`` are async ``Resource`` providers that own
  what they start; :func:`shutdown` releases them in dependency order (server, metrics,
  orchestrator, store, database).

Classes never see the container: they take their collaborators in ``__init__``. Tests and
embedding applications override providers, e.g.
``container.clock.override(providers.Object(fake_clock))`` or
``container.outcome_hooks.add_args(my_hook)``.

Example:
    >>> async def run() -> None:  # doctest: +SKIP
    ...     container = Container(settings=load_settings({"store": "memory", "port": 0}))
    ...     server = await resolve(container.grpc_server)
    ...     try:
    ...         await asyncio.Event().wait()
    ...     finally:
    ...         await shutdown(container)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import grpc.aio

from azolla.app._imports import without

# dependency-injector imports PyYAML (~30 ms) and pydantic-settings (~30-60 ms) at every start
# only for Configuration.from_yaml and Configuration.from_pydantic, which Azolla never calls
# (without pydantic-settings it takes its "not installed" branch for from_pydantic alone).
with without("yaml", "pydantic_settings"):
    from dependency_injector import containers, providers

from azolla.adapters.grpc.auth import Principal, TokenAuthInterceptor, server_credentials
from azolla.adapters.grpc.server import GrpcServer, GrpcServerOptions
from azolla.adapters.memory.event_store import InMemoryEventLog, InMemoryEventStore
from azolla.adapters.memory.taskset import TaskSet
from azolla.app.model import OutcomeHook
from azolla.app.orchestrator import Orchestrator, OrchestratorConfig, RandomIds, SystemClock
from azolla.app.settings import Settings, redact_url
from azolla.domain.ports import Clock, EventStore, IdFactory

if TYPE_CHECKING:  # imported when metrics are on: prometheus_client costs ~50 ms at start-up
    from azolla.app.metrics import OrchestratorMetrics

__all__ = [
    "EMBEDDED_DATABASE",
    "Container",
    "auth_interceptors",
    "grpc_options",
    "open_database",
    "open_memory_store",
    "open_postgres_store",
    "orchestrator_config",
    "resolve",
    "run_orchestrator",
    "serve_grpc",
    "serve_metrics",
    "shutdown",
    "tls_credentials",
]

log = logging.getLogger("azolla.server")
T = TypeVar("T")

#: Name of the database the embedded PostgreSQL cluster keeps Azolla's tables in.
EMBEDDED_DATABASE = "azolla"
#: Resources in shutdown order (dependents first).
_SHUTDOWN_ORDER = ("grpc_server", "metrics", "orchestrator", "memory_event_store",
                   "postgres_event_store", "database_url")


# -- factories -----------------------------------------------------------------------------


def orchestrator_config(settings: Settings) -> OrchestratorConfig:
    """Translate the settings into the orchestrator's tunables."""
    return OrchestratorConfig(
        heartbeat_interval=settings.heartbeat_interval_ms / 1000.0,
        heartbeat_timeout=settings.heartbeat_timeout_ms / 1000.0,
        lease_grace=settings.lease_grace_seconds,
        reconnect_grace=settings.reconnect_grace_seconds,
        domain_concurrency=dict(settings.domain_concurrency),
        limits=settings.limits,
        outcome_cache=settings.outcome_cache,
    )


def auth_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Return the token interceptor when ``settings.auth`` has tokens, else nothing."""
    tokens = settings.auth.tokens
    if not tokens:
        return []
    return [TokenAuthInterceptor({
        t.digest: Principal(t.name, frozenset(t.domains), frozenset(t.roles)) for t in tokens})]


def tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Return the server's TLS credentials, or None for plain text."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return server_credentials(
        str(settings.tls_cert_file.expanduser()), str(settings.tls_key_file.expanduser()),
        str(settings.tls_client_ca_file.expanduser()) if settings.tls_client_ca_file else None,
        require_client_auth=settings.tls_require_client_auth)


def grpc_options(settings: Settings) -> GrpcServerOptions:
    """Translate the settings into the gRPC server's options."""
    return GrpcServerOptions(
        host=settings.host,
        port=settings.port,
        ping_interval=settings.ping_interval_ms / 1000.0,
        max_message_bytes=settings.max_message_mb * 1024 * 1024,
        max_batch=settings.max_batch,
        shutdown_grace=settings.shutdown_grace_seconds,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        hello_timeout=settings.hello_timeout_ms / 1000.0,
    )


# -- resources -----------------------------------------------------------------------------


async def _ensure_database(server_dsn: str, name: str) -> str:
    import asyncpg

    from azolla.adapters.postgres.cluster import create_database, dsn_with_database

    conn = await asyncpg.connect(server_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
    if exists:
        return dsn_with_database(server_dsn, name)
    log.info("creating database %s in the embedded PostgreSQL", name)
    return await create_database(server_dsn, name)


async def open_database(settings: Settings) -> AsyncIterator[str | None]:
    """Resource: the PostgreSQL URL to use (None for the memory store).

    With no configured URL, runs the embedded PostgreSQL cluster in ``settings.data_dir``
    (``initdb`` on first use, kept across restarts) and stops it at shutdown if it was not
    already running before.
    """
    if settings.store != "postgres":
        yield None
        return
    if settings.database_url is not None:
        yield settings.database_url
        return
    from azolla.adapters.postgres.cluster import LocalCluster

    data_dir = settings.resolved_data_dir
    cluster = LocalCluster(data_dir)
    was_running = await asyncio.to_thread(cluster.is_running)
    log.info("starting the embedded PostgreSQL in %s", data_dir)
    server_dsn = await asyncio.to_thread(cluster.ensure_started)
    try:
        dsn = await _ensure_database(server_dsn, EMBEDDED_DATABASE)
        log.info("embedded PostgreSQL ready at %s", redact_url(dsn))
        yield dsn
    finally:
        if not was_running:
            log.info("stopping the embedded PostgreSQL")
            await asyncio.to_thread(cluster.stop)


async def open_memory_store(event_log: InMemoryEventLog,
                             queue_limit: int) -> AsyncIterator[InMemoryEventStore]:
    """Resource: an in-memory event store over ``event_log``."""
    store = InMemoryEventStore(event_log, queue_limit=queue_limit)
    try:
        yield store
    finally:
        await store.close()


async def open_postgres_store(dsn: str | None, settings: Settings) -> AsyncIterator[EventStore]:
    """Resource: the PostgreSQL event store (migrations applied, durability checked)."""
    from azolla.adapters.postgres.event_store import PostgresEventStore

    if dsn is None:  # pragma: no cover - the selector only picks this with the postgres store
        raise RuntimeError("the postgres event store needs a database URL")
    store = await PostgresEventStore.open(
        dsn, allow_unsafe=settings.allow_unsafe_db, queue_limit=settings.queue_limit,
        pool_size=settings.pool_size)
    try:
        yield store
    finally:
        await store.close()


async def run_orchestrator(store: EventStore, taskset: TaskSet, clock: Clock, ids: IdFactory,
                               config: OrchestratorConfig,
                               hooks: Iterable[OutcomeHook]) -> AsyncIterator[Orchestrator]:
    """Resource: a started orchestrator (its TaskSet rebuilt from the log); stopped at the end."""
    orchestrator = Orchestrator(store, taskset=taskset, clock=clock, ids=ids, config=config,
                                hooks=hooks)
    await orchestrator.start()
    try:
        yield orchestrator
    finally:
        await orchestrator.stop()


async def serve_metrics(orchestrator: Orchestrator,
                           settings: Settings) -> AsyncIterator[OrchestratorMetrics | None]:
    """Resource: Prometheus metrics on ``settings.metrics_port`` (None when it is not set)."""
    if settings.metrics_port is None:
        yield None
        return
    from azolla.app.metrics import OrchestratorMetrics

    metrics = OrchestratorMetrics(orchestrator)
    try:
        port = metrics.start_http(settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        metrics.close()
        raise OSError(f"cannot serve metrics on {settings.metrics_host}:"
                      f"{settings.metrics_port}: {exc.strerror or exc}") from None
    log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, port)
    try:
        yield metrics
    finally:
        metrics.close()


async def serve_grpc(orchestrator: Orchestrator, options: GrpcServerOptions,
                     interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                     credentials: grpc.ServerCredentials | None = None,
                     ) -> AsyncIterator[GrpcServer]:
    """Resource: the gRPC server, serving once started; stopped (gracefully) at the end."""
    server = GrpcServer(orchestrator, options, interceptors=interceptors,
                        credentials=credentials)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- the container -------------------------------------------------------------------------


class Container(containers.DeclarativeContainer):
    """Wires ``azolla-server``. Give it ``settings=``; see the module docstring."""

    settings = providers.Dependency(instance_of=Settings)

    clock = providers.Singleton(SystemClock)
    ids = providers.Singleton(RandomIds)
    outcome_hooks = providers.List()
    config = providers.Singleton(orchestrator_config, settings)
    server_options = providers.Singleton(grpc_options, settings)
    taskset = providers.Factory(TaskSet, outcome_cache=settings.provided.outcome_cache)

    database_url = providers.Resource(open_database, settings)
    memory_log = providers.Singleton(InMemoryEventLog)
    memory_event_store = providers.Resource(open_memory_store, memory_log,
                                            queue_limit=settings.provided.queue_limit)
    postgres_event_store = providers.Resource(open_postgres_store, database_url, settings)
    event_store = providers.Selector(settings.provided.store, memory=memory_event_store,
                                     postgres=postgres_event_store)

    orchestrator = providers.Resource(
        run_orchestrator, store=event_store, taskset=taskset, clock=clock, ids=ids,
        config=config, hooks=outcome_hooks)
    metrics = providers.Resource(serve_metrics, orchestrator, settings)
    interceptors = providers.Singleton(auth_interceptors, settings)
    credentials = providers.Singleton(tls_credentials, settings)
    grpc_server = providers.Resource(serve_grpc, orchestrator, server_options,
                                     interceptors=interceptors, credentials=credentials)


async def resolve(provider: providers.Provider[T]) -> T:
    """Return what ``provider`` provides, awaiting it if it is an async resource.

    dependency-injector types ``Resource[T]`` as returning ``T``; an async resource actually
    returns an awaitable on first use. This bridges the two for typed code.
    """
    result: Any = provider()
    if inspect.isawaitable(result):
        result = await result
    return cast(T, result)


async def shutdown(container: Container) -> None:
    """Release the container's resources in dependency order (see the module docstring).

    Every resource is released even if an earlier one fails; the first failure is raised.
    """
    first: BaseException | None = None
    for name in _SHUTDOWN_ORDER:
        provider = getattr(container, name)
        if not provider.initialized:
            continue
        try:
            result = provider.shutdown()
            if result is not None:
                await result
        except Exception as exc:
            log.exception("shutting down %s failed", name)
            first = first or exc
    if first is not None:
        raise first
