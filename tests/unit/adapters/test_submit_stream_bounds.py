"""``SubmitTasks`` keeps a bounded amount of work per stream, driven without a network.

The handler is an async generator: the test pulls answers from it (as gRPC would when it can
send them) and counts the request messages the handler has read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from azolla.adapters.grpc.client_service import ClientService
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.memory.event_store import InMemoryEventStore
from azolla.app.orchestrator import Orchestrator

pytestmark = pytest.mark.timeout(30)


class _Context:
    """The two ServicerContext methods the handler uses."""

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def test_unsent_answers_hold_their_slots_so_reading_stops() -> None:
    orchestrator = Orchestrator(InMemoryEventStore())
    await orchestrator.start()
    read = 0
    total = 1000

    async def requests() -> AsyncIterator[pbo.SubmitTasksRequest]:
        nonlocal read
        for batch_id in range(total):
            read += 1
            yield pbo.SubmitTasksRequest(batch_id=batch_id, tasks=[pbo.CreateTaskRequest(name="t")])

    service = ClientService(orchestrator, max_stream_in_flight=8)
    answers = service.SubmitTasks(requests(), _Context())  # type: ignore[arg-type]
    try:
        first = await answers.__anext__()
        assert first.code == 0
        await asyncio.sleep(0.3)  # nobody takes answers now: the handler must stop reading
        assert read <= 8 + 2, f"read {read} messages while their answers were not sent"
        rest = [answer async for answer in answers]  # taking answers lets it go on
        assert sorted(a.batch_id for a in [first, *rest]) == list(range(total))
        assert read == total
    finally:
        await answers.aclose()
        await orchestrator.stop()
