"""Property: after any history, a TaskSet rebuilt from the log equals the live one."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from azolla.adapters.memory.event_store import InMemoryEventLog, InMemoryEventStore
from azolla.adapters.memory.transport import InProcessTransport
from azolla.app import orchestrator as orchestrator_module
from azolla.app.model import ReportedOutcome, ShepherdHello, SubmitRequest
from azolla.app.orchestrator import Orchestrator, OrchestratorConfig, ShepherdSession
from azolla.domain.errors import AzollaDomainError
from azolla.domain.retry import RetryPolicy, WaitKind
from azolla.domain.values import ErrorInfo

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self) -> None:
        self.value = 1_800_000_000.0

    def now(self) -> float:
        return self.value


operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 3), st.integers(-1, 2), st.booleans(),
                  st.sampled_from([0.0, 5.0, 50.0])),
        st.tuples(st.just("result"), st.integers(0, 20), st.booleans(), st.booleans(),
                  st.integers(-1, 1)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("disconnect"), st.integers(0, 1)),
        st.tuples(st.just("connect"), st.integers(0, 1), st.integers(1, 3)),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 10.0, 100.0])),
    ),
    min_size=1,
    max_size=40,
)


async def _drain(transport: InProcessTransport, pushed: list[Any]) -> None:
    while not transport.inbox.empty():
        kind, body = transport.inbox.get_nowait()
        if kind == "tasks":
            pushed.extend(body)


async def _history(ops: list[tuple[Any, ...]]) -> None:
    log = InMemoryEventLog()
    clock = Clock()
    config = OrchestratorConfig(heartbeat_timeout=10_000, reconnect_grace=10_000)
    live = Orchestrator(InMemoryEventStore(log), clock=clock, config=config)
    await live.start()
    policy = RetryPolicy(max_attempts=3, wait=WaitKind.FIXED, initial_delay=3.0)
    sessions: dict[int, tuple[ShepherdSession, InProcessTransport]] = {}
    pushed: list[Any] = []
    submitted: list[Any] = []
    for op in ops:
        kind = op[0]
        with contextlib.suppress(AzollaDomainError):
            if kind == "submit":
                _, key, priority, delayed, timeout = op
                request = SubmitRequest(
                    name=f"t{priority % 2}", policy=policy,
                    idempotency_key=f"k{key}" if key else None, priority=priority,
                    not_before=clock.value + 20 if delayed else None,
                    timeout=timeout or None)
                submitted.extend(await live.submit([request]))
            elif kind == "result" and pushed:
                _, index, ok, retriable, skew = op
                request = pushed[index % len(pushed)]
                for session, _transport in sessions.values():
                    error = None if ok else ErrorInfo("Boom", "x", {}, retriable)
                    outcome = ReportedOutcome(request.task_id, max(request.attempt + skew, 0),
                                              ok, "1", error)
                    await live.report_results(session, [outcome])
                    break
            elif kind == "cancel" and submitted:
                await live.cancel("default", submitted[op[1] % len(submitted)].task_id)
            elif kind == "disconnect" and op[1] in sessions:
                session, _ = sessions.pop(op[1])
                await live.disconnect_shepherd(session, "test")
            elif kind == "connect" and op[1] not in sessions:
                transport = InProcessTransport(f"s{op[1]}")
                hello = ShepherdHello(f"s{op[1]}", capacity=op[2], accepts_batches=True)
                sessions[op[1]] = (await live.connect_shepherd(hello, transport), transport)
            elif kind == "advance":
                clock.value += op[1]
                live.tick()
        await live.idle()
        for _, transport in sessions.values():
            await _drain(transport, pushed)
    await live.idle()
    await live.stop()

    rebuilt = Orchestrator(InMemoryEventStore(log), clock=clock, config=config)
    # Small pages and slices, so the fold's paging (next page read during this one's fold)
    # is exercised by every history.
    with mock.patch.object(orchestrator_module, "_FOLD_PAGE", 7), \
            mock.patch.object(orchestrator_module, "_FOLD_SLICE", 3):
        await rebuilt.start()
    await rebuilt.stop()
    live.taskset.advance(clock.value)
    rebuilt.taskset.advance(clock.value)
    snapshot = live.taskset.snapshot()
    assert rebuilt.taskset.snapshot() == snapshot
    # ready_count is exact: it counts the tasks that really wait in the ready queues.
    counted: dict[Any, int] = {}
    for key, _name, ids in snapshot["ready"]:
        counted[key] = counted.get(key, 0) + len(ids)
    assert snapshot["ready_counts"] == counted
    terminal = [e.stream_id for e in await live.store.read_all(0, 100_000) if e.terminal]
    assert len(terminal) == len(set(terminal))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_rebuilt_taskset_equals_live(ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(_history(ops))
