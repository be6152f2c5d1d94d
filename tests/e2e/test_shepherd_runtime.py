"""``azolla-shepherd`` end to end: real server, real shepherd processes, real PostgreSQL.

Every scenario runs the real ``azolla-server`` (on a fresh PostgreSQL database) and real
``azolla-shepherd`` processes whose attempts run in real child processes, and talks to them
with the real client. Faults are real too: ``kill -9`` of a shepherd or of the orchestrator,
SIGTERM and Ctrl-C (SIGINT to the whole process group).

The task module is written into a temporary folder. Tasks that must be observed while they
run write their pid into a marker file first; waits for such markers (and for a shepherd to
appear in the orchestrator's list) are short bounded polls, everything else is awaited.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest

from azolla import Client, TaskHandle, TaskResult
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc as opb_grpc
from azolla.retry import ExponentialBackoff, FixedBackoff, RetryPolicy
from support.procs import BIN, ServerProc, ShepherdProc

pytestmark = [pytest.mark.grpc, pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.timeout(150)]

TASKS_MODULE = "shepherd_e2e_tasks"
TASKS_SOURCE = '''
"""Tasks for the shepherd end-to-end tests."""

import asyncio
import os
import pathlib

from azolla.tasks import azolla_task, current_task


@azolla_task
async def greet_user(name: str, age: int) -> dict:
    return {"greeting": f"Hello {name}! You are {age} years old.",
            "timestamp": "2025-01-15T10:30:00Z"}


@azolla_task
async def flaky(succeed_on: int) -> dict:
    attempt = current_task().attempt
    if attempt < succeed_on:
        raise ConnectionError(f"transient failure on attempt {attempt}")
    return {"attempt": attempt}


@azolla_task
async def first_attempt_hangs(marker: str) -> dict:
    attempt = current_task().attempt
    if attempt == 1:
        pathlib.Path(marker).write_text(str(os.getpid()))
        await asyncio.sleep(300)
    return {"attempt": attempt}


@azolla_task
async def sleeper(seconds: float, marker: str = "") -> dict:
    if marker:
        pathlib.Path(marker).write_text(str(os.getpid()))
    await asyncio.sleep(seconds)
    ctx = current_task()
    return {"slept": seconds, "attempt": ctx.attempt}
'''

#: Upper bound for any single awaited step.
STEP = 30.0


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def tasks_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASKS_MODULE}.py").write_text(TASKS_SOURCE)
    return folder


@pytest.fixture
def server(fresh_database_url: str) -> Iterator[ServerProc]:
    proc = ServerProc(fresh_database_url)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


class Shepherds:
    """Starts shepherds for one test and stops (or kills) all of them at the end."""

    def __init__(self, tasks_dir: Path) -> None:
        self.tasks_dir = tasks_dir
        self.procs: list[ShepherdProc] = []

    async def start(self, server: ServerProc, *, mode: str = "process", concurrency: int = 2,
                    extra: tuple[str, ...] = ()) -> tuple[ShepherdProc, str]:
        """Start one; return it and its shepherd id once the orchestrator lists it."""
        known = set(await shepherd_ids(server))
        proc = ShepherdProc(server.url, [TASKS_MODULE], mode=mode, concurrency=concurrency,
                            pythonpath=str(self.tasks_dir), extra=extra)
        self.procs.append(proc)

        async def new_id() -> str | None:
            if proc.process.poll() is not None:
                raise AssertionError(f"shepherd exited with {proc.process.returncode}:\n"
                                     f"{proc.output()[-3000:]}")
            fresh = set(await shepherd_ids(server)) - known
            return fresh.pop() if fresh else None

        return proc, await eventually(new_id, what="the shepherd to connect")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.log.close()


@pytest.fixture
def shepherds(tasks_dir: Path) -> Iterator[Shepherds]:
    group = Shepherds(tasks_dir)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
async def client(server: ServerProc) -> AsyncIterator[Client]:
    async with Client.connect(server.url) as connected:
        yield connected


async def shepherd_ids(server: ServerProc) -> list[str]:
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            reply = await opb_grpc.AdminServiceStub(channel).ListShepherds(
                opb.ListShepherdsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return []
    return [s.shepherd_id for s in reply.shepherds]


async def eventually(probe: Callable[[], Awaitable[Any]], *, what: str,
                     timeout: float = STEP) -> Any:
    """Poll ``probe`` (every 20 ms, bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def marker_pid(path: Path) -> int:
    """Wait until a task wrote its pid into ``path`` (it is running); return the pid."""

    def read_now() -> int | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    async def read() -> int | None:
        return read_now()  # a few bytes from a local file: not worth a thread

    pid: int = await eventually(read, what=f"the task to start ({path.name})")
    return pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reused the pid
        return True
    return True


async def gone(pid: int) -> bool:
    return not alive(pid)


async def wait_result(handle: TaskHandle, timeout: float = 60.0) -> TaskResult:
    return await asyncio.wait_for(handle.wait(), timeout)


async def terminal_events(database_url: str, task_id: str) -> list[str]:
    """The types of the task's terminal events in the event log (there must be one)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT type FROM azolla_events WHERE stream_id = $1::uuid AND terminal "
            "ORDER BY position", task_id)
    finally:
        await conn.close()
    return [row["type"] for row in rows]


def fixed(attempts: int, delay: float = 0.1) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, backoff=FixedBackoff(delay))


# -- scenarios -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "pool"])
async def test_the_briefs_task_runs_on_a_shepherd(server: ServerProc, shepherds: Shepherds,
                                                  client: Client, mode: str) -> None:
    _, shepherd_id = await shepherds.start(server, mode=mode, concurrency=4)
    handle = await (
        client.submit_task("greet_user", {"name": "Alice", "age": 25})
        .retry_policy(RetryPolicy(max_attempts=3, backoff=ExponentialBackoff(initial=1.0)))
        .submit()
    )
    result = await wait_result(handle)
    assert result.success, result.error
    assert result.value == {"greeting": "Hello Alice! You are 25 years old.",
                            "timestamp": "2025-01-15T10:30:00Z"}
    status = await handle.status()
    assert [(a.number, a.state, a.shepherd_id) for a in status.attempts] == [
        (1, "succeeded", shepherd_id)]
    # A burst: more than the concurrency, all finish, each once.
    handles = [await client.submit_task("greet_user").args(f"user{i}", i).submit()
               for i in range(24)]
    results = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 60)
    assert [r.value["greeting"] for r in results] == [
        f"Hello user{i}! You are {i} years old." for i in range(24)]


async def test_worker_command_mode_runs_azolla_worker(server: ServerProc,
                                                      shepherds: Shepherds,
                                                      client: Client) -> None:
    shepherd, _ = await shepherds.start(
        server, extra=("--worker-command", str(BIN / "azolla-worker")))
    handle = await client.submit_task("greet_user", {"name": "Ada", "age": 36}).submit()
    result = await wait_result(handle)
    assert result.success, result.error
    assert result.value["greeting"] == "Hello Ada! You are 36 years old."
    retried = await client.submit_task("flaky", {"succeed_on": 2}).retry_policy(
        fixed(2)).submit()
    outcome = await wait_result(retried)
    # In full CI runs an azolla-worker once in a while dies of SIGSEGV before it reports (not
    # reproduced locally); say everything about it (its stderr holds faulthandler's report).
    assert outcome.success, (outcome.error, shepherd.output()[-4000:])
    assert outcome.value == {"attempt": 2}


async def test_a_retryable_error_then_success(server: ServerProc, shepherds: Shepherds,
                                              client: Client) -> None:
    await shepherds.start(server)
    handle = await client.submit_task("flaky", {"succeed_on": 2}).retry_policy(
        fixed(3)).submit()
    result = await wait_result(handle)
    assert result.success, result.error
    assert result.value == {"attempt": 2}
    status = await handle.status()
    assert [a.state for a in status.attempts] == ["failed", "succeeded"]
    first = status.attempts[0].error
    assert first is not None
    assert first.type == "ConnectionError"
    assert "attempt 1" in first.message


async def test_a_task_that_runs_past_its_timeout_fails(server: ServerProc,
                                                       shepherds: Shepherds,
                                                       client: Client) -> None:
    await shepherds.start(server)
    started = time.monotonic()
    handle = await (client.submit_task("sleeper", {"seconds": 60}).timeout(1.0)
                    .retry_policy(fixed(1)).submit())
    result = await wait_result(handle)
    assert not result.success
    assert result.error is not None
    assert result.error.type == "TaskTimeout"
    assert time.monotonic() - started < 20
    status = await handle.status()
    assert [a.state for a in status.attempts] == ["timed_out"]


async def test_cancelling_a_running_attempt_stops_its_process(
        server: ServerProc, shepherds: Shepherds, client: Client, tmp_path: Path) -> None:
    await shepherds.start(server)
    marker = tmp_path / "cancel.pid"
    handle = await client.submit_task("sleeper", {"seconds": 120, "marker": str(marker)}).submit()
    pid = await marker_pid(marker)
    assert await handle.cancel("not needed any more")
    result = await wait_result(handle)
    assert result.state == "cancelled"
    await eventually(lambda: gone(pid), what=f"the worker process {pid} to end")
    status = await handle.status()
    assert [a.state for a in status.attempts] == ["cancelled"]
    # The shepherd keeps serving.
    again = await client.submit_task("greet_user").args("Bob", 3).submit()
    assert (await wait_result(again)).success


async def test_a_killed_shepherds_attempt_is_retried_on_another(
        server: ServerProc, shepherds: Shepherds, client: Client, tmp_path: Path) -> None:
    first, first_id = await shepherds.start(server)
    marker = tmp_path / "victim.pid"
    handle = await (client.submit_task("first_attempt_hangs", {"marker": str(marker)})
                    .retry_policy(fixed(3)).submit())
    worker_pid = await marker_pid(marker)
    _, second_id = await shepherds.start(server)
    os.kill(first.pid, signal.SIGKILL)  # the shepherd only, as the OOM killer would
    first.process.wait(10)
    result = await wait_result(handle)
    assert result.success, result.error
    assert result.value == {"attempt": 2}
    status = await handle.status()
    attempts = [(a.number, a.state, a.shepherd_id) for a in status.attempts]
    assert attempts == [(1, "lost", first_id), (2, "succeeded", second_id)]
    lost = status.attempts[0].error
    assert lost is not None
    assert lost.type == "InfrastructureError"
    # The dead shepherd's worker does not outlive it for long.
    await eventually(lambda: gone(worker_pid), what="the orphaned worker to end")


@pytest.mark.parametrize("how", ["kill -9", "sigterm"])
async def test_outcomes_survive_an_orchestrator_restart_exactly_once(
        fresh_database_url: str, shepherds: Shepherds, tmp_path: Path, how: str) -> None:
    server = ServerProc(fresh_database_url)
    restarted: ServerProc | None = None
    try:
        server.wait_serving()
        shepherd, shepherd_id = await shepherds.start(server)
        short_marker, long_marker = tmp_path / "short.pid", tmp_path / "long.pid"
        async with Client.connect(server.url) as client:
            # One attempt only: had the orchestrator lost either attempt, its task would fail.
            short = await (client.submit_task("sleeper", {"seconds": 1.0,
                                                          "marker": str(short_marker)})
                           .retry_policy(fixed(1)).submit())
            long = await (client.submit_task("sleeper", {"seconds": 4.0,
                                                         "marker": str(long_marker)})
                          .retry_policy(fixed(1)).submit())
            await marker_pid(short_marker)
            await marker_pid(long_marker)
        if how == "kill -9":
            server.kill()  # no goodbye to the shepherd
        else:
            await asyncio.to_thread(server.stop)  # a clean shutdown closes the streams
        await asyncio.sleep(1.5)  # the short attempt ends while no orchestrator runs
        assert shepherd.process.poll() is None
        restarted = ServerProc(fresh_database_url, port=server.port)
        restarted.wait_serving()
        async with Client.connect(restarted.url) as client:
            results = await asyncio.wait_for(asyncio.gather(
                client.handle(short.task_id).wait(), client.handle(long.task_id).wait()), 60)
            assert [r.value for r in results] == [{"slept": 1.0, "attempt": 1},
                                                  {"slept": 4.0, "attempt": 1}]
            for handle in (short, long):
                status = await client.handle(handle.task_id).status()
                assert [(a.number, a.state, a.shepherd_id) for a in status.attempts] == [
                    (1, "succeeded", shepherd_id)]
        for handle in (short, long):
            assert await terminal_events(fresh_database_url, handle.task_id) == [
                "TaskSucceeded.v1"]
        log = shepherd.output()
        assert log.count("connected to") >= 2, log[-3000:]  # it reconnected
    finally:
        if restarted is not None:
            restarted.stop()
        server.stop()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
async def test_a_drain_finishes_the_running_task(server: ServerProc, shepherds: Shepherds,
                                                 client: Client, tmp_path: Path,
                                                 how: str) -> None:
    shepherd, shepherd_id = await shepherds.start(server, concurrency=1)
    marker = tmp_path / "drain.pid"
    handle = await (client.submit_task("sleeper", {"seconds": 2.0, "marker": str(marker)})
                    .retry_policy(fixed(1)).submit())
    await marker_pid(marker)
    if how == "sigterm":
        os.kill(shepherd.pid, signal.SIGTERM)
    else:  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
        os.killpg(shepherd.pid, signal.SIGINT)
    result = await wait_result(handle)
    assert result.success, result.error
    assert result.value == {"slept": 2.0, "attempt": 1}
    code = await asyncio.to_thread(shepherd.process.wait, STEP)
    assert code == 0, shepherd.output()[-3000:]
    status = await handle.status()
    assert [(a.state, a.shepherd_id) for a in status.attempts] == [("succeeded", shepherd_id)]
    assert shepherd_id not in await shepherd_ids(server)
