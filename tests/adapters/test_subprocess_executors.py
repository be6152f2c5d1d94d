"""Behaviour shared by the ``process`` and ``pool`` executors, with real worker processes.

One executor per mode serves the whole module (starting a fork server costs a few hundred
milliseconds), so every test also shows that the executor keeps serving after what the test did
to it; each test ends by running an ordinary task.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from azolla.adapters.subprocess import (
    AttemptAlreadyRunning,
    PoolExecutor,
    ProcessExecutor,
    ResourceLimits,
)
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MEMORY_LIMIT = 128 << 20
SECRETS = {
    "DATABASE_URL": "postgresql://user:pw@db/azolla",
    "AZOLLA_ADMIN_TOKEN": "t0ken",
    "MY_API_KEY": "k3y",
    "GITHUB_TOKEN": "gh",
    "PGPASSWORD": "pw",
    "SERVICE_PASSWORD": "pw",
    "AWS_SECRET_ACCESS_KEY": "aws",
}

Executor = ProcessExecutor | PoolExecutor


def make_executor(mode: str, **options: Any) -> Executor:
    """An executor over ``tests/fixtures/tasks_basic.py``."""
    common: dict[str, Any] = {
        "sys_path": [str(FIXTURES), *sys.path],
        "kill_grace": 0.5,
        "env": {**os.environ, **SECRETS},
        "limits": ResourceLimits(open_files=256),
    }
    common.update(options)
    if mode == "pool":
        return PoolExecutor(["tasks_basic"], size=2, **common)
    return ProcessExecutor(["tasks_basic"], **common)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["process", "pool"])
async def executor(request: pytest.FixtureRequest) -> AsyncIterator[Executor]:
    ex = make_executor(request.param)
    await ex.start()
    try:
        yield ex
    finally:
        await asyncio.wait_for(ex.close(), 30)


def req(
    name: str, *args: Any, kwargs: dict[str, Any] | None = None, **fields: Any
) -> ExecutionRequest:
    """A request with a fresh task id; ``args`` are JSON-encoded unless given as ``raw_args``."""
    raw_args = fields.pop("raw_args", None)
    raw_kwargs = fields.pop("raw_kwargs", None)
    return ExecutionRequest(
        task_id=str(uuid.uuid4()),
        attempt=fields.pop("attempt", 1),
        name=name,
        args=raw_args if raw_args is not None else orjson.dumps(list(args)).decode(),
        kwargs=raw_kwargs if raw_kwargs is not None else orjson.dumps(kwargs or {}).decode(),
        **fields,
    )


def data(outcome: ExecutionOutcome) -> dict[str, Any]:
    decoded = orjson.loads(outcome.error_data)
    assert isinstance(decoded, dict)
    return decoded


async def assert_still_serving(executor: Executor) -> None:
    outcome = await asyncio.wait_for(executor.execute(req("add", 2, 3)), 20)
    assert outcome.ok, outcome
    assert outcome.value_json == "5"


def process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        await asyncio.sleep(0.02)
    return process_gone(pid)


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


# -- results and task errors -----------------------------------------------------------------


async def test_a_task_that_returns(executor: Executor) -> None:
    request = req("add", 1, kwargs={"b": "41"})
    outcome = await executor.execute(request)
    assert outcome == ExecutionOutcome(task_id=request.task_id, attempt=1, ok=True, value_json="42")
    greeting = await executor.execute(req("greet", kwargs={"name": "Alice", "age": 25}))
    assert orjson.loads(greeting.value_json) == {"greeting": "Hello Alice! You are 25 years old."}
    none = await executor.execute(req("noop_async"))
    assert (none.ok, none.value_json) == (True, "null")


async def test_the_task_sees_its_attempt(executor: Executor) -> None:
    request = req("context", attempt=3, domain="billing")
    outcome = await executor.execute(request)
    assert orjson.loads(outcome.value_json) == {
        "task_id": request.task_id,
        "attempt": 3,
        "name": "context",
        "domain": "billing",
    }


async def test_a_retryable_error(executor: Executor) -> None:
    outcome = await executor.execute(req("fail_retryable", "it broke"))
    assert not outcome.ok
    assert (outcome.error_type, outcome.error_message, outcome.retriable) == (
        "ValueError",
        "it broke",
        True,
    )
    assert "raise ValueError(message)" in data(outcome)["traceback"]
    await assert_still_serving(executor)


async def test_a_non_retryable_error(executor: Executor) -> None:
    outcome = await executor.execute(req("fail_final", "card declined"))
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (False, "PaymentDeclined", False)
    assert outcome.error_message == "card declined"
    assert data(outcome)["code"] == 42
    await assert_still_serving(executor)


async def test_a_result_that_is_not_json(executor: Executor) -> None:
    outcome = await executor.execute(req("unserialisable"))
    assert (outcome.error_type, outcome.retriable) == ("ResultNotSerializable", False)
    await assert_still_serving(executor)


async def test_an_unknown_task_name(executor: Executor) -> None:
    outcome = await executor.execute(req("no_such_task"))
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (False, "TaskNotFound", False)
    assert "no_such_task" in outcome.error_message
    await assert_still_serving(executor)


@pytest.mark.parametrize(
    ("raw_args", "raw_kwargs"),
    [
        ('{"a": 1}', "{}"),  # not an array
        ("[1", "{}"),  # not JSON
        ('["one"]', "{}"),  # wrong type
        ("[1, 2, 3]", "{}"),  # too many
        ("[1]", '{"zzz": 1}'),  # unknown keyword
        ("[1]", "[]"),  # kwargs not an object
    ],
)
async def test_malformed_arguments(executor: Executor, raw_args: str, raw_kwargs: str) -> None:
    outcome = await executor.execute(req("add", raw_args=raw_args, raw_kwargs=raw_kwargs))
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (
        False,
        "TaskValidationError",
        False,
    )
    await assert_still_serving(executor)


# -- crashes ---------------------------------------------------------------------------------


async def test_os_exit(executor: Executor) -> None:
    outcome = await executor.execute(req("exit_now", 3))
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (False, "WorkerCrashed", True)
    details = data(outcome)
    assert details["exit_code"] == 3
    assert "about to exit" in details["stderr_tail"]
    assert "exited with code 3" in outcome.error_message
    await assert_still_serving(executor)


async def test_segfault(executor: Executor) -> None:
    outcome = await executor.execute(req("segfault"))
    assert (outcome.error_type, outcome.retriable) == ("WorkerCrashed", True)
    details = data(outcome)
    assert details["signal"] == "SIGSEGV"
    assert details["exit_code"] is None
    assert "Segmentation fault" in details["stderr_tail"]  # faulthandler's report
    await assert_still_serving(executor)


async def test_stderr_tail_is_captured_and_bounded(executor: Executor) -> None:
    outcome = await executor.execute(req("spew", 5000))
    assert outcome.error_type == "WorkerCrashed"
    details = data(outcome)
    tail = details["stderr_tail"]
    lines = tail.splitlines()
    assert len(lines) <= 50
    assert len(tail.encode()) <= 8192
    assert lines[-1].startswith("line 4999 ")
    assert details["stderr_truncated"] is True
    failed = await executor.execute(req("spew", 10, False))
    assert failed.error_type == "RuntimeError"
    assert "line 9 " in data(failed)["stderr_tail"]
    await assert_still_serving(executor)


# -- limits ----------------------------------------------------------------------------------


async def test_timeout(executor: Executor) -> None:
    started = time.monotonic()
    outcome = await executor.execute(req("sleep_for", 30, timeout=0.5))
    assert (outcome.error_type, outcome.retriable) == ("TaskTimeout", True)
    assert data(outcome)["timeout_seconds"] == 0.5
    assert time.monotonic() - started < 10
    await assert_still_serving(executor)


async def test_timeout_of_a_task_that_ignores_sigterm(executor: Executor) -> None:
    started = time.monotonic()
    outcome = await executor.execute(req("ignore_sigterm_and_sleep", 30, timeout=0.3))
    assert outcome.error_type == "TaskTimeout"
    assert time.monotonic() - started < 10  # SIGKILL after the 0.5 s grace
    await assert_still_serving(executor)


async def test_memory_limit(executor: Executor) -> None:
    outcome = await executor.execute(req("allocate", 1000, memory_limit=MEMORY_LIMIT))
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (
        False,
        "MemoryLimitExceeded",
        True,
    )
    assert data(outcome)["memory_limit"] == MEMORY_LIMIT
    await assert_still_serving(executor)


async def test_death_after_hitting_the_memory_limit(executor: Executor) -> None:
    outcome = await executor.execute(req("allocate_then_abort", 1000, memory_limit=MEMORY_LIMIT))
    assert outcome.error_type == "MemoryLimitExceeded"
    details = data(outcome)
    assert details["signal"] == "SIGABRT"
    assert "out of memory" in details["stderr_tail"]
    await assert_still_serving(executor)


async def test_memory_limit_applies_to_one_attempt_only(executor: Executor) -> None:
    small = await executor.execute(req("allocate", 8, memory_limit=MEMORY_LIMIT))
    assert small.ok
    big = await executor.execute(req("allocate", 160))
    assert (big.ok, big.value_json) == (True, "160")


# -- processes left behind -------------------------------------------------------------------


@pytest.mark.parametrize("new_session", [False, True])
async def test_a_grandchild_that_outlives_the_task_is_killed(
    executor: Executor, tmp_path: Path, new_session: bool
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    outcome = await executor.execute(req("spawn_grandchild", str(pid_file), new_session))
    assert outcome.ok, outcome
    grandchild = int(pid_file.read_text())
    assert await wait_gone(grandchild), f"grandchild {grandchild} survived its task"
    await assert_still_serving(executor)


async def test_a_grandchild_of_a_crashed_task_is_killed(executor: Executor, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    outcome = await executor.execute(req("spawn_grandchild_and_exit", str(pid_file)))
    assert outcome.error_type == "WorkerCrashed"
    assert data(outcome)["exit_code"] == 5
    assert await wait_gone(int(pid_file.read_text()))
    await assert_still_serving(executor)


# -- cancel, environment, bookkeeping --------------------------------------------------------


async def test_cancel_a_running_attempt(executor: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    request = req("sleep_marked", str(marker), 30)
    running = asyncio.ensure_future(executor.execute(request))
    worker_pid = int(await wait_for_file(marker))
    started = time.monotonic()
    assert await executor.cancel(request.task_id, request.attempt) is True
    outcome = await asyncio.wait_for(running, 20)
    assert (outcome.ok, outcome.error_type, outcome.retriable) == (False, "Cancelled", False)
    assert time.monotonic() - started < 10
    assert await wait_gone(worker_pid)
    assert await executor.cancel(request.task_id, request.attempt) is False
    await assert_still_serving(executor)


async def test_cancel_of_an_unknown_attempt(executor: Executor) -> None:
    assert await executor.cancel(str(uuid.uuid4()), 1) is False


async def test_the_environment_is_clean(executor: Executor) -> None:
    outcome = await executor.execute(req("environment"))
    names = set(orjson.loads(outcome.value_json))
    assert not names & set(SECRETS), names & set(SECRETS)
    assert "PATH" in names


async def test_the_same_attempt_cannot_run_twice(executor: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    request = req("sleep_marked", str(marker), 30)
    running = asyncio.ensure_future(executor.execute(request))
    await wait_for_file(marker)
    with pytest.raises(AttemptAlreadyRunning):
        await executor.execute(request)
    await executor.cancel(request.task_id, request.attempt)
    assert (await asyncio.wait_for(running, 20)).error_type == "Cancelled"


async def test_many_attempts_at_once(executor: Executor) -> None:
    requests = [req("add", i, i) for i in range(40)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(executor.execute(r) for r in requests)), 60)
    assert [o.value_json for o in outcomes] == [str(2 * i) for i in range(40)]
    assert [o.task_id for o in outcomes] == [r.task_id for r in requests]
    assert executor.running == 0


@pytest.mark.parametrize("mode", ["process", "pool"])
async def test_cpu_time_and_open_file_limits(mode: str) -> None:
    limited = make_executor(mode, limits=ResourceLimits(cpu_seconds=1, open_files=64))
    try:
        started = time.monotonic()
        spun = await limited.execute(req("spin", 60, timeout=45))
        assert (spun.error_type, spun.retriable) == ("CpuLimitExceeded", True), spun
        assert data(spun)["signal"] == "SIGXCPU"
        assert time.monotonic() - started < 40
        files = await limited.execute(req("open_files", 200))
        assert files.error_type == "OSError"
        assert "Too many open files" in files.error_message
        assert (await limited.execute(req("open_files", 10))).value_json == "10"
        await assert_still_serving(limited)
    finally:
        await limited.close()


async def test_a_request_larger_than_a_pipe_buffer(executor: Executor, tmp_path: Path) -> None:
    """Arguments bigger than the request pipe holds (64 KiB) reach the worker whole."""
    text = "0123456789" * 30_000
    outcome = await executor.execute(req("write_marker", str(tmp_path / "out"), text, timeout=10))
    assert outcome.ok, outcome
    assert orjson.loads(outcome.value_json) == text
    assert (tmp_path / "out").read_text() == text
    await assert_still_serving(executor)


# -- the state a task starts in ----------------------------------------------------------------

STATE_TASKS = """
import faulthandler, os, random, resource, signal, sys

