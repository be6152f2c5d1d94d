"""Unit tests of waiting (one shared WatchTasks stream), status, cancel, watch and connect.

Marked ``grpc``: the real client talks to an in-process TEST DOUBLE of the orchestrator (see
``_client_fake.py``), which lets the tests complete tasks, break streams and count RPCs. The real
server's end-to-end tests live in ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from _client_fake import fake_orchestrator

from azolla import (
    AzollaConnectionError,
    AzollaError,
    Client,
    ClientClosedError,
    TaskFailedError,
    TaskHandle,
    TaskNotFoundError,
    WaitTimeoutError,
)

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(30)]


async def submit_n(client: Client, n: int) -> list[TaskHandle]:
    return await asyncio.gather(*(client.submit_task("t", [i]).submit() for i in range(n)))


async def test_brief_example_flow() -> None:
    async with fake_orchestrator() as fake:
        fake.auto_complete = lambda args, kwargs: {
            "greeting": f"Hello {kwargs['name']}! You are {kwargs['age']} years old."
        }
        async with Client.connect(fake.url) as client:
            handle = await client.submit_task("greet_user", {"name": "Alice", "age": 25}).submit()
            result = await handle.wait()
        assert result.success
        assert result.value == {"greeting": "Hello Alice! You are 25 years old."}
        assert result.error is None
        assert result.state == "succeeded"


async def test_concurrent_waits_share_one_stream() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        handles = await submit_n(client, 200)
        waits = [asyncio.ensure_future(h.wait(timeout=10)) for h in handles]
        await fake.until(lambda: sum(len(r) for r in fake.watch_requests) == 200)
        for i, handle in enumerate(handles):
            fake.succeed(handle.task_id, i)
        results = await asyncio.gather(*waits)
        assert [r.value for r in results] == list(range(200))
        assert fake.calls["WatchTasks"] == 1
        assert fake.calls["WaitForTask"] == 0
        assert len(fake.watch_requests) <= 3  # ids travel in batches too
        stats = client.stats()
        assert stats.watch_streams_opened == 1
        # A later wait reuses the same stream.
        more = await submit_n(client, 1)
        fake.succeed(more[0].task_id, "x")
        assert (await more[0].wait(timeout=5)).value == "x"
        assert fake.calls["WatchTasks"] == 1


async def test_failed_and_cancelled_tasks_are_returned_not_raised() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        failing, cancelled = await submit_n(client, 2)
        fake.fail(failing.task_id, "ValueError", "bad input", retriable=True)
        result = await failing.wait(timeout=5)
        assert not result.success
        assert result.error is not None
        assert (result.error.type, result.error.message, result.error.retriable) == (
            "ValueError",
            "bad input",
            True,
        )
        assert result.error.data == {"k": 1}
        with pytest.raises(TaskFailedError, match="ValueError: bad input"):
            await failing.result()
        assert await cancelled.cancel(reason="no longer needed") is True
        assert await cancelled.cancel() is False
        outcome = await cancelled.wait(timeout=5)
        assert outcome.cancelled
        assert not outcome.success


async def test_wait_timeout_and_waiting_again() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        (handle,) = await submit_n(client, 1)
        with pytest.raises(WaitTimeoutError, match=r"did not finish within 0\.05 s") as info:
            await handle.wait(timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert info.value.task_id == handle.task_id
        assert client._watch_mux.awaited == 0  # the timed-out waiter left no state behind
        fake.succeed(handle.task_id, 5)
        assert await handle.result(timeout=5) == 5
        assert await handle.result() == 5  # cached on the handle


async def test_several_waiters_of_one_task() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        (handle,) = await submit_n(client, 1)
        twin = client.handle(handle.task_id.upper())  # any UUID spelling finds the same task
        assert twin == handle
        waits = [asyncio.ensure_future(h.wait(timeout=5)) for h in (handle, twin)]
        await fake.until(lambda: fake.watch_requests)
        fake.succeed(handle.task_id, "shared")
        assert [r.value for r in await asyncio.gather(*waits)] == ["shared", "shared"]


async def test_a_broken_stream_reconnects_and_resends_the_awaited_ids() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        handles = await submit_n(client, 5)
        waits = [asyncio.ensure_future(h.wait(timeout=10)) for h in handles]
        await fake.until(lambda: sum(len(r) for r in fake.watch_requests) == 5)
        fake.succeed(handles[0].task_id, 0)
        assert (await waits[0]).value == 0
        fake.break_streams()
        await fake.until(lambda: fake.calls["WatchTasks"] == 2 and fake.open_streams == 1)
        await fake.until(lambda: sum(len(r) for r in fake.watch_requests) == 9)
        assert sorted(fake.watch_requests[-1]) == sorted(h.task_id for h in handles[1:])
        for i, handle in enumerate(handles[1:], 1):
            fake.succeed(handle.task_id, i)
        assert [r.value for r in await asyncio.gather(*waits)] == [0, 1, 2, 3, 4]
        assert client.stats().watch_streams_opened == 2


async def test_waits_survive_an_orchestrator_restart() -> None:
    async with fake_orchestrator() as fake:
        client = Client(fake.url)
        handles = await submit_n(client, 3)
        waits = [asyncio.ensure_future(h.wait(timeout=20)) for h in handles]
        await fake.until(lambda: sum(len(r) for r in fake.watch_requests) == 3)
        port = int(fake.url.rsplit(":", 1)[1])
    # The server is down now; the client keeps trying. The same state comes back on the port.
    fake.watch_requests.clear()
    async with fake_orchestrator(service=fake, port=port):
        await fake.until(lambda: sum(len(r) for r in fake.watch_requests) == 3, timeout=15)
        for i, handle in enumerate(handles):
            fake.succeed(handle.task_id, i)
        assert [r.value for r in await asyncio.gather(*waits)] == [0, 1, 2]
        assert client.stats().watch_streams_opened >= 2
        await client.close()


async def test_reconnects_are_bounded() -> None:
    async with fake_orchestrator() as fake:
        client = Client(fake.url, max_reconnects=2)
        (handle,) = await submit_n(client, 1)
        fake.fail_next["WatchTasks"] = [grpc.StatusCode.UNAVAILABLE] * 10
        with pytest.raises(AzollaConnectionError, match="unreachable"):
            await handle.wait(timeout=10)
        assert fake.calls["WatchTasks"] == 3  # the first try and two reconnects
        await client.close()


async def test_fatal_stream_errors_are_not_retried() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        (handle,) = await submit_n(client, 1)
        fake.fail_next["WatchTasks"] = [grpc.StatusCode.PERMISSION_DENIED]
        with pytest.raises(AzollaError, match="PERMISSION_DENIED"):
            await handle.wait(timeout=10)
        assert fake.calls["WatchTasks"] == 1


async def test_servers_without_watch_tasks_fall_back_to_wait_for_task() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        fake.unimplemented = {"WatchTasks"}
        a, b = await submit_n(client, 2)
        waits = [asyncio.ensure_future(h.wait(timeout=10)) for h in (a, b)]
        await fake.until(lambda: fake.calls["WaitForTask"] >= 2)
        fake.succeed(a.task_id, "a")
        fake.fail(b.task_id, "E", "m")
        first, second = await asyncio.gather(*waits)
        assert first.value == "a"
        assert second.error is not None
        assert second.error.type == "E"
        with pytest.raises(TaskNotFoundError):
            await client.handle("missing").wait(timeout=5)


async def test_wait_many_in_order_and_with_timeout() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        handles = await submit_n(client, 3)
        for i, handle in enumerate(reversed(handles)):
            fake.succeed(handle.task_id, i)
        results = await client.wait_many([handles[0], handles[1].task_id, handles[2]])
        assert [r.value for r in results] == [2, 1, 0]
        (late,) = await submit_n(client, 1)
        with pytest.raises(WaitTimeoutError, match="1 of 2 tasks did not finish"):
            await client.wait_many([handles[0], late], timeout=0.05)
        assert client._watch_mux.awaited == 0  # the unfinished wait was withdrawn
        with pytest.raises(TaskNotFoundError):  # one failure ends the whole wait
            await client.wait_many([late, "no-such-task"], timeout=5)
        assert client._watch_mux.awaited == 0


async def test_status_has_the_attempt_history() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        handle = await client.submit_task("report", {"id": 7}).shepherd_group("g").submit()
        status = await handle.status()
        assert (status.task_id, status.name, status.domain, status.state) == (
            handle.task_id,
            "report",
            "default",
            "queued",
        )
        assert status.kwargs == {"id": 7}
        assert status.args == []
        assert status.shepherd_group == "g"
        assert status.created_at == datetime.fromtimestamp(1_700_000_000, UTC)
        assert not status.terminal
        assert status.result is None
        first, second = status.attempts
        assert (first.number, first.state, first.shepherd_id) == (1, "failed", "s1")
        assert first.error is not None
        assert str(first.error) == "ValueError: first try"
        assert first.ended_at is not None
        assert (second.number, second.state, second.ended_at, second.error) == (
            2,
            "running",
            None,
            None,
        )


async def test_watch_streams_updates_until_terminal() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        (handle,) = await submit_n(client, 1)
        updates = [u async for u in handle.watch()]
        assert [u.state for u in updates] == ["queued", "running", "succeeded"]
        assert updates[-1].terminal
        assert updates[-1].result is not None
        assert updates[-1].result.value == 42
        assert fake.calls["WatchTask"] == 1


async def test_close_fails_pending_waits_and_later_calls() -> None:
    async with fake_orchestrator() as fake:
        client = await Client.connect(fake.url)
        (handle,) = await submit_n(client, 1)
        waiting = asyncio.ensure_future(handle.wait())
        await fake.until(lambda: fake.watch_requests)
        await client.close()
        with pytest.raises(ClientClosedError):
            await waiting
        with pytest.raises(ClientClosedError):
            await client.submit_task("t").submit()
        with pytest.raises(ClientClosedError):
            await handle.status()
        assert client.closed
        await client.close()  # twice is fine


async def test_connect_is_awaitable_and_a_context_manager() -> None:
    async with fake_orchestrator() as fake:
        client = await Client.connect(fake.url, domain="d1", timeout=5)
        assert client.domain == "d1"
        await client.close()
        async with Client.connect(fake.url) as client:
            assert not client.closed
        assert client.closed
        async with await Client.connect(fake.url) as client:
            pass
        assert client.closed


async def test_bearer_token_reaches_the_server() -> None:
    async with fake_orchestrator() as fake, Client(fake.url, token="t0k3n") as client:
        (handle,) = await submit_n(client, 1)
        fake.succeed(handle.task_id, 1)
        await handle.wait(timeout=5)
        await handle.status()
        assert fake.metadata
        assert all(m.get("authorization") == "Bearer t0k3n" for m in fake.metadata)


async def test_client_belongs_to_its_event_loop() -> None:
    async with fake_orchestrator() as fake:
        client = Client(fake.url)
        await submit_n(client, 1)

        def other_loop() -> None:
            async def use() -> None:
                await client.submit_task("t").submit()

            with pytest.raises(AzollaError, match="event loop"):
                asyncio.run(use())

        await asyncio.to_thread(other_loop)
        await client.close()


def _make_certificate(directory: Path) -> tuple[bytes, bytes]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


async def test_tls_with_a_custom_ca(tmp_path: Path) -> None:
    key, cert = await asyncio.to_thread(_make_certificate, tmp_path)
    credentials = grpc.ssl_server_credentials([(key, cert)])
    async with fake_orchestrator(credentials=credentials) as fake:
        assert fake.url.startswith("https://")
        async with Client.connect(fake.url, ca_file=tmp_path / "cert.pem", token="x") as client:
            (handle,) = await submit_n(client, 1)
            fake.succeed(handle.task_id, "secure")
            assert await handle.result(timeout=5) == "secure"
        # Without the CA the server's certificate is not trusted.
        with pytest.raises(AzollaConnectionError):
            await Client.connect(fake.url, timeout=0.5)
