"""Unit tests of submit coalescing.

The pure tests drive :class:`azolla.client._coalescer.Coalescer` with a fake ``send``. The tests
marked ``grpc`` run the real client against an in-process TEST DOUBLE of the orchestrator (see
``_client_fake.py``), which counts the RPCs and batch sizes it receives; the real server's
end-to-end tests live in ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from _client_fake import fake_orchestrator

from azolla import AzollaConnectionError, Client, OverloadedError, ValidationError
from azolla.client._coalescer import Coalescer, Pending

pytestmark = pytest.mark.timeout(30)

Batch = list[Pending[int, int]]


class Recorder:
    """A fake batch sender: records batches, answers each request with itself * 10."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.release: asyncio.Event | None = None
        self._arrived = asyncio.Condition()

    async def batches_sent(self, count: int) -> None:
        """Wait until ``count`` batches have been sent."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.batches) >= count)

    async def __call__(self, batch: Batch) -> None:
        self.batches.append([p.request for p in batch])
        async with self._arrived:
            self._arrived.notify_all()
        if self.release is not None:
            await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        for p in batch:
            p.future.set_result(p.request * 10)


def coalescer(send: Recorder, **options: float) -> Coalescer[int, int]:
    settings: dict[str, float] = {
        "linger": 0.001,
        "max_batch": 1000,
        "max_batch_bytes": 10**9,
        "max_in_flight": 2,
    }
    settings.update(options)
    return Coalescer(
        send,
        linger=settings["linger"],
        max_batch=int(settings["max_batch"]),
        max_batch_bytes=int(settings["max_batch_bytes"]),
        max_in_flight=int(settings["max_in_flight"]),
    )


# -- the coalescing rules, without gRPC -----------------------------------------------------------


async def test_concurrent_calls_of_one_loop_iteration_leave_together() -> None:
    send = Recorder()
    c = coalescer(send)
    results = await asyncio.gather(*(c.submit(i, 1) for i in range(200)))
    assert results == [i * 10 for i in range(200)]
    assert send.batches == [list(range(200))]


async def test_a_lone_call_is_not_delayed_by_the_linger() -> None:
    send = Recorder()
    c = coalescer(send, linger=10.0)  # a linger that would fail the test if applied
    started = time.perf_counter()
    assert await c.submit(7, 1) == 70
    assert time.perf_counter() - started < 1.0
    assert send.batches == [[7]]


async def test_a_lone_awaited_call_runs_in_the_callers_task() -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    async def send(batch: Batch) -> None:
        tasks.append(asyncio.current_task())
        for p in batch:
            p.future.set_result(p.request * 10)

    c: Coalescer[int, int] = Coalescer(
        send, linger=10.0, max_batch=10, max_batch_bytes=100, max_in_flight=2
    )
    assert await c.call(4, 1) == 40
    assert tasks == [asyncio.current_task()]
    assert (c.stats.requests, c.stats.batches, c.in_flight, c.queued) == (1, 1, 0, 0)


async def test_awaited_calls_of_one_loop_iteration_still_leave_together() -> None:
    send = Recorder()
    c = coalescer(send, linger=10.0)
    results = await asyncio.gather(*(c.call(i, 1) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert send.batches == [list(range(50))]


async def test_a_failing_lone_call_raises_in_its_caller() -> None:
    async def send(batch: Batch) -> None:
        raise RuntimeError("boom")

    c: Coalescer[int, int] = Coalescer(
        send, linger=0, max_batch=10, max_batch_bytes=100, max_in_flight=1
    )
    with pytest.raises(Exception, match="boom"):
        await c.call(0, 1)
    assert c.in_flight == 0


async def test_cancelling_a_leading_call_lets_its_followers_leave() -> None:
    send = Recorder()
    c = coalescer(send, linger=10.0)
    leader = asyncio.ensure_future(c.call(0, 1))
    await asyncio.sleep(0)  # the leader yields its one loop iteration
    followers = [c.submit(i, 1) for i in range(1, 4)]
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.gather(*followers) == [10, 20, 30]
    assert send.batches == [[1, 2, 3]]


async def test_cancelling_a_lone_call_in_flight_cancels_it() -> None:
    send = Recorder()
    send.release = asyncio.Event()
    c = coalescer(send)
    call = asyncio.ensure_future(c.call(5, 1))
    await send.batches_sent(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert c.in_flight == 0
    send.release.set()
    assert await c.call(6, 1) == 60  # the coalescer still works
    assert send.batches == [[5], [6]]


async def test_calls_made_while_a_batch_is_in_flight_share_the_next_batch() -> None:
    send = Recorder()
    send.release = asyncio.Event()
    c = coalescer(send, linger=10.0, max_in_flight=1)
    first = c.submit(0, 1)
    await send.batches_sent(1)
    assert send.batches == [[0]]
    later = [c.submit(i, 1) for i in range(1, 51)]
    await asyncio.sleep(0.01)
    assert len(send.batches) == 1  # saturated: waiting for the batch in flight
    send.release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [i * 10 for i in range(1, 51)]
    assert send.batches == [[0], list(range(1, 51))]  # "until the current batch returns"


async def test_busy_linger_gathers_company_when_a_slot_is_free() -> None:
    send = Recorder()
    send.release = asyncio.Event()
    c = coalescer(send, linger=0.3, max_in_flight=2)
    c.submit(0, 1)
    await send.batches_sent(1)
    futures = []
    for i in range(1, 4):  # three calls in three different loop iterations
        futures.append(c.submit(i, 1))
        await asyncio.sleep(0.005)
    assert send.batches == [[0]]  # the linger is still running
    await send.batches_sent(2)
    assert send.batches == [[0], [1, 2, 3]]
    send.release.set()
    assert await asyncio.gather(*futures) == [10, 20, 30]


async def test_batch_size_and_byte_limits() -> None:
    send = Recorder()
    c = coalescer(send, max_batch=64, max_in_flight=8)
    await asyncio.gather(*(c.submit(i, 1) for i in range(200)))
    assert [len(b) for b in send.batches] == [64, 64, 64, 8]
    send = Recorder()
    c = coalescer(send, max_batch_bytes=100, max_in_flight=8)
    await asyncio.gather(*(c.submit(i, 30) for i in range(10)))
    assert [len(b) for b in send.batches] == [3, 3, 3, 1]
    assert c.stats.batches == 4
    assert c.stats.largest_batch == 3


async def test_a_call_cancelled_while_queued_is_not_sent() -> None:
    send = Recorder()
    send.release = asyncio.Event()
    c = coalescer(send, max_in_flight=1)
    c.submit(0, 1)
    await send.batches_sent(1)
    dropped = c.submit(1, 1)
    kept = c.submit(2, 1)
    dropped.cancel()
    send.release.set()
    assert await kept == 20
    assert send.batches == [[0], [2]]


async def test_a_failing_send_fails_its_callers_only() -> None:
    calls = 0

    async def send(batch: Batch) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        for p in batch:
            p.future.set_result(1)

    c: Coalescer[int, int] = Coalescer(
        send, linger=0, max_batch=10, max_batch_bytes=100, max_in_flight=1
    )
    with pytest.raises(Exception, match="boom"):
        await c.submit(0, 1)
    assert await c.submit(1, 1) == 1


async def test_drain_waits_for_everything_in_flight() -> None:
    send = Recorder(delay=0.02)
    c = coalescer(send, max_in_flight=1)
    futures = [c.submit(i, 1) for i in range(5)]
    await c.drain()
    assert all(f.done() for f in futures)
    assert c.in_flight == 0
    assert c.queued == 0


async def test_drain_returns_when_every_queued_call_was_cancelled() -> None:
    send = Recorder()
    c = coalescer(send)
    future = c.submit(1, 1)
    future.cancel()
    async with asyncio.timeout(5):
        await c.drain()
    assert send.batches == []


# -- the real client against the test double -------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["stream", "unary"])
def submit_stream(request: pytest.FixtureRequest) -> bool:
    """Run each client test against a server with SubmitTasks and against one without."""
    return bool(request.param)



@pytest.mark.grpc
async def test_200_concurrent_submits_take_few_rpcs(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        fake.create_delay = 0.002
        handles = await asyncio.gather(*(client.submit_task("t", [i]).submit() for i in range(200)))
        rpcs = fake.submit_rpcs
        assert rpcs <= 3, fake.batch_sizes
        assert sum(fake.batch_sizes) == 200
        assert len({h.task_id for h in handles}) == 200
        # Each handle got the id of its own task.
        for i, handle in enumerate(handles):
            assert fake.tasks[handle.task_id].request.args == f"[{i}]"
        stats = client.stats()
        assert stats.tasks_submitted == 200
        assert stats.submit_batches == rpcs


@pytest.mark.grpc
async def test_submits_from_many_loops_share_batches(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        fake.create_delay = 0.005

        async def loop(n: int) -> None:
            for i in range(5):
                await client.submit_task("t", [n, i]).submit()

        await asyncio.gather(*(loop(n) for n in range(100)))
        rpcs = fake.submit_rpcs
        assert sum(fake.batch_sizes) == 500
        assert rpcs <= 50, fake.batch_sizes  # 10x fewer RPCs than tasks, at least


@pytest.mark.grpc
async def test_a_lone_submit_takes_one_round_trip_without_linger(submit_stream: bool) -> None:
    async with (
        fake_orchestrator(submit_stream=submit_stream) as fake,
        Client(fake.url, submit_linger=1.0) as client,
    ):
        await client.submit_task("warmup").submit()  # connect first
        started = time.perf_counter()
        handle = await client.submit_task("t", ["x"]).submit()
        assert time.perf_counter() - started < 0.5
        assert fake.calls[fake.submit_key(1)] == 2
        assert fake.submit_rpcs == 2
        assert fake.batch_sizes == [1, 1]
        assert handle.task_id in fake.tasks
        if submit_stream:  # both went as messages of one stream
            assert fake.calls["SubmitTasks"] == 1
            assert client.stats().submit_messages_sent == 2


@pytest.mark.grpc
async def test_one_invalid_task_does_not_fail_its_batch_neighbours(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        fake.reject_names = {"bad"}
        names = ["good"] * 20
        names[13] = "bad"
        outcomes = await asyncio.gather(
            *(client.submit_task(name).submit() for name in names), return_exceptions=True
        )
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert failed == [13]
        assert isinstance(outcomes[13], ValidationError)
        assert "bad task bad" in str(outcomes[13])
        assert sum(1 for t in fake.tasks.values() if t.request.name == "good") == 19


@pytest.mark.grpc
async def test_servers_without_batch_rpc_get_single_creates() -> None:
    async with fake_orchestrator(submit_stream=False) as fake, Client(fake.url) as client:
        fake.unimplemented.add("CreateTasks")
        handles = await asyncio.gather(*(client.submit_task("t", [i]).submit() for i in range(10)))
        assert len(fake.tasks) == 10
        assert {fake.tasks[h.task_id].request.args for h in handles} == {
            f"[{i}]" for i in range(10)
        }
        calls_before = fake.calls["CreateTasks"]
        await asyncio.gather(*(client.submit_task("t").submit() for _ in range(5)))
        assert fake.calls["CreateTasks"] == calls_before  # remembered: no more attempts


@pytest.mark.grpc
async def test_overload_is_retried_then_reported(submit_stream: bool) -> None:
    async with (
        fake_orchestrator(submit_stream=submit_stream) as fake,
        Client(fake.url, submit_retries=2) as client,
    ):
        fake.fail_next[fake.submit_key(1)] = [grpc.StatusCode.RESOURCE_EXHAUSTED]
        handle = await client.submit_task("t").submit()
        assert handle.task_id in fake.tasks
        fake.fail_next[fake.submit_key(1)] = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        with pytest.raises(OverloadedError, match="overloaded"):
            await client.submit_task("t").submit()


@pytest.mark.grpc
async def test_connection_loss_retries_only_idempotent_submits(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        fake.fail_next[fake.submit_key(1)] = [grpc.StatusCode.UNAVAILABLE]
        handle = await client.submit_task("t").idempotency_key("k1").submit()
        assert fake.tasks[handle.task_id].request.idempotency_key == "k1"
        fake.fail_next[fake.submit_key(1)] = [grpc.StatusCode.UNAVAILABLE]
        with pytest.raises(AzollaConnectionError, match="set an idempotency key"):
            await client.submit_task("t").submit()
        # The same key again returns the same task.
        again = await client.submit_task("t").idempotency_key("k1").submit()
        assert again.task_id == handle.task_id
        assert again.deduplicated


@pytest.mark.grpc
async def test_submit_many_is_one_round_trip_in_order(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        handles = await client.submit_many(
            "resize",
            [{"w": 1}, [2, 3], "four"],
            priority=3,
            shepherd_group="img",
            idempotency_keys=["a", "b", "c"],
        )
        assert fake.submit_rpcs == 1
        assert fake.calls[fake.submit_key(3)] == 1
        requests = [fake.tasks[h.task_id].request for h in handles]
        assert [(r.args, r.kwargs) for r in requests] == [
            ("[]", '{"w":1}'),
            ("[2,3]", "{}"),
            ('["four"]', "{}"),
        ]
        assert {(r.priority, r.shepherd_group) for r in requests} == {(3, "img")}
        assert [r.idempotency_key for r in requests] == ["a", "b", "c"]
        assert await client.submit_many("resize", []) == []


@pytest.mark.grpc
async def test_submit_many_is_all_or_nothing(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        with pytest.raises(ValidationError, match="task 1 of submit_many"):
            await client.submit_many("t", [[1], [float("nan")]])
        assert fake.submit_rpcs == 0
        fake.reject_names = {"bad"}
        with pytest.raises(ValidationError, match="bad task bad"):
            await client.submit_many("bad", [[1], [2]])
        assert fake.tasks == {}
        with pytest.raises(ValidationError, match="one key per task"):
            await client.submit_many("t", [[1], [2]], idempotency_keys=["only-one"])


@pytest.mark.grpc
async def test_submit_many_chunks_large_batches(submit_stream: bool) -> None:
    async with (
        fake_orchestrator(submit_stream=submit_stream) as fake,
        Client(fake.url, max_batch_size=100) as client,
    ):
        handles = await client.submit_many("t", range(250))
        assert sorted(fake.batch_sizes) == [50, 100, 100]
        assert [fake.tasks[h.task_id].request.args for h in handles] == [
            f"[{i}]" for i in range(250)
        ]


@pytest.mark.grpc
async def test_submit_many_survives_overload_and_servers_without_batch_rpc(
    submit_stream: bool,
) -> None:
    async with (
        fake_orchestrator(submit_stream=submit_stream) as fake,
        Client(fake.url, max_batch_size=4) as client,
    ):
        fake.fail_next[fake.submit_key(4)] = [grpc.StatusCode.RESOURCE_EXHAUSTED]
        handles = await client.submit_many("t", range(7))
        assert [fake.tasks[h.task_id].request.args for h in handles] == [f"[{i}]" for i in range(7)]
        assert len(fake.tasks) == 7  # the refused chunk was sent again, nothing twice
        if submit_stream:
            return  # the rest is about servers without SubmitTasks
        fake.unimplemented.add("CreateTasks")  # the client learns it on the way
        handles = await client.submit_many("u", range(3), priority=2)
        requests = [fake.tasks[h.task_id].request for h in handles]
        assert [(r.name, r.args, r.priority) for r in requests] == [
            ("u", "[0]", 2),
            ("u", "[1]", 2),
            ("u", "[2]", 2),
        ]


@pytest.mark.grpc
async def test_close_finishes_started_submits(submit_stream: bool) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake:
        fake.create_delay = 0.05
        client = Client(fake.url)
        pending = [asyncio.ensure_future(client.submit_task("t", [i]).submit()) for i in range(10)]
        await asyncio.sleep(0.01)
        await client.close()
        handles = await asyncio.gather(*pending)
        assert len({h.task_id for h in handles}) == 10


# -- the SubmitTasks stream ------------------------------------------------------------------------


@pytest.mark.grpc
async def test_servers_without_the_submit_stream_are_asked_once() -> None:
    async with fake_orchestrator(submit_stream=False) as fake, Client(fake.url) as client:
        for i in range(3):
            await client.submit_task("t", [i]).submit()
        await asyncio.gather(*(client.submit_task("t", [i]).submit() for i in range(10)))
        assert len(fake.tasks) == 13
        assert fake.calls["SubmitTasks"] == 1  # UNIMPLEMENTED once, then unary calls only
        assert fake.calls["CreateTask"] >= 3
        assert client.stats().submit_messages_sent <= 1


@pytest.mark.grpc
async def test_a_broken_submit_stream_fails_unkeyed_batches_as_ambiguous_retries_keyed() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        await client.submit_task("warmup").submit()
        fake.create_delay = 5.0  # the batches below stay unanswered until the stream breaks
        unkeyed = asyncio.ensure_future(client.submit_task("t", ["plain"]).submit())
        keyed_submit = client.submit_task("t", ["keyed"]).idempotency_key("k").submit()
        keyed = asyncio.ensure_future(keyed_submit)
        await fake.until(lambda: sum(fake.batch_sizes) >= 3)
        fake.create_delay = 0.0
        fake.break_submit_streams()
        with pytest.raises(AzollaConnectionError, match="may or may not have been created"):
            await asyncio.wait_for(unkeyed, 10)
        handle = await asyncio.wait_for(keyed, 10)
        assert fake.tasks[handle.task_id].request.idempotency_key == "k"
        assert fake.calls["SubmitTasks"] == 2  # the retry opened a new stream
        assert (await client.submit_task("t", ["after"]).submit()).task_id in fake.tasks
        assert fake.calls["SubmitTasks"] == 2  # which later submits share


@pytest.mark.grpc
async def test_an_unanswered_batch_times_out_and_the_stream_stays_usable() -> None:
    async with fake_orchestrator() as fake, Client(fake.url, timeout=1.0) as client:
        await client.submit_task("warmup").submit()
        fake.create_delay = 5.0
        started = time.perf_counter()
        with pytest.raises(AzollaConnectionError, match="may or may not have been created"):
            await client.submit_task("t", ["slow"]).submit()
        assert time.perf_counter() - started < 4.0
        fake.create_delay = 0.0
        handle = await client.submit_task("t", ["fast"]).submit()
        assert fake.tasks[handle.task_id].request.args == '["fast"]'
        assert fake.calls["SubmitTasks"] == 1
