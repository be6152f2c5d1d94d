"""Transactional enqueue against a real PostgreSQL: a task exists iff its transaction commits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from azolla.adapters.memory.transport import InProcessShepherd
from azolla.adapters.postgres.event_store import PostgresEventStore
from azolla.adapters.postgres.intake import SubmissionIntake
from azolla.app.orchestrator import Orchestrator
from azolla.domain.values import TaskState
from azolla.errors import ValidationError
from azolla.transactional import enqueue_in_transaction

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def greet_user(name: str, age: int) -> dict[str, str]:
    return {"greeting": f"Hello {name}! You are {age} years old."}


@pytest.fixture
async def system(fresh_database_url: str) -> AsyncIterator[tuple[Orchestrator, SubmissionIntake]]:
    store = await PostgresEventStore.open(fresh_database_url)
    orch = Orchestrator(store)
    await orch.start()
    shepherd = InProcessShepherd(orch, {"greet_user": greet_user})
    await shepherd.start()
    intake = SubmissionIntake(fresh_database_url, orch, poll_interval=0.2)
    await intake.start()
    yield orch, intake
    await intake.stop()
    await shepherd.stop()
    await orch.stop()
    await store.close()


async def test_committed_transaction_creates_and_runs_the_task(
        system: tuple[Orchestrator, SubmissionIntake], fresh_database_url: str) -> None:
    orch, _ = system
    conn = await asyncpg.connect(fresh_database_url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TABLE orders (id int)")
            await conn.execute("INSERT INTO orders VALUES (42)")
            task_id = await enqueue_in_transaction(conn, greet_user, {"name": "Alice", "age": 25})
    finally:
        await conn.close()
    deadline = asyncio.get_running_loop().time() + 10
    while not await orch.known(uuid.UUID(task_id)):
        assert asyncio.get_running_loop().time() < deadline, "the intake never picked it up"
        await asyncio.sleep(0.01)
    outcome = await orch.wait("default", uuid.UUID(task_id), 10)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    assert "Hello Alice" in (outcome.result or "")


async def test_rolled_back_transaction_creates_nothing(
        system: tuple[Orchestrator, SubmissionIntake], fresh_database_url: str) -> None:
    orch, intake = system
    conn = await asyncpg.connect(fresh_database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        task_id = await enqueue_in_transaction(conn, "greet_user", ["Bob", 3])
        await tx.rollback()
        # A committed one afterwards proves the intake ran past the rolled-back one.
        async with conn.transaction():
            later = await enqueue_in_transaction(conn, "greet_user", ["Eve", 4])
        assert await orch.wait("default", await _known(orch, later), 10) is not None
        assert not await orch.known(uuid.UUID(task_id))
        await _outbox_empty(conn)
    finally:
        await conn.close()
    assert intake.moved == 1


async def test_enqueue_outside_a_transaction_is_refused(fresh_database_url: str,
                                                        system: object) -> None:
    conn = await asyncpg.connect(fresh_database_url)
    try:
        with pytest.raises(ValidationError, match="transaction"):
            await enqueue_in_transaction(conn, "greet_user", [])
    finally:
        await conn.close()


async def test_a_row_whose_task_exists_is_only_deleted(
        system: tuple[Orchestrator, SubmissionIntake], fresh_database_url: str) -> None:
    orch, intake = system
    conn = await asyncpg.connect(fresh_database_url)
    try:
        async with conn.transaction():
            task_id = await enqueue_in_transaction(conn, "greet_user", ["Ann", 1])
        await orch.wait("default", await _known(orch, task_id), 10)
        await _outbox_empty(conn)
        # Simulate a crash between the task's commit and the row's delete: put the row back.
        request = await _request_bytes(conn, "greet_user")
        async with conn.transaction():
            await conn.execute("INSERT INTO azolla_task_submissions (task_id, request) "
                               "VALUES ($1, $2)", uuid.UUID(task_id), request)
            await conn.execute("SELECT pg_notify('azolla_submissions', '')")
        await _outbox_empty(conn)
        submitted = [e for e in await orch.store.read_stream(uuid.UUID(task_id))
                     if e.type == "TaskSubmitted.v1"]
        assert len(submitted) == 1
        assert intake.moved == 1
    finally:
        await conn.close()


async def _outbox_empty(conn: asyncpg.Connection) -> None:
    async with asyncio.timeout(10):
        while await conn.fetchval("SELECT count(*) FROM azolla_task_submissions"):
            await asyncio.sleep(0.01)


async def _known(orch: Orchestrator, task_id: str) -> uuid.UUID:
    tid = uuid.UUID(task_id)
    async with asyncio.timeout(10):
        while not await orch.known(tid):
            await asyncio.sleep(0.01)
    return tid


async def _request_bytes(conn: asyncpg.Connection, name: str) -> bytes:
    from azolla.adapters.grpc.pb import orchestrator_pb2

    return orchestrator_pb2.CreateTaskRequest(name=name, args='["x", 1]').SerializeToString()