from azolla.tasks import azolla_task


@azolla_task
def worker_state() -> dict:
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return {
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "pgid": os.getpgrp(),
        "fds": fds,
        "inheritable": [os.get_inheritable(fd) for fd in (0, 1, 2, 3, 4)],
        "default_handlers": [
            name
            for name in ("SIGTERM", "SIGCHLD", "SIGHUP", "SIGINT")
            if signal.getsignal(getattr(signal, name)) == signal.SIG_DFL
        ],
        "sigint_raises": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "wakeup_fd": signal.set_wakeup_fd(-1),
        "core": resource.getrlimit(resource.RLIMIT_CORE),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
        "faulthandler": faulthandler.is_enabled(),
        "line_buffering": sys.stdout.line_buffering,
        "random": random.random(),
    }


@azolla_task
def print_then_fail(lines: int) -> None:
    for i in range(lines):
        print(f"line {i} " + "x" * 100)
    print("last words", file=sys.stderr)
    raise ValueError("failed after printing")
"""


@pytest.mark.parametrize("mode", ["process", "pool"])
async def test_the_state_a_task_starts_in(mode: str, tmp_path: Path) -> None:
    """Session, descriptors, signals, limits and stdio set up before task code runs."""
    (tmp_path / "state_tasks.py").write_text(STATE_TASKS)
    executor = make_executor(
        mode,
        sys_path=[str(tmp_path), *sys.path],
        limits=ResourceLimits(open_files=100, file_size_bytes=1 << 20),
    )
    executor._forkserver.modules = ["state_tasks"]
    try:
        states = [orjson.loads((await executor.execute(req("worker_state"))).value_json)]
        states.append(orjson.loads((await executor.execute(req("worker_state"))).value_json))
    finally:
        await executor.close()
    for state in states:
        assert state["sid"] == state["pgid"] == state["pid"]  # its own session and group
        # 0-2 stdio, 3-4 frames (close-on-exec), one more for listing /proc/self/fd.
        assert state["fds"] == [0, 1, 2, 3, 4, 5], state["fds"]
        assert state["inheritable"] == [True, True, True, False, False]
        assert state["default_handlers"] == ["SIGTERM", "SIGCHLD", "SIGHUP"]
        assert state["sigint_raises"] is True
        assert state["wakeup_fd"] == -1
        assert state["core"] == [0, 0]
        assert state["nofile"] == [100, 100]
        assert state["fsize"] == [1 << 20, 1 << 20]
        assert state["faulthandler"] is True
        assert state["line_buffering"] is True
    if mode == "process":
        assert states[0]["pid"] != states[1]["pid"]
        assert states[0]["random"] != states[1]["random"]  # reseeded in every process


@pytest.mark.parametrize("mode", ["process", "pool"])
async def test_a_failure_reports_the_output_written_before_it(mode: str, tmp_path: Path) -> None:
    """The tail of a task that raises holds everything it printed, the last line included."""
    (tmp_path / "state_tasks.py").write_text(STATE_TASKS)
    executor = make_executor(mode, sys_path=[str(tmp_path), *sys.path])
    executor._forkserver.modules = ["state_tasks"]
    try:
        for lines in (0, 5, 300):
            outcome = await executor.execute(req("print_then_fail", lines))
            assert (outcome.ok, outcome.error_type) == (False, "ValueError"), outcome
            tail = data(outcome)["stderr_tail"]
            assert tail.endswith("last words"), tail[-200:]
            if lines:
                assert f"line {lines - 1} " in tail
    finally:
        await executor.close()
