"""``pool`` mode specifics: reuse, replacement of dead workers, queueing, recycling."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from azolla.adapters.subprocess import AttemptAlreadyRunning, PoolExecutor
from azolla.domain.ports import ExecutionRequest

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def make(**options: Any) -> PoolExecutor:
    options.setdefault("size", 2)
    return PoolExecutor(
        ["tasks_basic"], sys_path=[str(FIXTURES), *sys.path], kill_grace=0.5, **options
    )


def req(name: str, *args: Any, **fields: Any) -> ExecutionRequest:
    return ExecutionRequest(
        task_id=str(uuid.uuid4()),
        attempt=1,
        name=name,
        args=orjson.dumps(list(args)).decode(),
        kwargs="{}",
        **fields,
    )


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def read_marker(path: Path) -> str:
    """The marker file's text ("" while it does not exist)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    await wait_until(lambda: read_marker(path), timeout)
    return read_marker(path)


async def test_workers_are_reused() -> None:
    executor = make(size=1)
    try:
        await executor.start()
        pids = {int((await executor.execute(req("pid"))).value_json) for _ in range(5)}
        assert pids == set(executor.worker_pids)
        assert executor.workers_started == 1
    finally:
        await executor.close()


async def test_a_worker_killed_while_idle_is_replaced() -> None:
    executor = make()
    try:
        await executor.start()
        victim = executor.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: gone(victim) and len(executor.worker_pids) == 2)
        assert victim not in executor.worker_pids
        outcomes = await asyncio.gather(*(executor.execute(req("add", i, 1)) for i in range(6)))
        assert [o.value_json for o in outcomes] == [str(i + 1) for i in range(6)]
        assert executor.workers_started == 3
    finally:
        await executor.close()


async def test_a_worker_killed_during_an_attempt(tmp_path: Path) -> None:
    executor = make()
    try:
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
        victim = int(await wait_for_file(marker))
        os.kill(victim, signal.SIGKILL)
        outcome = await asyncio.wait_for(running, 20)
        assert (outcome.error_type, outcome.retriable) == ("WorkerCrashed", True)
        assert orjson.loads(outcome.error_data)["signal"] == "SIGKILL"
        assert (await executor.execute(req("add", 1, 1))).value_json == "2"
        await wait_until(lambda: len(executor.worker_pids) == 2)
        assert victim not in executor.worker_pids
    finally:
        await executor.close()


async def test_a_killed_fork_server_is_replaced_with_its_workers() -> None:
    executor = make()
    try:
        await executor.start()
        old_workers = executor.worker_pids
        fork_server = executor.fork_server_pid
        assert fork_server is not None
        os.kill(fork_server, signal.SIGKILL)
        await wait_until(lambda: all(gone(pid) for pid in old_workers))
        outcome = await asyncio.wait_for(executor.execute(req("add", 3, 4)), 30)
        assert outcome.value_json == "7"
        assert executor.fork_server_starts == 2
        await wait_until(lambda: len(executor.worker_pids) == 2)
        assert not set(executor.worker_pids) & set(old_workers)
    finally:
        await executor.close()


async def test_workers_are_recycled_after_max_attempts() -> None:
    executor = make(size=2, max_attempts_per_worker=3)
    try:
        pids = [int((await executor.execute(req("pid"))).value_json) for _ in range(12)]
        counts = Counter(pids)
        assert max(counts.values()) <= 3
        assert len(counts) >= 4
    finally:
        await executor.close()


async def test_a_memory_error_retires_the_worker() -> None:
    executor = make(size=1)
    try:
        before = int((await executor.execute(req("pid"))).value_json)
        outcome = await executor.execute(req("allocate", 1000, memory_limit=128 << 20))
        assert outcome.error_type == "MemoryLimitExceeded"
        after = int((await executor.execute(req("pid"))).value_json)
        assert after != before
    finally:
        await executor.close()


