"""The orchestrator core, driven in memory: no sockets, no processes, a manual clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID, uuid4

import pytest

from azolla.adapters.memory.event_store import InMemoryEventLog, InMemoryEventStore
from azolla.adapters.memory.transport import InProcessShepherd, InProcessTransport
from azolla.app.model import ReportedOutcome, ShepherdHello, SubmitRequest, TaskOutcome
from azolla.app.orchestrator import Orchestrator, OrchestratorConfig
from azolla.domain.errors import (
    AzollaDomainError,
    InvalidTaskSpec,
    InvalidTransition,
    StoreUnavailable,
    TaskAlreadyTerminal,
    TaskNotFound,
)
from azolla.domain.ports import NewEvent
from azolla.domain.retry import RetryPolicy, WaitKind
from azolla.domain.values import ErrorInfo, TaskState

pytestmark = pytest.mark.timeout(20)


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value


class FixedIds:
    """Random task ids, fixed jitter (so retry delays are predictable)."""

    def __init__(self, jitter: float = 0.5) -> None:
        self.jitter = jitter

    def new_task_id(self) -> UUID:
        return uuid4()

    def random(self) -> float:
        return self.jitter


FAST_RETRY = RetryPolicy(max_attempts=3, wait=WaitKind.FIXED, initial_delay=0.0)


@pytest.fixture
def log() -> InMemoryEventLog:
    return InMemoryEventLog()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def orch(log: InMemoryEventLog, clock: ManualClock) -> AsyncIterator[Orchestrator]:
    o = Orchestrator(InMemoryEventStore(log), clock=clock, ids=FixedIds(),
                     config=OrchestratorConfig(heartbeat_timeout=1000, reconnect_grace=5))
    await o.start()
    yield o
    await o.stop()


async def shepherd(orch: Orchestrator, tasks: dict[str, Any], **kw: Any) -> InProcessShepherd:
    s = InProcessShepherd(orch, tasks, **kw)
    await s.start()
    return s


async def manual_shepherd(orch: Orchestrator, capacity: int) -> tuple[Any, InProcessTransport]:
    """Connect a shepherd "s1" whose pushes the test reads and answers itself."""
    transport = InProcessTransport("s1")
    session = await orch.connect_shepherd(
        ShepherdHello("s1", capacity=capacity, accepts_batches=True), transport)
    return session, transport


async def run_one(orch: Orchestrator, request: SubmitRequest) -> TaskOutcome:
    [result] = await orch.submit([request])
    outcome = await orch.wait(request.domain, result.task_id, 5)
    assert outcome is not None
    return outcome


async def test_submit_run_succeed(orch: Orchestrator) -> None:
    await shepherd(orch, {"greet": lambda name, age: {"greeting": f"Hello {name}! {age}"}})
    outcome = await run_one(orch, SubmitRequest(name="greet",
                                                kwargs='{"name": "Alice", "age": 25}'))
    assert outcome.state is TaskState.SUCCEEDED
    assert json.loads(outcome.result or "") == {"greeting": "Hello Alice! 25"}


async def test_failure_then_success_under_retry_policy(orch: Orchestrator) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")
        return "done"

    await shepherd(orch, {"flaky": flaky})
    outcome = await run_one(orch, SubmitRequest(name="flaky", policy=FAST_RETRY))
    assert outcome.state is TaskState.SUCCEEDED
    view = await orch.status("default", outcome.task_id)
    assert [a.state for a in view.attempts] == ["failed", "failed", "succeeded"]
    assert view.attempts[0].error is not None
    assert view.attempts[0].error.type == "ValueError"


async def test_non_retriable_error_stops_retries(orch: Orchestrator) -> None:
    class Fatal(Exception):
        retriable = False

    def boom() -> None:
        raise Fatal("no")

    await shepherd(orch, {"boom": boom})
    outcome = await run_one(orch, SubmitRequest(name="boom", policy=FAST_RETRY))
    assert outcome.state is TaskState.FAILED
    assert outcome.error is not None
    assert outcome.error.type == "Fatal"
    assert len((await orch.status("default", outcome.task_id)).attempts) == 1


async def test_attempts_exhausted_fails_with_last_error(orch: Orchestrator) -> None:
    def boom() -> None:
        raise RuntimeError("always")

    await shepherd(orch, {"boom": boom})
    outcome = await run_one(orch, SubmitRequest(name="boom", policy=FAST_RETRY))
    assert outcome.state is TaskState.FAILED
    assert len((await orch.status("default", outcome.task_id)).attempts) == 3


async def test_retry_waits_for_its_delay(orch: Orchestrator, clock: ManualClock) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first")
        return "ok"

    await shepherd(orch, {"flaky": flaky})
    policy = RetryPolicy(max_attempts=2, wait=WaitKind.FIXED, initial_delay=60)
    [r] = await orch.submit([SubmitRequest(name="flaky", policy=policy)])
    assert await orch.wait("default", r.task_id, 0.3) is None
    assert len(calls) == 1
    assert (await orch.status("default", r.task_id)).state is TaskState.RETRY_WAIT
    clock.value += 61
    orch.tick()
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED


async def test_not_before_delays_dispatch(orch: Orchestrator, clock: ManualClock) -> None:
    await shepherd(orch, {"t": lambda: 1})
    [r] = await orch.submit([SubmitRequest(name="t", not_before=clock.value + 30)])
    assert await orch.wait("default", r.task_id, 0.2) is None
    clock.value += 31
    orch.tick()
    assert (await orch.wait("default", r.task_id, 5)) is not None


async def test_idempotency_key_returns_same_task(orch: Orchestrator) -> None:
    a = await orch.submit([SubmitRequest(name="t", idempotency_key="k1")])
    b = await orch.submit([SubmitRequest(name="t", idempotency_key="k1"),
                           SubmitRequest(name="t", idempotency_key="k1")])
    assert a[0].task_id == b[0].task_id == b[1].task_id
    assert b[0].deduplicated
    assert b[1].deduplicated
    assert not a[0].deduplicated
    other = await orch.submit([SubmitRequest(name="t", idempotency_key="k1", domain="d2")])
    assert other[0].task_id != a[0].task_id


async def test_invalid_submissions_are_refused_with_the_field(orch: Orchestrator) -> None:
    cases = [
        SubmitRequest(name=""),
        SubmitRequest(name="x" * 10_000),
        SubmitRequest(name="t", args='{"a": 1}'),
        SubmitRequest(name="t", kwargs="[1]"),
        SubmitRequest(name="t", args="[" * 10_000 + "]" * 10_000),
        SubmitRequest(name="t", args="not json"),
        SubmitRequest(name="t", timeout=float("nan")),
    ]
    for request in cases:
        with pytest.raises(InvalidTaskSpec):
            await orch.submit([request])
    with pytest.raises(InvalidTaskSpec, match=r"tasks\[1\]"):
        await orch.submit([SubmitRequest(name="t"), SubmitRequest(name="t", args="{}")])
    assert await orch.store.max_position() == 0


async def test_cancel_queued_and_running_and_terminal(orch: Orchestrator) -> None:
    [queued] = await orch.submit([SubmitRequest(name="slow")])
    assert await orch.cancel("default", queued.task_id) is TaskState.CANCELLED
    outcome = await orch.wait("default", queued.task_id, 1)
    assert outcome is not None
    assert outcome.state is TaskState.CANCELLED

    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    sh = await shepherd(orch, {"slow": slow})
    [running] = await orch.submit([SubmitRequest(name="slow")])
    await asyncio.wait_for(started.wait(), 5)
    assert await orch.cancel("default", running.task_id) is TaskState.CANCELLED
    view = await orch.status("default", running.task_id)
    assert view.state is TaskState.CANCELLED
    assert view.attempts[-1].state == "cancelled"
    assert sh.session is not None
    assert not sh.session.shepherd.running
    with pytest.raises(TaskAlreadyTerminal):
        await orch.cancel("default", running.task_id)


async def test_other_domain_sees_not_found(orch: Orchestrator) -> None:
    [r] = await orch.submit([SubmitRequest(name="t", domain="a")])
    with pytest.raises(TaskNotFound):
        await orch.status("b", r.task_id)
    with pytest.raises(TaskNotFound):
        await orch.wait("b", r.task_id, 0)
    with pytest.raises(TaskNotFound):
        await orch.cancel("b", r.task_id)
    with pytest.raises(TaskNotFound):
        await orch.status("a", uuid4())


async def test_stale_result_is_rejected_and_recorded(orch: Orchestrator) -> None:
    session, transport = await manual_shepherd(orch, capacity=2)
    [r] = await orch.submit([SubmitRequest(name="t", policy=FAST_RETRY)])
    kind, [request] = await asyncio.wait_for(transport.inbox.get(), 5)
    assert kind == "tasks"
    assert request.attempt == 1
    err = ErrorInfo("IOError", "flaky")
    await orch.report_results(session, [ReportedOutcome(str(r.task_id), 1, False, error=err)])
    kind, [request2] = await asyncio.wait_for(transport.inbox.get(), 5)
    assert request2.attempt == 2
    # A late success of attempt 1 must not end the task.
    await orch.report_results(session, [ReportedOutcome(str(r.task_id), 1, True, "1")])
    assert (await orch.status("default", r.task_id)).state is TaskState.RUNNING
    assert orch.metrics["stale_results"] == 1
    types = [e.type for e in await orch.store.read_all(0, 1000)]
    assert "AttemptOutcomeRejected.v1" in types
    await orch.report_results(session, [ReportedOutcome(str(r.task_id), 2, True, '"ok"')])
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.result == '"ok"'
    # And after the end, any further result is rejected too.
    await orch.report_results(session, [ReportedOutcome(str(r.task_id), 2, False, error=err)])
    terminal = [e for e in await orch.store.read_all(0, 1000) if e.terminal]
    assert len(terminal) == 1


async def test_result_without_attempt_number_matches_current(orch: Orchestrator) -> None:
    transport = InProcessTransport("old")
    session = await orch.connect_shepherd(ShepherdHello("old", capacity=1), transport)
    [r] = await orch.submit([SubmitRequest(name="t")])
    await asyncio.wait_for(transport.inbox.get(), 5)
    await orch.report_results(session, [ReportedOutcome(str(r.task_id), 0, True, "7")])
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.result == "7"


async def test_capacity_is_never_exceeded(orch: Orchestrator) -> None:
    transport = InProcessTransport("s")
    session = await orch.connect_shepherd(ShepherdHello("s", capacity=3), transport)
    results = await orch.submit([SubmitRequest(name="t") for _ in range(10)])
    await orch.idle()
    pushed: list[Any] = []
    while not transport.inbox.empty():
        pushed.extend(transport.inbox.get_nowait()[1])
    assert len(pushed) == 3
    assert len(session.shepherd.running) == 3
    await orch.report_results(session, [ReportedOutcome(pushed[0].task_id, 1, True, "1")])
    await orch.idle()
    more = transport.inbox.get_nowait()[1]
    assert len(more) == 1
    assert len(session.shepherd.running) == 3
    assert {r.task_id for r in results} >= {UUID(p.task_id) for p in pushed}


async def test_priority_then_age(orch: Orchestrator) -> None:
    order: list[str] = []
    results = await orch.submit([
        SubmitRequest(name="t", args='["low-1"]', priority=0),
        SubmitRequest(name="t", args='["high"]', priority=5),
        SubmitRequest(name="t", args='["low-2"]', priority=0),
    ])
    await shepherd(orch, {"t": order.append}, capacity=1)
    for r in results:
        await orch.wait("default", r.task_id, 5)
    assert order == ["high", "low-1", "low-2"]


async def test_tasks_wait_for_a_shepherd_of_their_group(orch: Orchestrator) -> None:
    [r] = await orch.submit([SubmitRequest(name="t", group="gpu")])
    await shepherd(orch, {"t": lambda: 1}, group="cpu")
    assert await orch.wait("default", r.task_id, 0.2) is None
    assert (await orch.status("default", r.task_id)).state is TaskState.QUEUED
    await shepherd(orch, {"t": lambda: 1}, group="gpu")
    assert await orch.wait("default", r.task_id, 5) is not None


async def test_shepherd_disconnect_retries_elsewhere(orch: Orchestrator) -> None:
    transport = InProcessTransport("dying")
    session = await orch.connect_shepherd(ShepherdHello("dying", capacity=4), transport)
    results = await orch.submit([SubmitRequest(name="t", policy=FAST_RETRY) for _ in range(3)])
    await asyncio.wait_for(transport.inbox.get(), 5)
    await orch.disconnect_shepherd(session, "connection reset")
    healthy = await shepherd(orch, {"t": lambda: "ok"})
    for r in results:
        outcome = await orch.wait("default", r.task_id, 5)
        assert outcome is not None
        assert outcome.state is TaskState.SUCCEEDED
        attempts = (await orch.status("default", r.task_id)).attempts
        assert [a.state for a in attempts] == ["lost", "succeeded"]
    assert len(healthy.executions) == 3


async def test_lost_shepherd_retries_even_when_filters_exclude(orch: Orchestrator) -> None:
    policy = RetryPolicy(max_attempts=2, include_errors=("OnlyThis",))
    transport = InProcessTransport("x")
    session = await orch.connect_shepherd(ShepherdHello("x", capacity=1), transport)
    [r] = await orch.submit([SubmitRequest(name="t", policy=policy)])
    await asyncio.wait_for(transport.inbox.get(), 5)
    await orch.disconnect_shepherd(session, "gone")
    view = await orch.status("default", r.task_id)
    assert view.state is TaskState.RETRY_WAIT
    assert view.ready_at <= orch.clock.now()


async def test_silent_shepherd_is_expired(orch: Orchestrator, clock: ManualClock) -> None:
    transport = InProcessTransport("quiet")
    await orch.connect_shepherd(ShepherdHello("quiet", capacity=1), transport)
    [r] = await orch.submit([SubmitRequest(name="t", policy=FAST_RETRY)])
    await asyncio.wait_for(transport.inbox.get(), 5)
    clock.value += 1001
    orch.tick()
    await orch.idle()
    assert transport.closed is not None
    view = await orch.status("default", r.task_id)
    assert view.attempts[0].state == "lost"
    assert view.state is TaskState.RETRY_WAIT


async def test_lease_expiry_times_out_the_attempt(orch: Orchestrator, clock: ManualClock) -> None:
    transport = InProcessTransport("slow")
    await orch.connect_shepherd(ShepherdHello("slow", capacity=1), transport)
    [r] = await orch.submit([SubmitRequest(name="t", timeout=10,
                                           policy=RetryPolicy(max_attempts=1))])
    await asyncio.wait_for(transport.inbox.get(), 5)
    clock.value += 10 + orch.config.lease_grace + 1
    orch.tick()
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.FAILED
    assert outcome.error is not None
    assert outcome.error.type == "TaskTimeout"
    kind, body = await asyncio.wait_for(transport.inbox.get(), 5)
    assert kind == "cancel"
    assert body[1] == 1


async def test_commit_failure_fails_callers_and_loses_nothing(orch: Orchestrator) -> None:
    store = orch.store
    assert isinstance(store, InMemoryEventStore)
    store.fail_next(1, StoreUnavailable("database down"))
    with pytest.raises(StoreUnavailable):
        await orch.submit([SubmitRequest(name="t", idempotency_key="k")])
    # Nothing was recorded, so the key is free and a retry creates the task.
    [r] = await orch.submit([SubmitRequest(name="t", idempotency_key="k")])
    assert not r.deduplicated
    await shepherd(orch, {"t": lambda: 1})
    assert await orch.wait("default", r.task_id, 5) is not None


class FailFirstDispatch(InMemoryEventStore):
    """Fails the first append that starts an attempt."""

    failed = False

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        if not self.failed and any(e.type == "TaskAttemptStarted.v1" for e in events):
            self.failed = True
            raise StoreUnavailable("blip")
        return await super().append(events)


async def test_failed_dispatch_commit_puts_tasks_back(log: InMemoryEventLog) -> None:
    store = FailFirstDispatch(log)
    orch = Orchestrator(store)
    await orch.start()
    [r] = await orch.submit([SubmitRequest(name="t")])
    sh = await shepherd(orch, {"t": lambda: 1})
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    assert store.failed
    assert sh.session is not None
    assert not sh.session.shepherd.running
    await orch.stop()


async def test_restart_rebuilds_and_reconciles(log: InMemoryEventLog, clock: ManualClock) -> None:
    config = OrchestratorConfig(reconnect_grace=5, heartbeat_timeout=60)
    first = Orchestrator(InMemoryEventStore(log), clock=clock, ids=FixedIds(), config=config)
    await first.start()
    transport = InProcessTransport("survivor")
    await first.connect_shepherd(ShepherdHello("survivor", capacity=2), transport)
    running, orphan = await first.submit([SubmitRequest(name="t"), SubmitRequest(name="t")])
    await asyncio.wait_for(transport.inbox.get(), 5)
    await first.idle()
    await first.stop()

    second = Orchestrator(InMemoryEventStore(log), clock=clock, ids=FixedIds(), config=config)
    await second.start()
    assert first.taskset.snapshot() == second.taskset.snapshot()
    # The shepherd reconnects and still runs one of the two attempts.
    transport2 = InProcessTransport("survivor")
    session = await second.connect_shepherd(
        ShepherdHello("survivor", capacity=2, running=((str(running.task_id), 1),)), transport2)
    assert session.cancel_on_connect == []
    await second.report_results(session, [ReportedOutcome(str(running.task_id), 1, True, "1")])
    outcome = await second.wait("default", running.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    # The other attempt is unclaimed: after the grace period it is lost and retried.
    clock.value += 6
    second.tick()
    await second.idle()
    kind, body = await asyncio.wait_for(transport2.inbox.get(), 5)
    assert kind == "tasks"
    assert body[0].task_id == str(orphan.task_id)
    assert body[0].attempt == 2
    terminal = [e for e in await second.store.read_all(0, 10_000) if e.terminal]
    assert len(terminal) == 1
    await second.stop()


async def test_reconnecting_shepherd_is_told_to_stop_superseded_attempts(
        orch: Orchestrator) -> None:
    transport = InProcessTransport("s")
    session = await orch.connect_shepherd(ShepherdHello("s", capacity=1), transport)
    [r] = await orch.submit([SubmitRequest(name="t", policy=FAST_RETRY)])
    await asyncio.wait_for(transport.inbox.get(), 5)
    await orch.disconnect_shepherd(session, "blip")
    again = await orch.connect_shepherd(
        ShepherdHello("s", capacity=1, running=((str(r.task_id), 1),)), InProcessTransport("s"))
    assert again.cancel_on_connect == [(str(r.task_id), 1)]


async def test_domain_concurrency_limit(log: InMemoryEventLog, clock: ManualClock) -> None:
    o = Orchestrator(InMemoryEventStore(log), clock=clock,
                     config=OrchestratorConfig(domain_concurrency={"default": 2}))
    await o.start()
    t1, t2 = InProcessTransport("a"), InProcessTransport("b")
    await o.connect_shepherd(ShepherdHello("a", capacity=5), t1)
    await o.connect_shepherd(ShepherdHello("b", capacity=5), t2)
    await o.submit([SubmitRequest(name="t") for _ in range(6)])
    await o.idle()
    pushed = sum(len(q.get_nowait()[1]) for q in (t1.inbox, t2.inbox) for _ in range(q.qsize()))
    assert pushed == 2
    await o.stop()


async def test_outcome_hooks_run_after_commit(log: InMemoryEventLog) -> None:
    seen: list[TaskOutcome] = []
    o = Orchestrator(InMemoryEventStore(log), hooks=[seen.append])
    await o.start()
    await shepherd(o, {"t": lambda: 3})
    outcome = await run_one(o, SubmitRequest(name="t"))
    assert seen == [outcome]
    await o.stop()


async def test_wait_timeout_zero_checks_without_waiting(orch: Orchestrator) -> None:
    [r] = await orch.submit([SubmitRequest(name="t")])
    assert await orch.wait("default", r.task_id, 0) is None


async def test_outcomes_of_forgotten_tasks_are_read_from_the_log(
        log: InMemoryEventLog) -> None:
    o = Orchestrator(InMemoryEventStore(log), config=OrchestratorConfig(outcome_cache=2))
    await o.start()
    await shepherd(o, {"t": lambda x: x})
    results = await o.submit([SubmitRequest(name="t", args=f"[{i}]") for i in range(5)])
    for r in results:
        await o.wait("default", r.task_id, 5)
    assert results[0].task_id not in o.taskset.tasks
    # The forgotten tasks' attempts left the attempt index too (one attempt per kept task).
    assert len(o.taskset.attempt_task) == len(o.taskset.tasks) == 2
    outcome = await o.wait("default", results[0].task_id, 0)
    assert outcome is not None
    assert outcome.result == "0"
    view = await o.status("default", results[0].task_id)
    assert view.state is TaskState.SUCCEEDED
    assert view.attempts[0].state == "succeeded"
    await o.stop()


async def test_list_tasks_filters_and_pages(orch: Orchestrator) -> None:
    results = await orch.submit([SubmitRequest(name="a" if i % 2 else "b") for i in range(7)])
    await orch.submit([SubmitRequest(name="a", domain="other")])
    page, cursor = orch.list_tasks(domain="default", name="a", limit=2)
    assert [v.task_id for v in page] == [results[1].task_id, results[3].task_id]
    rest, end = orch.list_tasks(domain="default", name="a", cursor=cursor, limit=2)
    assert [v.task_id for v in rest] == [results[5].task_id]
    assert end == 0
    queued, _ = orch.list_tasks(domain="default", state=TaskState.QUEUED, limit=100)
    assert len(queued) == 7


async def test_requeue_failed_task_is_a_new_task_once(orch: Orchestrator) -> None:
    def boom() -> None:
        raise RuntimeError("always")

    sh = await shepherd(orch, {"boom": boom})
    failed = await run_one(orch, SubmitRequest(name="boom", args="[]",
                                               policy=RetryPolicy(max_attempts=1)))
    assert failed.state is TaskState.FAILED
    again = await orch.requeue("default", failed.task_id)
    assert again.task_id != failed.task_id
    assert not again.deduplicated
    twice = await orch.requeue("default", failed.task_id)
    assert twice.task_id == again.task_id
    assert twice.deduplicated
    outcome = await orch.wait("default", again.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.FAILED
    assert len(sh.executions) == 2
    with pytest.raises(TaskNotFound):
        await orch.requeue("other", failed.task_id)
    [queued] = await orch.submit([SubmitRequest(name="nobody-runs-this", group="none")])
    with pytest.raises(InvalidTransition):
        await orch.requeue("default", queued.task_id)


async def test_a_draining_shepherd_gets_no_more_work(orch: Orchestrator) -> None:
    transport = InProcessTransport("d")
    session = await orch.connect_shepherd(ShepherdHello("d", capacity=4), transport)
    [first] = await orch.submit([SubmitRequest(name="t")])
    _, [request] = await asyncio.wait_for(transport.inbox.get(), 5)
    await orch.drain_shepherd(session)
    [second] = await orch.submit([SubmitRequest(name="t")])
    await orch.idle()
    assert transport.inbox.empty()
    # What it already runs still completes normally.
    await orch.report_results(session, [ReportedOutcome(request.task_id, 1, True, "1")])
    outcome = await orch.wait("default", first.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    assert (await orch.status("default", second.task_id)).state is TaskState.QUEUED
    assert "ShepherdDrained.v1" in [e.type for e in await orch.store.read_all(0, 1000)]


class DispatchAlwaysFails(InMemoryEventStore):
    """Refuses every append that starts an attempt (a conflict that never resolves)."""

    tries = 0

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        if any(e.type == "TaskAttemptStarted.v1" for e in events):
            self.tries += 1
            raise StoreUnavailable("database refuses this commit")
        return await super().append(events)


async def test_commits_that_keep_failing_back_off(log: InMemoryEventLog) -> None:
    store = DispatchAlwaysFails(log)
    orch = Orchestrator(store)
    await orch.start()
    await orch.submit([SubmitRequest(name="t")])
    await orch.connect_shepherd(ShepherdHello("s", capacity=1), InProcessTransport("s"))
    await asyncio.sleep(1.0)
    # Pauses of 2, 4, 8 ... ms (doubling, capped): about ten tries in a second, not thousands.
    assert 3 <= store.tries <= 15
    # Other work still goes through between the tries.
    [other] = await orch.submit([SubmitRequest(name="u", group="elsewhere")])
    assert (await orch.status("default", other.task_id)).state is TaskState.QUEUED
    await orch.stop()


class CommitsThenFails(InMemoryEventStore):
    """Commits the first batch that matches ``kind``, then reports it as failed (a dropped
    connection after the commit: the caller cannot know)."""

    def __init__(self, log: InMemoryEventLog, kind: str) -> None:
        super().__init__(log)
        self.kind = kind
        self.tricked = False

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        positions = await super().append(events)
        if not self.tricked and any(e.type == self.kind for e in events):
            self.tricked = True
            raise StoreUnavailable("commit outcome unknown: the connection dropped")
        return positions


async def test_a_dispatch_committed_but_reported_failed_is_retried_not_stuck(
        log: InMemoryEventLog) -> None:
    store = CommitsThenFails(log, "TaskAttemptStarted.v1")
    orch = Orchestrator(store)
    await orch.start()
    [r] = await orch.submit([SubmitRequest(name="t", policy=FAST_RETRY)])
    sh = await shepherd(orch, {"t": lambda: "done"})  # dispatch in a batch of its own
    outcome = await orch.wait("default", r.task_id, 5)
    assert store.tricked
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    attempts = (await orch.status("default", r.task_id)).attempts
    assert [a.state for a in attempts] == ["lost", "succeeded"]
    assert len(sh.executions) == 1
    await orch.stop()


async def test_a_submit_committed_but_reported_failed_keeps_its_key(
        log: InMemoryEventLog) -> None:
    store = CommitsThenFails(log, "TaskSubmitted.v1")
    orch = Orchestrator(store)
    await orch.start()
    with pytest.raises(StoreUnavailable):
        await orch.submit([SubmitRequest(name="t", idempotency_key="once")])
    [again] = await orch.submit([SubmitRequest(name="t", idempotency_key="once")])
    assert again.deduplicated
    submitted = [e for e in await store.read_all(0, 100) if e.type == "TaskSubmitted.v1"]
    assert [e.stream_id for e in submitted] == [again.task_id]
    await orch.stop()


class GatedStore(InMemoryEventStore):
    """Holds each append until the test opens the gate; can fail the held one."""

    def __init__(self, log: InMemoryEventLog) -> None:
        super().__init__(log)
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = asyncio.Event()
        self.fail_held: BaseException | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.appends: list[list[str]] = []

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not self.gate.is_set():
                self.held.set()
                await self.gate.wait()
                if self.fail_held is not None:
                    error, self.fail_held = self.fail_held, None
                    raise error
            self.appends.append([e.type for e in events])
            return await super().append(events)
        finally:
            self.in_flight -= 1


async def _hold_next_append(orch: Orchestrator, store: GatedStore,
                            request: SubmitRequest) -> asyncio.Task[Any]:
    store.gate.clear()
    store.held.clear()
    first = asyncio.ensure_future(orch.submit([request]))
    await asyncio.wait_for(store.held.wait(), 5)
    return first


async def test_batch_decided_during_a_commit_is_sent_after_it(log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    first = await _hold_next_append(orch, store, SubmitRequest(name="a", idempotency_key="k"))
    # Decided while the first append is held: the same key must resolve to the first task.
    second = asyncio.ensure_future(orch.submit([SubmitRequest(name="a", idempotency_key="k"),
                                                SubmitRequest(name="b")]))
    await asyncio.sleep(0.05)
    assert not second.done()
    assert store.max_in_flight == 1
    store.gate.set()
    [r1] = await first
    d, b = await second
    assert d.deduplicated
    assert d.task_id == r1.task_id
    assert not b.deduplicated
    assert store.max_in_flight == 1
    assert store.appends == [["TaskSubmitted.v1"], ["TaskSubmitted.v1"]]
    await orch.stop()


async def test_a_failed_commit_fails_the_batch_decided_on_top_of_it(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    first = await _hold_next_append(orch, store, SubmitRequest(name="a", idempotency_key="k"))
    second = asyncio.ensure_future(orch.submit([SubmitRequest(name="b", idempotency_key="j")]))
    await asyncio.sleep(0.05)
    store.fail_held = StoreUnavailable("database down")
    store.gate.set()
    with pytest.raises(StoreUnavailable):
        await first
    with pytest.raises(StoreUnavailable):
        await second
    assert not [e for e in await store.read_all(0, 100) if e.type == "TaskSubmitted.v1"]
    # Nothing was recorded: both keys are free, and the tasks run once resubmitted.
    [a] = await orch.submit([SubmitRequest(name="a", idempotency_key="k")])
    [b] = await orch.submit([SubmitRequest(name="b", idempotency_key="j")])
    assert not a.deduplicated
    assert not b.deduplicated
    await shepherd(orch, {"a": lambda: 1, "b": lambda: 2})
    for task_id in (a.task_id, b.task_id):
        outcome = await orch.wait("default", task_id, 5)
        assert outcome is not None
        assert outcome.state is TaskState.SUCCEEDED
    await orch.stop()


async def test_results_decided_on_a_failed_commit_are_undone_then_recorded_once(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store, config=OrchestratorConfig(heartbeat_timeout=1000))
    await orch.start()
    session, transport = await manual_shepherd(orch, capacity=4)
    await orch.submit([SubmitRequest(name="t", args=f"[{i}]") for i in range(4)])
    pushed: list[Any] = []
    while len(pushed) < 4:
        kind, body = await asyncio.wait_for(transport.inbox.get(), 5)
        assert kind == "tasks"
        pushed.extend(body)
    outcomes = [ReportedOutcome(r.task_id, r.attempt, True, "1") for r in pushed]
    first = await _hold_next_append(orch, store, SubmitRequest(name="t"))
    report = asyncio.ensure_future(orch.report_results(session, outcomes))
    await asyncio.sleep(0.05)  # the results are decided on top of the held commit
    assert not session.shepherd.running
    store.fail_held = StoreUnavailable("database down")
    store.gate.set()
    with pytest.raises(StoreUnavailable):
        await first
    with pytest.raises(StoreUnavailable):
        await report
    # Undone with the failed commit: the slots are taken again, nothing is recorded.
    assert len(session.shepherd.running) == 4
    assert not [e for e in await store.read_all(0, 1000) if e.type == "TaskSucceeded.v1"]
    await orch.report_results(session, outcomes)  # what the gRPC service does: retry
    for r in pushed:
        outcome = await orch.wait("default", UUID(r.task_id), 5)
        assert outcome is not None
        assert outcome.state is TaskState.SUCCEEDED
    assert not session.shepherd.running
    succeeded = [e for e in await store.read_all(0, 1000) if e.type == "TaskSucceeded.v1"]
    assert len(succeeded) == 4
    await orch.stop()


async def test_a_cancel_waits_for_the_commit_in_flight(log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    [queued] = await orch.submit([SubmitRequest(name="x")])
    first = await _hold_next_append(orch, store, SubmitRequest(name="a"))
    cancel = asyncio.ensure_future(orch.cancel("default", queued.task_id))
    await asyncio.sleep(0.05)
    assert not cancel.done()
    assert store.appends == [["TaskSubmitted.v1"]]
    store.gate.set()
    await first
    assert await cancel is TaskState.CANCELLED
    assert store.appends[-1] == ["TaskCancelled.v1"]
    await orch.stop()


async def test_a_due_retry_runs_on_its_own_real_clock(log: InMemoryEventLog) -> None:
    """Nothing but the timer wakes the loop (no tick, no other command)."""
    orch = Orchestrator(InMemoryEventStore(log), ids=FixedIds())
    await orch.start()
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first time fails")
        return "ok"

    await shepherd(orch, {"flaky": flaky})
    policy = RetryPolicy(max_attempts=2, wait=WaitKind.FIXED, initial_delay=0.05)
    outcome = await run_one(orch, SubmitRequest(name="flaky", policy=policy))
    assert outcome.state is TaskState.SUCCEEDED
    assert len(calls) == 2
    await orch.stop()


async def test_a_submit_with_a_free_slot_is_started_in_the_same_commit(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    sh = await shepherd(orch, {"t": lambda: 1}, capacity=1)
    [r] = await orch.submit([SubmitRequest(name="t")])
    outcome = await orch.wait("default", r.task_id, 5)
    assert outcome is not None
    assert outcome.state is TaskState.SUCCEEDED
    assert ["TaskSubmitted.v1", "TaskAttemptStarted.v1", "AttemptAssigned.v1"] in store.appends
    assert sh.executions == [(str(r.task_id), 1)]
    await orch.stop()


async def test_direct_start_never_overtakes_waiting_tasks(log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store, config=OrchestratorConfig(heartbeat_timeout=1000))
    await orch.start()
    session, transport = await manual_shepherd(orch, capacity=1)
    [r0] = await orch.submit([SubmitRequest(name="t", args="[0]")])
    _kind, [running] = await asyncio.wait_for(transport.inbox.get(), 5)
    assert running.task_id == str(r0.task_id)
    r1, r2 = await orch.submit([SubmitRequest(name="t", args=f"[{i}]") for i in (1, 2)])
    # One step decides: the slot frees (result of task 0), then task 3 arrives.
    held = await _hold_next_append(orch, store, SubmitRequest(name="other", group="g2"))
    report = asyncio.ensure_future(orch.report_results(
        session, [ReportedOutcome(running.task_id, running.attempt, True, "0")]))
    late = asyncio.ensure_future(orch.submit([SubmitRequest(name="t", args="[3]")]))
    await asyncio.sleep(0.05)
    store.gate.set()
    await held
    await report
    [r3] = await late
    _kind, pushed = await asyncio.wait_for(transport.inbox.get(), 5)
    assert [p.task_id for p in pushed] == [str(r1.task_id)]
    assert (await orch.status("default", r3.task_id)).state is TaskState.QUEUED
    assert (await orch.status("default", r2.task_id)).state is TaskState.QUEUED
    await orch.stop()


async def test_a_failed_direct_start_frees_the_slot_and_pushes_nothing(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    sh = await shepherd(orch, {"t": lambda: 1}, capacity=1)
    first = await _hold_next_append(orch, store, SubmitRequest(name="t"))
    store.fail_held = StoreUnavailable("database down")
    store.gate.set()
    with pytest.raises(StoreUnavailable):
        await first
    assert sh.session is not None
    assert not sh.session.shepherd.running
    assert sh.executions == []
    outcome = await run_one(orch, SubmitRequest(name="t"))
    assert outcome.state is TaskState.SUCCEEDED
    assert len(sh.executions) == 1
    await orch.stop()


async def test_a_command_that_breaks_the_decider_fails_alone_with_its_batch(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    original = orch._decide_submit

    def breaks_on_boom(command: Any, batch: Any, now: float) -> None:
        if any(r.name == "boom" for r in command.requests):
            raise RuntimeError("a bug")
        original(command, batch, now)

    orch._decide_submit = breaks_on_boom  # type: ignore[method-assign]
    held = await _hold_next_append(orch, store, SubmitRequest(name="first"))
    # Queued in one go, so that one step decides all three.
    before = asyncio.ensure_future(orch.submit([SubmitRequest(name="a")]))
    boom = asyncio.ensure_future(orch.submit([SubmitRequest(name="boom")]))
    after = asyncio.ensure_future(orch.submit([SubmitRequest(name="c")]))
    await asyncio.sleep(0.05)
    store.gate.set()
    await held
    with pytest.raises(StoreUnavailable):
        await before  # decided in the undone batch: nothing recorded, safe to retry
    with pytest.raises(AzollaDomainError, match="internal error"):
        await boom
    [c] = await after
    submitted = [json.loads(e.payload)["name"] for e in await store.read_all(0, 100)
                 if e.type == "TaskSubmitted.v1"]
    assert submitted == ["first", "c"]
    assert (await orch.status("default", c.task_id)).state is TaskState.QUEUED
    await orch.stop()


async def test_a_batch_takes_no_more_commands_once_it_holds_enough_events(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store, config=OrchestratorConfig(max_events_per_batch=2))
    await orch.start()
    held = await _hold_next_append(orch, store, SubmitRequest(name="first"))
    later = [asyncio.ensure_future(orch.submit([SubmitRequest(name=f"t{i}")])) for i in range(3)]
    await asyncio.sleep(0.05)
    store.gate.set()
    await held
    await asyncio.gather(*later)
    assert [len(types) for types in store.appends] == [1, 2, 1]
    await orch.stop()


async def test_cancelling_the_loop_while_it_waits_for_a_commit_stops_it(
        log: InMemoryEventLog) -> None:
    store = GatedStore(log)
    orch = Orchestrator(store)
    await orch.start()
    held = await _hold_next_append(orch, store, SubmitRequest(name="first"))
    waiting = asyncio.ensure_future(orch.submit([SubmitRequest(name="second")]))
    await asyncio.sleep(0.05)  # "second" is decided and waits for the held commit
    loop_task = orch._loop_task
    assert loop_task is not None
    loop_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop_task, 2)
    store.gate.set()
    held.cancel()  # nothing answers them any more: the loop is gone
    waiting.cancel()
    orch._loop_task = None
    await orch.stop()
