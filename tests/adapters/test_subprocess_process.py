"""``process`` mode specifics: a fresh process per attempt, fork server supervision, close."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from azolla.adapters.subprocess import ProcessExecutor, WorkerStartError
from azolla.domain.ports import ExecutionRequest

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def make(**options: Any) -> ProcessExecutor:
    modules = options.pop("modules", ["tasks_basic"])
    sys_path = [*options.pop("extra_path", []), str(FIXTURES), *sys.path]
    return ProcessExecutor(modules, sys_path=sys_path, kill_grace=0.5, **options)


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


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return gone(pid)


def read_marker(path: Path) -> str:
    """The marker file's text ("" while it does not exist)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text := read_marker(path):
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout} s")


async def test_every_attempt_gets_a_fresh_process() -> None:
    executor = make()
    try:
        pids = [int((await executor.execute(req("pid"))).value_json) for _ in range(3)]
        assert len(set(pids)) == 3
        assert executor.fork_server_pid not in pids
        assert executor.fork_server_starts == 1
    finally:
        await executor.close()


async def test_a_killed_fork_server_is_replaced() -> None:
    executor = make()
    try:
        await executor.start()
        first = executor.fork_server_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert await wait_gone(first)
        outcome = await asyncio.wait_for(executor.execute(req("add", 1, 2)), 30)
        if not outcome.ok:
            # A spawn that raced the death (the kill may land after wait_gone saw the pid go
            # on a loaded machine) fails as a retryable crash; the next one uses the new server.
            assert outcome.error_type == "WorkerCrashed", outcome
            assert outcome.retriable
            outcome = await asyncio.wait_for(executor.execute(req("add", 1, 2)), 30)
        assert outcome.value_json == "3"
        assert executor.fork_server_starts == 2
        assert executor.fork_server_pid not in (None, first)
    finally:
        await executor.close()


@pytest.mark.parametrize("pid_reported", [True, False], ids=["pid-known", "pid-never-reported"])
async def test_attempts_of_a_dead_fork_server_fail_as_crashed_and_their_workers_die(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid_reported: bool
) -> None:
    # The fork server forks the worker (which starts its request at once) and then reports its
    # pid. Dropping that report recreates the race where it dies in between: the shepherd never
    # learns the pid, so only PR_SET_PDEATHSIG stops the worker, and the attempt may have run.
    executor = make()
    try:
        await executor.start()
        if not pid_reported:
            client = executor._forkserver
            dispatch = client._dispatch
            monkeypatch.setattr(
                client, "_dispatch", lambda m: None if m.get("op") == "spawned" else dispatch(m)
            )
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
        worker = int(await wait_for_file(marker))
        fork_server = executor.fork_server_pid
        assert fork_server is not None
        os.kill(fork_server, signal.SIGKILL)
        outcome = await asyncio.wait_for(running, 20)
        assert (outcome.error_type, outcome.retriable) == ("WorkerCrashed", True)
        assert orjson.loads(outcome.error_data)["reason"] == "the fork server died"
        assert await wait_gone(worker), "the attempt's process outlived its fork server"
        monkeypatch.undo()
        assert (await executor.execute(req("add", 2, 2))).value_json == "4"
    finally:
        await executor.close()


async def test_close_stops_running_attempts_and_the_fork_server(tmp_path: Path) -> None:
    executor = make()
    marker = tmp_path / "running"
    running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
    worker = int(await wait_for_file(marker))
    fork_server = executor.fork_server_pid
    assert fork_server is not None
    started = time.monotonic()
    await asyncio.wait_for(executor.close(), 20)
    assert time.monotonic() - started < 10
    outcome = await asyncio.wait_for(running, 5)
    assert (outcome.error_type, outcome.retriable) == ("ExecutorClosed", True)
    assert await wait_gone(worker)
    assert await wait_gone(fork_server)
    after = await executor.execute(req("add", 1, 1))
    assert after.error_type == "ExecutorClosed"
    await executor.close()  # idempotent


async def test_a_task_module_that_cannot_be_imported() -> None:
    executor = make(modules=["tasks_broken"], startup_timeout=30)
    try:
        with pytest.raises(WorkerStartError, match="broken on purpose"):
            await executor.start()
        outcome = await executor.execute(req("add", 1, 2))
        assert (outcome.error_type, outcome.retriable) == ("WorkerStartFailed", True)
        assert "broken on purpose" in outcome.error_message
    finally:
        await executor.close()


async def test_requests_and_results_have_size_limits() -> None:
    executor = make(max_request_bytes=1000, max_result_bytes=1000)
    try:
        too_big = await executor.execute(req("add", "x" * 2000, 1))
        assert (too_big.error_type, too_big.retriable) == ("RequestTooLarge", False)
        result = await executor.execute(req("big_result", 5000))
        assert (result.error_type, result.retriable) == ("ResultTooLarge", False)
        assert (await executor.execute(req("big_result", 10))).ok
    finally:
        await executor.close()


async def cancel_and_check_killed(executor: ProcessExecutor, running: asyncio.Future[Any],
                                  victim: int) -> None:
    """Cancel the caller of a running attempt: its worker must die and the executor go on."""
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await wait_gone(victim)
    assert (await executor.execute(req("add", 1, 1))).value_json == "2"


