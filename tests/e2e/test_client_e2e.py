"""The Python SDK against the real server, a real shepherd and real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from azolla import Client
from azolla.errors import TaskNotFoundError, WaitTimeoutError
from azolla.retry import FixedBackoff, RetryPolicy
from support.procs import ServerProc, ShepherdProc

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(120)]

HERE = str(Path(__file__).resolve().parent)


@pytest.fixture
def system(fresh_database_url: str) -> Iterator[ServerProc]:
    server = ServerProc(fresh_database_url)
    shepherd: ShepherdProc | None = None
    try:
        server.wait_serving()
        shepherd = ShepherdProc(server.url, ["sdk_tasks"], mode="pool", concurrency=4,
                                pythonpath=HERE, extra=("--group", "sdk"))
        yield server
    finally:
        if shepherd is not None:
            shepherd.stop()
        server.stop()


@pytest.fixture
async def client(system: ServerProc) -> AsyncIterator[Client]:
    async with Client.connect(system.url) as connected:
        yield connected


async def test_every_builder_option_reaches_the_server(client: Client) -> None:
    when = datetime.now(UTC) + timedelta(seconds=3600)
    handle = await (client.submit_task("sdk_echo").args(1, "two").kwargs(three=3)
                    .retry_policy(RetryPolicy(max_attempts=2, backoff=FixedBackoff(0.1)))
                    .shepherd_group("nobody-serves-this").idempotency_key("opt-1")
                    .priority(7).not_before(when).timeout(9.5).submit())
    status = await handle.status()
    assert status.name == "sdk_echo"
    assert status.args == [1, "two"]
    assert status.kwargs == {"three": 3}
    assert status.shepherd_group == "nobody-serves-this"
    assert status.state == "queued"
    assert status.next_attempt_at is not None
    assert abs((status.next_attempt_at - when).total_seconds()) < 1
    again = await client.submit_task("sdk_echo").idempotency_key("opt-1").submit()
    assert again.task_id == handle.task_id
    assert await handle.cancel()


async def test_dict_is_kwargs_list_is_args_and_the_task_sees_its_attempt(
        client: Client) -> None:
    handle = await client.submit_task("sdk_echo", {"a": 1}).shepherd_group("sdk").submit()
    result = await handle.wait(timeout=30)
    assert result.success, result.error
    assert result.value == {"args": [], "kwargs": {"a": 1}, "attempt": 1}
    handle = await client.submit_task("sdk_echo", [1, 2]).shepherd_group("sdk").submit()
    assert (await handle.wait(timeout=30)).value["args"] == [1, 2]


async def test_fails_then_succeeds_under_a_retry_policy(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "count"
    policy = RetryPolicy(max_attempts=3, backoff=FixedBackoff(0.05))
    handle = await (client.submit_task("sdk_flaky", {"marker": str(marker), "fail_times": 2})
                    .retry_policy(policy).shepherd_group("sdk").submit())
    result = await handle.wait(timeout=30)
    assert result.success, result.error
    assert result.value == 3
    status = await handle.status()
    assert [a.state for a in status.attempts] == ["failed", "failed", "succeeded"]
    assert status.attempts[0].error is not None
    assert status.attempts[0].error.type == "Flaky"


async def test_wait_timeout_cancel_and_not_found(client: Client) -> None:
    handle = await client.submit_task("sdk_sleep", {"seconds": 30}).shepherd_group("sdk").submit()
    with pytest.raises(WaitTimeoutError):
        await handle.wait(timeout=0.5)
    async with asyncio.timeout(20):
        while (await handle.status()).state != "running":
            await asyncio.sleep(0.05)
    assert await handle.cancel()
    result = await handle.wait(timeout=10)
    assert not result.success
    assert result.state == "cancelled"
    with pytest.raises(TaskNotFoundError):
        await client.handle("00000000-0000-4000-8000-000000000000").status()


async def test_submit_many_and_wait_many(client: Client) -> None:
    handles = await client.submit_many("sdk_echo", [[i] for i in range(200)],
                                       shepherd_group="sdk")
    results = await client.wait_many(handles, timeout=60)
    assert [r.value["args"] for r in results] == [[i] for i in range(200)]
