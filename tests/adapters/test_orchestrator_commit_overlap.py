"""The decision loop overlaps deciding a step with the commit of the step before it.

Against the real :class:`PostgresEventStore`: an append reaches its connection only after a few
passes of the event loop, and deciding a step is synchronous, so the loop must yield after
sending a batch or the commit waits for the whole next step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from azolla.adapters.postgres.event_store import PostgresEventStore
from azolla.app.model import SubmitRequest
from azolla.app.orchestrator import Orchestrator, OrchestratorConfig

pytestmark = pytest.mark.timeout(60)


async def test_a_sent_batch_is_committing_before_the_next_step_decides(
    fresh_database_url: str,
) -> None:
    store = await PostgresEventStore.open(fresh_database_url)
    # One event per step: each submit below is its own step and its own commit.
    orch = Orchestrator(store, config=OrchestratorConfig(max_events_per_batch=1))
    await orch.start()
    order: list[str] = []
    commit = store._commit
    decide = orch._decide

    async def spy_commit(batch: Any, lane: Any) -> None:
        order.append("commit")
        await commit(batch, lane)

    async def spy_decide(command: Any, batch: Any, now: float) -> None:
        order.append("decide")
        await decide(command, batch, now)

    store._commit = spy_commit  # type: ignore[method-assign]
    orch._decide = spy_decide  # type: ignore[method-assign]
    try:
        first = orch.submit_future([SubmitRequest("noop", domain="d")])
        second = orch.submit_future([SubmitRequest("noop", domain="d")])
        await asyncio.wait_for(asyncio.gather(first, second), 30)
    finally:
        await orch.stop()
        await store.close()
    # The first batch's commit starts before the second step decides (overlapping it);
    # without the loop's yield after sending, the order is decide, decide, commit, commit.
    assert order == ["decide", "commit", "decide", "commit"]
