"""The shepherd runtime's protocol behaviour, against an in-memory orchestrator end."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.shepherd import runtime as runtime_module
from azolla.shepherd.runtime import Backoff, RuntimeConfig, RuntimeState, ShepherdRuntime

from ._fakes import FakeConnector, FakeLink, ScriptedExecutor, SubmittingExecutor, task

pytestmark = pytest.mark.timeout(30)


def config(**overrides: object) -> RuntimeConfig:
    values: dict[str, object] = {
        "concurrency": 4, "version": "test", "ack_delay": 0.05,
        "reconnect_initial_delay": 0.01, "reconnect_max_delay": 0.05, "drain_timeout": 5.0,
        "hello_ack_timeout": 2.0, "delivery_timeout": 5.0, "kill_grace": 2.0,
    }
    values.update(overrides)
    return RuntimeConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["execute", "submit"])
def executor(request: pytest.FixtureRequest) -> ScriptedExecutor:
    # Every runtime test runs against an awaited executor and one with the pool's submit().
    return ScriptedExecutor() if request.param == "execute" else SubmittingExecutor()


@pytest.fixture
def connector() -> FakeConnector:
    return FakeConnector()


@pytest.fixture
async def runtime(executor: ScriptedExecutor,
                  connector: FakeConnector) -> AsyncIterator[ShepherdRuntime]:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    yield rt
    await rt.stop(drain_timeout=0)


async def test_hello_announces_the_shepherd(runtime: ShepherdRuntime,
                                            connector: FakeConnector) -> None:
    link, hello = await connector.accept()
    assert hello.shepherd_uuid == runtime.shepherd_id
    assert hello.max_concurrency == 4
    assert (hello.domain, hello.shepherd_group) == ("default", "default")
    assert hello.accepts_batches is True
    assert hello.version == "test"
    assert list(hello.running) == []
    link.hello_ack()
    await runtime.wait_connected(5)
    assert runtime.state is RuntimeState.CONNECTED


async def test_outcomes_finishing_together_travel_in_one_message(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    await runtime.wait_connected(5)
    ids = [f"t{i}" for i in range(4)]
    link.push_tasks(*(task(i, "wait") for i in ids))
    for i in ids:
        await executor.wait_started(i)
    for i in ids:
        executor.release(i)
    results = await link.results(4)
    assert sorted(r.task_id for r in results) == ids
    assert all(r.attempt_number == 1 and r.success.result.json_value == '"done"'
               for r in results)
    assert len(link.of_kind("task_results")) == 1
    assert link.of_kind("task_result") == []


async def test_fast_attempts_are_not_acked_slow_ones_are(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    await runtime.wait_connected(5)
    link.push_tasks(task("fast", "ok", args=[1]), task("slow", "wait"))
    ack = await link.next_message("acks")
    assert [(a.task_id, a.attempt_number) for a in ack.acks.acks] == [("slow", 1)]
    executor.release("slow")
    results = await link.results(2)
    assert {r.task_id for r in results} == {"fast", "slow"}
    assert len(link.of_kind("acks")) == 1


async def test_never_more_than_concurrency_attempts_at_once(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(concurrency=2))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        link.push_tasks(*(task(f"s{i}", "sleep", args=[0.02]) for i in range(7)))
        results = await link.results(7)
        assert len({r.task_id for r in results}) == 7
        assert executor.peak == 2
    finally:
        await rt.stop(0)


async def test_cancel_attempt_stops_it_and_reports_cancelled(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("victim", "wait", attempt=2))
    await executor.wait_started("victim")
    link.push(opb.ServerMsg(cancel=opb.CancelAttempt(task_id="victim", attempt_number=2,
                                                     reason="cancelled")))
    (result,) = await link.results(1)
    assert (result.task_id, result.attempt_number) == ("victim", 2)
    assert result.error.type == "Cancelled"
    assert result.error.retriable is False
    assert executor.cancelled == [("victim", 2)]


async def test_heartbeats_follow_the_hello_ack_interval(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack(interval_ms=50)
    link.push_tasks(task("busy", "wait"))
    await executor.wait_started("busy")
    first = await link.next_message("status")
    second = await link.next_message("status")
    assert second.status.current_load == 1
    assert second.status.available_capacity == 3
    assert first.status.current_load in (0, 1)
    executor.release("busy")


async def test_outcomes_of_a_broken_stream_are_delivered_after_reconnect(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("a", "wait"), task("b", "wait"))
    await executor.wait_started("a")
    await executor.wait_started("b")
    link.break_()
    executor.release("a")  # finishes while disconnected
    link2, hello = await connector.accept()
    held = {(r.task_id, r.attempt_number) for r in hello.running}
    assert held == {("a", 1), ("b", 1)}
    link2.hello_ack()
    (result,) = await link2.results(1)
    assert result.task_id == "a"
    executor.release("b")
    (result,) = await link2.results(1)
    assert result.task_id == "b"
    assert link.of_kind("task_results") == []


async def test_hello_ack_cancel_list_drops_superseded_attempts(
        runtime: ShepherdRuntime, connector: FakeConnector, executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("done", "wait"), task("stale", "wait"), task("kept", "wait"))
    for i in ("done", "stale", "kept"):
        await executor.wait_started(i)
    link.break_()
    executor.release("done")
    link2, hello = await connector.accept()
    assert {r.task_id for r in hello.running} == {"done", "stale", "kept"}
    link2.hello_ack(cancel=[("done", 1), ("stale", 1)])
    await asyncio.sleep(0.05)
    executor.release("kept")
    (result,) = await link2.results(1)
    assert result.task_id == "kept"
    assert ("stale", 1) in executor.cancelled
    await asyncio.sleep(0.05)
    sent = [r.task_id for m in link2.of_kind("task_results") for r in m.task_results.results]
    assert sent == ["kept"]


async def test_results_written_just_before_a_break_are_offered_again(
        runtime: ShepherdRuntime, connector: FakeConnector) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("x", "ok", args=[5]))
    (result,) = await link.results(1)
    assert result.success.result.json_value == "5"
    link.break_()  # the orchestrator may have died before reading it
    link2, hello = await connector.accept()
    assert [(r.task_id, r.attempt_number) for r in hello.running] == [("x", 1)]
    link2.hello_ack()  # it still wants it (after a restart it adopted the attempt)
    (again,) = await link2.results(1)
    assert again.task_id == "x"
    assert runtime.stats["results_redelivered"] == 1


async def test_reconnects_with_backoff_until_the_orchestrator_answers(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    connector.refuse = 5
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        await rt.wait_connected(5)
        assert connector.attempts == 6
    finally:
        await rt.stop(0)


async def test_clean_end_of_stream_reconnects(runtime: ShepherdRuntime,
                                              connector: FakeConnector) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.end()
    _, hello = await connector.accept()
    assert hello.shepherd_uuid == runtime.shepherd_id


async def test_drain_finishes_running_attempts_then_half_closes(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("a", "wait"), task("b", "wait"))
    await executor.wait_started("a")
    await executor.wait_started("b")
    stopping = asyncio.create_task(rt.stop(drain_timeout=10))
    status = await link.next_message("status")  # sent at once: no free slots any more
    assert status.status.available_capacity == 0
    assert rt.draining
    # Assigned by an orchestrator that did not know yet: run, so the task keeps its attempt.
    link.push_tasks(task("late", "ok", args=[1]))
    await executor.wait_started("late")
    executor.release("a")
    executor.release("b")
    results = await link.results(3)
    assert {r.task_id for r in results} == {"a", "b", "late"}
    await asyncio.wait_for(link.finished.wait(), 5)
    await asyncio.wait_for(stopping, 10)
    assert executor.closed
    assert rt.state is RuntimeState.STOPPED


async def test_tasks_pushed_after_the_drain_ended_are_not_started(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("a", "ok", args=[1]))
    await link.results(1)
    link.finish = _no_auto_end(link)  # type: ignore[method-assign,assignment]
    stopping = asyncio.create_task(rt.stop(drain_timeout=5))
    await asyncio.wait_for(link.finished.wait(), 5)
    link.push_tasks(task("too-late", "ok"))  # crossed the half-close
    link.end()
    await asyncio.wait_for(stopping, 10)
    assert ("too-late", 1) not in executor.started


def _no_auto_end(link: FakeLink) -> Callable[[], Awaitable[None]]:
    async def finish() -> None:
        link.finished.set()

    return finish


async def test_drain_timeout_stops_attempts_without_reporting_them(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("stuck", "wait"), task("quick", "ok", args=[1]))
    await executor.wait_started("stuck")
    await link.results(1)
    started = asyncio.get_running_loop().time()
    stopping = asyncio.create_task(rt.stop(drain_timeout=0.2))
    await asyncio.wait_for(link.finished.wait(), 5)
    link.end()
    await asyncio.wait_for(stopping, 10)
    assert asyncio.get_running_loop().time() - started < 3
    assert executor.cancelled == [("stuck", 1)]
    assert all(r.task_id != "stuck" for m in link.of_kind("task_results")
               for r in m.task_results.results)


async def test_second_stop_with_zero_timeout_cuts_the_drain(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("stuck", "wait"))
    await executor.wait_started("stuck")
    first = asyncio.create_task(rt.stop(drain_timeout=60))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(rt.stop(drain_timeout=0), 10)
    await asyncio.wait_for(first, 1)
    assert executor.cancelled == [("stuck", 1)]


async def test_drain_while_disconnected_delivers_after_reconnect(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("a", "wait"))
    await executor.wait_started("a")
    connector.refuse = 3
    link.break_()
    stopping = asyncio.create_task(rt.stop(drain_timeout=10))
    executor.release("a")
    link2, hello = await connector.accept()
    assert [r.task_id for r in hello.running] == ["a"]
    link2.hello_ack()
    (result,) = await link2.results(1)
    assert result.task_id == "a"
    await asyncio.wait_for(link2.finished.wait(), 5)
    link2.end()
    await asyncio.wait_for(stopping, 10)


async def test_an_orchestrator_without_hello_ack_gets_the_original_protocol(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(hello_ack_timeout=0.1))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.push(opb.ServerMsg(task=task("one", "ok", args=["x"])))
        link.push(opb.ServerMsg(task=task("two", "ok", args=["y"])))
        results = await link.results(2)
        assert {r.success.result.json_value for r in results} == {'"x"', '"y"'}
        assert link.of_kind("task_results") == []
        assert len(link.of_kind("task_result")) == 2
    finally:
        await rt.stop(0)


async def test_the_original_protocol_does_not_hold_results(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    # One message per result anyway: holding them would only delay them.
    rt = ShepherdRuntime(executor, connector, config(hello_ack_timeout=0.1, result_interval=5.0))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.push(opb.ServerMsg(task=task("one", "wait")))
        link.push(opb.ServerMsg(task=task("two", "wait")))
        await executor.wait_started("one")
        await executor.wait_started("two")
        executor.release("one")
        await link.results(1)
        await asyncio.sleep(0.05)
        executor.release("two")
        (second,) = await link.results(1, timeout=2.0)
        assert second.task_id == "two"
    finally:
        await rt.stop(0)


async def test_executor_failure_is_reported_as_a_retriable_shepherd_error(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    async def explode(request: object) -> None:
        raise RuntimeError("executor bug")

    executor.on_start = explode
    if isinstance(executor, SubmittingExecutor):
        executor.submit_error = RuntimeError("executor bug")
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        link.push_tasks(task("t", "ok"))
        (result,) = await link.results(1)
        assert result.error.type == "ShepherdError"
        assert result.error.retriable is True
        assert "executor bug" in result.error.message
    finally:
        await rt.stop(0)


async def test_oversized_results_become_result_too_large(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(max_result_bytes=1000))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        link.push_tasks(task("big", "ok", args=["x" * 5000]))
        (result,) = await link.results(1)
        assert result.error.type == "ResultTooLarge"
        assert result.error.retriable is False
    finally:
        await rt.stop(0)


async def test_many_results_are_split_below_the_message_size(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(max_message_bytes=300, concurrency=20))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        ids = [f"t{i:02}" for i in range(20)]
        link.push_tasks(*(task(i, "wait") for i in ids))
        for i in ids:
            await executor.wait_started(i)
        for i in ids:
            executor.gate(i).set()
        results = await link.results(20)
        assert sorted(r.task_id for r in results) == ids
        messages = link.of_kind("task_results")
        assert all(m.ByteSize() <= 400 for m in messages)
        assert 1 < len(messages) < 20
    finally:
        await rt.stop(0)


async def test_duplicate_pushes_run_once(runtime: ShepherdRuntime, connector: FakeConnector,
                                         executor: ScriptedExecutor) -> None:
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("d", "wait"))
    link.push_tasks(task("d", "wait"))
    await executor.wait_started("d")
    await asyncio.sleep(0.05)
    executor.release("d")
    (result,) = await link.results(1)
    assert result.task_id == "d"
    assert executor.started == [("d", 1)]


@pytest.mark.parametrize("interval", [0.0, 0.3])
async def test_results_under_load_share_a_message_every_result_interval(
        executor: ScriptedExecutor, connector: FakeConnector, interval: float) -> None:
    rt = ShepherdRuntime(executor, connector, config(result_interval=interval))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        await rt.wait_connected(5)
        ids = ["a", "b", "c", "d"]
        link.push_tasks(*(task(i, "wait") for i in ids))
        for i in ids:
            await executor.wait_started(i)
        loop = asyncio.get_running_loop()
        released = loop.time()
        executor.release("a")
        (first,) = await link.results(1)  # after a quiet spell: at once
        assert first.task_id == "a"
        assert loop.time() - released < 0.2
        for i in ("b", "c", "d"):  # finish one by one, while the writer is idle
            await asyncio.sleep(0.02)
            executor.release(i)
        rest = await link.results(3)
        assert sorted(r.task_id for r in rest) == ["b", "c", "d"]
        messages = len(link.of_kind("task_results"))
        if interval:
            assert messages == 2  # b, c and d waited for the interval, then went together
            assert loop.time() - released >= interval - 0.02
        else:
            assert messages == 4
    finally:
        await rt.stop(0)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 1.0, multiplier=2.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(10)]
    nominal = [min(1.0, 0.1 * 2**i) for i in range(10)]
    for delay, cap in zip(delays, nominal, strict=True):
        assert cap / 2 <= delay <= cap
    backoff.reset()
    assert backoff.next() <= 0.1


def test_backoff_stays_below_a_share_of_the_outage() -> None:
    backoff = Backoff(0.05, 5.0, rng=random.Random(3), proportion=0.1)
    for _ in range(30):
        backoff.next()  # the exponential part is at the cap by now
    assert backoff.next(outage=0.2) <= 0.05  # not below the initial delay
    assert 0.05 <= backoff.next(outage=1.0) <= 0.1
    assert 1.0 <= backoff.next(outage=20.0) <= 2.0
    assert 2.5 <= backoff.next(outage=600.0) <= 5.0  # the cap still holds
    assert backoff.next() >= 2.5  # no outage given: plain exponential


async def test_a_stable_stream_that_breaks_is_retried_at_once(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    # A backoff of 5 s would fail the test: the retry must not wait for it.
    rt = ShepherdRuntime(executor, connector, config(
        reconnect_initial_delay=5.0, reconnect_max_delay=5.0, stable_after=0.0))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        await rt.wait_connected(5)
        link.break_()
        _, hello = await connector.accept(timeout=1.0)
        assert hello.shepherd_uuid == rt.shepherd_id
        assert rt.stats["immediate_reconnects"] == 1
    finally:
        await rt.stop(0)


async def test_a_stream_that_breaks_right_after_connecting_waits_the_backoff(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    # A server that accepts and drops at once must not be retried in a tight loop.
    rt = ShepherdRuntime(executor, connector, config(
        reconnect_initial_delay=0.4, reconnect_max_delay=0.4, stable_after=60.0))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        await rt.wait_connected(5)
        link.break_()
        loop = asyncio.get_running_loop()
        broken = loop.time()
        await connector.accept(timeout=2.0)
        assert loop.time() - broken >= 0.2 - 0.02  # equal jitter: at least half of 0.4 s
        assert rt.stats["immediate_reconnects"] == 0
    finally:
        await rt.stop(0)


@pytest.mark.parametrize(("code", "quick"), [("UNAVAILABLE", True), ("UNAUTHENTICATED", False)])
async def test_an_unreachable_orchestrator_is_retried_at_a_share_of_the_outage(
        executor: ScriptedExecutor, connector: FakeConnector, code: str, quick: bool) -> None:
    # Initial delay 20 ms, cap 2 s: the plain exponential backoff waits 20 ms * 1.6**k for the
    # k-th of 9 failures, 2.3 s nominal in all (at least half of it with the jitter); bounded
    # by a tenth of the outage, the same tries take a few tenths of a second.
    connector.refuse_code = code
    rt = ShepherdRuntime(executor, connector, config(
        reconnect_initial_delay=0.02, reconnect_max_delay=2.0, reconnect_proportion=0.1,
        stable_after=0.0))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack()
        await rt.wait_connected(5)
        connector.refuse = 9
        link.break_(code)
        await connector.accept(timeout=10.0)
        times = connector.attempt_times[1:]  # from the immediate retry on
        assert len(times) == 10
        elapsed = times[-1] - times[0]
        if quick:
            assert elapsed < 0.9, elapsed
        else:
            assert elapsed > 1.0, elapsed
    finally:
        await rt.stop(0)


def test_runtime_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        RuntimeConfig(concurrency=0)
    with pytest.raises(ValueError, match="result_interval"):
        RuntimeConfig(result_interval=-1)


def test_result_payload_is_json_text() -> None:
    from azolla.domain.ports import ExecutionOutcome
    from azolla.shepherd._wire import result_from_outcome

    ok = result_from_outcome(ExecutionOutcome("t", 3, True, json.dumps({"a": [1, 2]})))
    assert ok.attempt_number == 3
    assert json.loads(ok.success.result.json_value) == {"a": [1, 2]}
    bad = result_from_outcome(ExecutionOutcome("t", 1, False, error_type="E",
                                               error_message="m", retriable=False))
    assert (bad.error.type, bad.error.message, bad.error.data, bad.error.retriable) == (
        "E", "m", "{}", False)


async def test_a_silent_orchestrator_that_used_to_ping_is_replaced(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(server_silence_timeout=0.2))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack(interval_ms=50)
        link.push(opb.ServerMsg(ping=opb.Ping(timestamp=1)))
        _, hello = await connector.accept(timeout=5)  # then silence: a new stream is opened
        assert hello.shepherd_uuid == rt.shepherd_id
    finally:
        await rt.stop(0)


async def test_an_orchestrator_that_never_pings_is_not_timed_out(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config(server_silence_timeout=0.1))
    await rt.start()
    try:
        link, _ = await connector.accept()
        link.hello_ack(interval_ms=20)
        await link.next_message("status")
        await asyncio.sleep(0.3)
        assert len(connector.all_links) == 1
    finally:
        await rt.stop(0)


@pytest.mark.skipif(not runtime_module._WIRE_HAS_DRAIN_SIGNAL,
                    reason="the wire contract has no Status.draining yet")
async def test_with_a_drain_signal_outcomes_are_reported_at_once(
        executor: ScriptedExecutor, connector: FakeConnector) -> None:
    rt = ShepherdRuntime(executor, connector, config())
    await rt.start()
    link, _ = await connector.accept()
    link.hello_ack()
    link.push_tasks(task("a", "wait"), task("b", "wait"))
    await executor.wait_started("a")
    await executor.wait_started("b")
    stopping = asyncio.create_task(rt.stop(drain_timeout=10))
    status = await link.next_message("status")
    assert getattr(status.status, runtime_module._DRAIN_FIELD) is True
    executor.release("a")
    (first,) = await link.results(1)  # not held: the orchestrator assigns no more work
    assert first.task_id == "a"
    executor.release("b")
    await link.results(1)
    await asyncio.wait_for(stopping, 10)
