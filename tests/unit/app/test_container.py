"""The composition root assembles the whole orchestrator in memory: no sockets, milliseconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from dependency_injector import providers
from prometheus_client import generate_latest

from azolla.adapters.grpc.auth import TokenAuthInterceptor
from azolla.adapters.memory.event_store import InMemoryEventStore
from azolla.adapters.memory.transport import InProcessShepherd
from azolla.app.containers import (
    Container,
    auth_interceptors,
    grpc_options,
    orchestrator_config,
    resolve,
    shutdown,
    tls_credentials,
)
from azolla.app.metrics import OrchestratorMetrics
from azolla.app.model import SubmitRequest, TaskOutcome
from azolla.app.orchestrator import Orchestrator
from azolla.app.settings import Settings
from azolla.domain.values import TaskState

pytestmark = pytest.mark.timeout(10)


class FixedClock:
    def __init__(self) -> None:
        self.value = 1_900_000_000.0

    def now(self) -> float:
        return self.value


@pytest.fixture
async def container() -> AsyncIterator[Container]:
    built = Container(settings=Settings(store="memory", port=0))
    try:
        yield built
    finally:
        await shutdown(built)


async def test_memory_assembly_runs_tasks_in_milliseconds(container: Container) -> None:
    started = time.perf_counter()
    seen: list[TaskOutcome] = []
    container.outcome_hooks.add_args(seen.append)
    orchestrator = await resolve(container.orchestrator)
    assert isinstance(orchestrator, Orchestrator)
    assert isinstance(orchestrator.store, InMemoryEventStore)
    shepherd = InProcessShepherd(orchestrator, {"add": lambda a, b: a + b}, capacity=4)
    await shepherd.start()
    results = await orchestrator.submit([SubmitRequest(name="add", args=f"[{i}, 1]")
                                         for i in range(20)])
    outcomes = [await orchestrator.wait("default", r.task_id, 5) for r in results]
    await shepherd.stop()
    assert [o.result for o in outcomes if o is not None] == [str(i + 1) for i in range(20)]
    assert len(seen) == 20
    assert not container.postgres_event_store.initialized
    assert not container.database_url.initialized
    assert time.perf_counter() - started < 1.0


async def test_shutdown_releases_everything_in_order(container: Container) -> None:
    orchestrator = await resolve(container.orchestrator)
    store = await resolve(container.event_store)
    [result] = await orchestrator.submit([SubmitRequest(name="t")])
    await shutdown(container)
    assert not container.orchestrator.initialized
    assert not container.memory_event_store.initialized
    # The log outlives the store: a new assembly over the same log sees the task.
    again = Container(settings=Settings(store="memory"))
    again.memory_log.override(providers.Object(store.log))
    try:
        rebuilt = await resolve(again.orchestrator)
        view = await rebuilt.status("default", result.task_id)
        assert view.state is TaskState.QUEUED
    finally:
        await shutdown(again)


async def test_providers_can_be_overridden() -> None:
    clock = FixedClock()
    container = Container(settings=Settings(store="memory"))
    container.clock.override(providers.Object(clock))
    try:
        orchestrator = await resolve(container.orchestrator)
        [result] = await orchestrator.submit([SubmitRequest(name="t")])
        view = await orchestrator.status("default", result.task_id)
        assert view.submitted_at == clock.value
    finally:
        await shutdown(container)


async def test_metrics_resource_is_off_by_default(container: Container) -> None:
    assert await resolve(container.metrics) is None


async def test_metrics_collect_on_the_loop(container: Container) -> None:
    orchestrator = await resolve(container.orchestrator)
    metrics = OrchestratorMetrics(orchestrator)
    shepherd = InProcessShepherd(orchestrator, {"ok": lambda: 1}, capacity=2,
                                 domain="default", group="g")
    await shepherd.start()
    await orchestrator.submit([SubmitRequest(name="later", group="nobody")])
    [done] = await orchestrator.submit([SubmitRequest(name="ok", group="g")])
    await orchestrator.wait("default", done.task_id, 5)
    text = generate_latest(metrics.registry).decode()
    await shepherd.stop()
    metrics.close()
    assert 'azolla_tasks{domain="default",state="queued"} 1.0' in text
    assert 'azolla_queue_depth{domain="default"} 1.0' in text
    assert 'azolla_task_outcomes_total{domain="default",state="succeeded"} 1.0' in text
    assert 'azolla_shepherds_connected{domain="default",group="g"} 1.0' in text
    assert 'azolla_shepherd_slots{domain="default",group="g",kind="capacity"} 2.0' in text
    assert "azolla_dispatched_tasks_total 1.0" in text
    assert "azolla_commit_seconds_count" in text


def test_settings_translate_to_component_options() -> None:
    settings = Settings(heartbeat_interval_ms=500, heartbeat_timeout_ms=3000, port=1234,
                        host="::1", max_message_mb=8, domain_concurrency={"a": 2},
                        max_payload_bytes=2048)
    config = orchestrator_config(settings)
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (0.5, 3.0)
    assert config.domain_concurrency == {"a": 2}
    assert config.limits.max_payload_bytes == 2048
    options = grpc_options(settings)
    assert (options.host, options.port, options.max_message_bytes) == ("::1", 1234, 8 << 20)


def test_auth_and_tls_are_off_by_default() -> None:
    settings = Settings()
    assert auth_interceptors(settings) == []
    assert tls_credentials(settings) is None


def test_tokens_become_an_interceptor() -> None:
    settings = Settings.model_validate({"auth": {"tokens": [
        {"name": "ops", "token": "a-long-development-token", "domains": ["*"],
         "roles": ["client", "admin"]}]}})
    [interceptor] = auth_interceptors(settings)
    assert isinstance(interceptor, TokenAuthInterceptor)
    principal = interceptor.authenticate([("authorization", "Bearer a-long-development-token")])
    assert principal is not None
    assert principal.name == "ops"
    assert principal.roles == frozenset({"client", "admin"})
    assert interceptor.authenticate([("authorization", "Bearer wrong")]) is None


# -- regressions found while assembling the server ---------------------------------------------


async def test_a_disconnect_whose_commit_fails_still_closes_the_stream(
        container: Container) -> None:
    """Otherwise a silent shepherd's stream outlives its session: no work, no end."""
    orchestrator = await resolve(container.orchestrator)
    store = await resolve(container.event_store)
    shepherd = InProcessShepherd(orchestrator, {}, capacity=1)
    await shepherd.start()
    assert shepherd.session is not None
    store.fail_next()
    await orchestrator.disconnect_shepherd(shepherd.session, "went silent", expired=True)
    for _ in range(10):  # the close is spawned after the (failed) commit
        if shepherd.transport.closed is not None:
            break
        await asyncio.sleep(0)
    assert shepherd.transport.closed == "went silent"
    await shepherd.stop(disconnect=False)