async def test_a_caller_that_stops_waiting_kills_the_attempt(tmp_path: Path) -> None:
    executor = make()
    try:
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
        victim = int(await wait_for_file(marker))
        await cancel_and_check_killed(executor, running, victim)
    finally:
        await executor.close()


async def test_a_caller_that_stops_waiting_while_its_worker_is_forked_kills_it(
        tmp_path: Path) -> None:
    # The request is in the worker's pipe before the fork, so the task may run before the fork
    # server's "spawned" message is read: cancel the caller in that window (the event loop is
    # blocked while the task starts, so the message waits) and the worker must still die.
    executor = make()
    try:
        await executor.start()
        marker = tmp_path / "running"
        running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 30)))
        await asyncio.sleep(0)  # the spawn request is sent
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251  (deliberately blocking: "spawned" is not read)
        victim = int(marker.read_text())
        await cancel_and_check_killed(executor, running, victim)
    finally:
        await executor.close()


# -- how workers are forked --------------------------------------------------------------------

FORK_STATE_TASKS = """
import logging, os, random, sys, threading

from azolla.tasks import azolla_task

RAN_IN = []  # pids of the processes the task ran in (the fork server's warm-up must not run it)
HOOK_RAN = False
{extra}


@azolla_task
def fork_state(marker: str) -> dict:
    RAN_IN.append(os.getpid())
    with open(marker, "a") as fh:
        fh.write(f"{{os.getpid()}}\\n")
    logging.getLogger("fork_state").warning("logging works")
    results = []
    thread = threading.Thread(target=lambda: results.append(threading.get_ident()))
    thread.start()
    thread.join(10)
    return {{
        "pid": os.getpid(),
        "ran_in": RAN_IN,
        "hook_ran": HOOK_RAN,
        "threads": threading.active_count(),
        "main_is_current": threading.main_thread() is threading.current_thread(),
        "thread_ran": len(results) == 1 and results[0] != threading.get_ident(),
        "random": random.random(),
    }}
"""

HOOK_MODULE = """
def _mark():
    global HOOK_RAN
    HOOK_RAN = True

os.register_at_fork(after_in_child=_mark)
"""

THREAD_MODULE = """
_stop = threading.Event()
threading.Thread(target=_stop.wait, daemon=True).start()
"""

FREEZE_MODULE = """
import gc
gc.freeze()  # as some pre-forking servers advise; hides objects from gc.get_referrers
"""


@pytest.mark.parametrize(
    ("extra", "raw"),
    [("", True), (HOOK_MODULE, False), (THREAD_MODULE, False), (FREEZE_MODULE, True)],
    ids=["plain", "own-at-fork-hook", "thread-at-import", "gc-frozen-at-import"],
)
async def test_how_workers_are_forked(extra: str, raw: bool, tmp_path: Path) -> None:
    """libc fork() only when os.fork()'s Python hooks have nothing to do; the child is sound."""
    (tmp_path / "fork_state_tasks.py").write_text(FORK_STATE_TASKS.format(extra=extra))
    marker = tmp_path / "ran"
    executor = make(modules=["fork_state_tasks"], extra_path=[str(tmp_path)])
    try:
        await executor.start()
        client = executor._forkserver
        checked_python = sys.version_info[:2] == (3, 11)  # see _forkserver.Forker
        assert client.raw_fork is (raw and checked_python), client.raw_fork_off
        assert client.warmed_up  # the worker's own attempt path ran in the fork server
        if not checked_python:
            assert "not checked for this Python" in client.raw_fork_off
        elif extra == HOOK_MODULE:
            assert "at-fork hook" in client.raw_fork_off
        elif extra == THREAD_MODULE:
            assert "more than one thread" in client.raw_fork_off
        assert read_marker(marker) == ""  # the warm-up never runs the module's tasks
        outcomes = [await executor.execute(req("fork_state", str(marker))) for _ in range(3)]
    finally:
        await executor.close()
    states = [orjson.loads(outcome.value_json) for outcome in outcomes]
    assert [int(line) for line in read_marker(marker).split()] == [s["pid"] for s in states]
    assert len({s["pid"] for s in states}) == 3
    assert len({s["random"] for s in states}) == 3  # reseeded in every worker
    for state in states:
        assert state["ran_in"] == [state["pid"]]
        assert state["hook_ran"] is (extra == HOOK_MODULE)
        assert state["threads"] == 1
        assert state["main_is_current"] is True
        assert state["thread_ran"] is True


async def test_a_worker_that_fails_right_after_the_fork_does_not_harm_the_fork_server() -> None:
    """Many short workers, some crashing, then the fork server still forks sound workers."""
    executor = make()
    try:
        await executor.start()
        first = executor.fork_server_pid
        crashes = [executor.execute(req("segfault")) for _ in range(5)]
        adds = [executor.execute(req("add", i, 1)) for i in range(20)]
        outcomes = await asyncio.gather(*crashes, *adds)
        assert all(o.error_type == "WorkerCrashed" for o in outcomes[:5])
        assert [o.value_json for o in outcomes[5:]] == [str(i + 1) for i in range(20)]
        assert executor.fork_server_pid == first
        assert executor.fork_server_starts == 1
    finally:
        await executor.close()