async def test_more_attempts_than_workers_wait_their_turn(tmp_path: Path) -> None:
    executor = make(size=2)
    try:
        # Two long attempts occupy both workers; a third waits and can be cancelled there.
        markers = [tmp_path / f"m{i}" for i in range(2)]
        blockers = [req("sleep_marked", str(m), 30) for m in markers]
        running = [asyncio.ensure_future(executor.execute(r)) for r in blockers]
        for marker in markers:
            await wait_for_file(marker)
        queued = req("add", 1, 1, timeout=0.2)
        waiting = asyncio.ensure_future(executor.execute(queued))
        await asyncio.sleep(0.5)  # longer than its timeout: waiting does not count
        assert not waiting.done()
        assert await executor.cancel(queued.task_id, 1)
        cancelled = await asyncio.wait_for(waiting, 5)
        assert (cancelled.error_type, cancelled.retriable) == ("Cancelled", False)
        for blocker in blockers:
            assert await executor.cancel(blocker.task_id, 1)
        assert [o.error_type for o in await asyncio.gather(*running)] == ["Cancelled"] * 2
        many = await asyncio.gather(*(executor.execute(req("sleep_for", 0.05)) for _ in range(10)))
        assert all(o.ok for o in many)
    finally:
        await executor.close()


async def test_close_is_bounded_and_ends_everything(tmp_path: Path) -> None:
    executor = make(size=1)
    marker = tmp_path / "running"
    running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
    worker = int(await wait_for_file(marker))
    queued = asyncio.ensure_future(executor.execute(req("add", 1, 1)))
    fork_server = executor.fork_server_pid
    assert fork_server is not None
    started = time.monotonic()
    await asyncio.wait_for(executor.close(), 20)
    assert time.monotonic() - started < 10
    assert (await running).error_type == "ExecutorClosed"
    assert (await queued).error_type == "ExecutorClosed"
    await wait_until(lambda: gone(worker) and gone(fork_server), 10)


async def test_a_caller_that_stops_waiting_frees_the_worker(tmp_path: Path) -> None:
    executor = make(size=1)
    try:
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
        victim = int(await wait_for_file(marker))
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await wait_until(lambda: gone(victim))
        assert (await asyncio.wait_for(executor.execute(req("add", 1, 1)), 20)).value_json == "2"
        assert executor.running == 0
    finally:
        await executor.close()


# -- prefetch: attempts queued in a busy worker's pipe --------------------------------------


async def test_a_queued_attempt_runs_on_the_busy_worker_right_after_it(tmp_path: Path) -> None:
    executor = make(size=1, prefetch=1, revoke_after=30)
    try:
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 0.5)))
        worker = int(await wait_for_file(marker))
        # Its timeout is shorter than the wait: a queued attempt's timeout starts with it.
        queued = await asyncio.wait_for(executor.execute(req("pid", timeout=0.3)), 10)
        assert queued.ok, queued
        assert int(queued.value_json) == worker
        assert (await running).value_json == '"slept"'
        assert executor.revoked == 0
        assert executor.workers_started == 1
    finally:
        await executor.close()


async def test_a_queued_attempt_that_is_cancelled_never_runs(tmp_path: Path) -> None:
    executor = make(size=1, prefetch=1, revoke_after=30)
    try:
        marker = tmp_path / "running"
        side_effect = tmp_path / "side-effect"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 0.5)))
        worker = int(await wait_for_file(marker))
        queued = req("write_marker", str(side_effect), "ran")
        waiting = asyncio.ensure_future(executor.execute(queued))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert await executor.cancel(queued.task_id, 1)
        cancelled = await asyncio.wait_for(waiting, 5)
        assert (cancelled.error_type, cancelled.retriable) == ("Cancelled", False)
        assert not running.done()  # the worker ahead of it was not disturbed
        assert (await running).value_json == '"slept"'
        # The worker skipped the revoked request and serves the next one.
        after = await asyncio.wait_for(executor.execute(req("pid")), 10)
        assert int(after.value_json) == worker
        assert not side_effect.exists()
        assert executor.revoked == 1
        assert executor.workers_started == 1
        assert not await executor.cancel(queued.task_id, 1)  # nothing to cancel any more
    finally:
        await executor.close()


@pytest.mark.parametrize("how", ["killed", "timed out"])
async def test_a_worker_stopped_with_a_queued_attempt_hands_it_on(
    tmp_path: Path, how: str
) -> None:
    executor = make(size=1, prefetch=1, revoke_after=30)
    try:
        marker = tmp_path / "running"
        side_effect = tmp_path / "side-effect"
        timeout = 1.0 if how == "timed out" else None
        running = asyncio.ensure_future(
            executor.execute(req("sleep_marked", str(marker), 30, timeout=timeout))
        )
        victim = int(await wait_for_file(marker))
        queued = asyncio.ensure_future(
            executor.execute(req("write_marker", str(side_effect), "ran"))
        )
        await asyncio.sleep(0.05)
        assert not queued.done()
        if how == "killed":
            os.kill(victim, signal.SIGKILL)
        first = await asyncio.wait_for(running, 20)
        expected = "WorkerCrashed" if how == "killed" else "TaskTimeout"
        assert first.error_type == expected
        second = await asyncio.wait_for(queued, 20)
        assert second.ok, second  # run once, on the replacement worker
        assert side_effect.read_text() == "ran"
        assert executor.workers_started == 2
        assert victim not in executor.worker_pids
        assert executor.running == 0
    finally:
        await executor.close()


async def test_a_queued_attempt_does_not_wait_behind_a_long_one(tmp_path: Path) -> None:
    executor = make(size=2, prefetch=1, revoke_after=0.1)
    try:
        long_marker, short_marker = tmp_path / "long", tmp_path / "short"
        long_one = asyncio.ensure_future(
            executor.execute(req("sleep_marked", str(long_marker), 30))
        )
        await wait_for_file(long_marker)
        short_one = asyncio.ensure_future(
            executor.execute(req("sleep_marked", str(short_marker), 1.0))
        )
        short_worker = int(await wait_for_file(short_marker))
        started = time.monotonic()
        queued = await asyncio.wait_for(executor.execute(req("pid")), 10)
        # It was queued behind one of the two, taken back, and run by the first free worker.
        assert int(queued.value_json) == short_worker
        assert time.monotonic() - started < 5
        assert executor.revoked >= 1
        assert (await short_one).ok
        assert not long_one.done()
    finally:
        await executor.close()


async def test_queued_attempts_respect_max_attempts_per_worker() -> None:
    executor = make(size=2, prefetch=2, max_attempts_per_worker=3)
    try:
        await executor.start()
        outcomes = await asyncio.gather(*(executor.execute(req("pid")) for _ in range(30)))
        assert all(o.ok for o in outcomes)
        counts = Counter(int(o.value_json) for o in outcomes)
        assert max(counts.values()) <= 3
        assert executor.running == 0
    finally:
        await executor.close()


async def test_a_crash_of_a_queued_attempt_is_its_own(tmp_path: Path) -> None:
    executor = make(size=1, prefetch=1, revoke_after=30)
    try:
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 0.3)))
        await wait_for_file(marker)
        crashing = asyncio.ensure_future(executor.execute(req("exit_now", 5)))
        after = asyncio.ensure_future(executor.execute(req("add", 2, 3)))
        assert (await asyncio.wait_for(running, 10)).value_json == '"slept"'
        crash = await asyncio.wait_for(crashing, 20)
        assert crash.error_type == "WorkerCrashed"
        assert orjson.loads(crash.error_data)["exit_code"] == 5
        assert (await asyncio.wait_for(after, 20)).value_json == "5"
    finally:
        await executor.close()


# -- submit: outcomes through a callback, no coroutine per attempt ------------------------


class _Outcomes:
    """Collects ``submit`` outcomes; fails the test if one attempt gets two."""

    def __init__(self) -> None:
        # Every outcome delivered, per task id (an assert in the callback would be swallowed
        # by the pool, which logs a failing callback): one each is checked at the end.
        self.got: dict[str, list[Any]] = {}
        self.changed = asyncio.Event()

    def callback(self, request: ExecutionRequest) -> Any:
        def done(outcome: Any) -> None:
            self.got.setdefault(request.task_id, []).append(outcome)
            self.changed.set()

        return done

    async def wait(self, request: ExecutionRequest, timeout: float = 20) -> Any:
        async with asyncio.timeout(timeout):
            while request.task_id not in self.got:
                self.changed.clear()
                await self.changed.wait()
        outcome = self.got[request.task_id][0]
        assert (outcome.task_id, outcome.attempt) == (request.task_id, request.attempt)
        return outcome

    def each_once(self) -> bool:
        return all(len(outcomes) == 1 for outcomes in self.got.values())


async def test_submitted_attempts_report_every_kind_of_outcome_once(tmp_path: Path) -> None:
    executor = make(size=1, prefetch=1, revoke_after=30)
    outcomes = _Outcomes()
    try:
        await executor.start()
        marker = tmp_path / "running"
        side_effect = tmp_path / "side-effect"
        blocker = req("sleep_marked", str(marker), 30, timeout=1.5)
        queued = req("write_marker", str(side_effect), "ran")
        crashing = req("exit_now", 4)
        fine = req("add", 2, 2)
        for request in (blocker, queued, crashing, fine):
            executor.submit(request, outcomes.callback(request))
        await wait_for_file(marker)
        assert await executor.cancel(queued.task_id, 1)
        assert (await outcomes.wait(queued)).error_type == "Cancelled"
        assert (await outcomes.wait(blocker)).error_type == "TaskTimeout"
        assert (await outcomes.wait(crashing)).error_type == "WorkerCrashed"
        assert (await outcomes.wait(fine)).value_json == "4"
        assert not side_effect.exists()
        running = req("sleep_for", 5)
        executor.submit(running, outcomes.callback(running))
        with pytest.raises(AttemptAlreadyRunning):
            executor.submit(running, outcomes.callback(running))
        await executor.close()
        assert (await outcomes.wait(running)).error_type == "ExecutorClosed"
        late = req("add", 1, 1)
        executor.submit(late, outcomes.callback(late))
        assert (await outcomes.wait(late)).error_type == "ExecutorClosed"
        assert executor.running == 0
        await asyncio.sleep(0.1)
        assert len(outcomes.got) == 6
        assert outcomes.each_once(), outcomes.got
    finally:
        await executor.close()


async def test_a_revocation_that_comes_too_late_is_handled(tmp_path: Path) -> None:
    # The worker finishes the first attempt and starts the queued one while the event loop is
    # blocked; the cancel then revokes a request that is already running. It is reported once
    # (Cancelled), and the worker's late answer to it is dropped or the worker replaced.
    executor = make(size=1, prefetch=1, revoke_after=0.2)
    try:
        await executor.start()
        marker = tmp_path / "started"
        first = asyncio.ensure_future(executor.execute(req("add", 1, 1)))
        late = req("sleep_marked", str(marker), 0.5)
        queued = asyncio.ensure_future(executor.execute(late))
        await asyncio.sleep(0)  # both requests are written into the one worker's pipe
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            # Deliberately blocking: the shepherd reads no result meanwhile.
            time.sleep(0.01)  # noqa: ASYNC251
        assert marker.exists()
        assert await executor.cancel(late.task_id, 1)
        assert (await asyncio.wait_for(queued, 10)).error_type == "Cancelled"
        assert (await asyncio.wait_for(first, 10)).value_json == "2"
        after = await asyncio.wait_for(executor.execute(req("add", 2, 2)), 10)
        assert after.value_json == "4"
        assert executor.running == 0
        # Revoked (the worker's answer dropped; the worker, still on it, replaced) or, when
        # the first result was read before the cancel, stopped as the running attempt.
        assert executor.workers_started == 2
    finally:
        await executor.close()


async def test_a_revoked_request_the_worker_runs_anyway_is_stopped() -> None:
    # The worker finishes the first attempt and starts the queued one while the event loop is
    # blocked (for less than revoke_after); the cancel then revokes a request that is already
    # running and nothing else is queued. The worker still on it after revoke_after must be
    # replaced, or the revoked task runs on without a timeout and the pool stalls behind it.
    executor = make(size=1, prefetch=1, revoke_after=1.0)
    try:
        await executor.start()
        first = asyncio.ensure_future(executor.execute(req("sleep_for", 0.3)))
        late = req("sleep_for", 30)
        queued = asyncio.ensure_future(executor.execute(late))
        await asyncio.sleep(0)  # both requests are written into the one worker's pipe
        time.sleep(0.8)  # noqa: ASYNC251  (deliberately blocking: no result is read meanwhile)
        assert await executor.cancel(late.task_id, 1)
        assert (await asyncio.wait_for(queued, 10)).error_type == "Cancelled"
        assert (await asyncio.wait_for(first, 10)).ok
        await asyncio.sleep(1.5)  # past revoke_after, with nothing queued meanwhile
        started = time.monotonic()
        after = await asyncio.wait_for(executor.execute(req("add", 2, 2)), 10)
        assert after.value_json == "4"
        assert time.monotonic() - started < 5  # not after the 30 s sleep
        assert executor.workers_started == 2
    finally:
        await executor.close()
