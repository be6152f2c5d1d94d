"""``--worker-command``: the CommandExecutor with ``azolla-worker`` and other executables, the
``azolla-worker`` command line itself, and the TaskResult conversions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import pytest_asyncio

from azolla.adapters.grpc.pb import common_pb2, shepherd_pb2, shepherd_pb2_grpc
from azolla.adapters.subprocess import CommandExecutor
from azolla.adapters.subprocess.wire import (
    any_value_to_json,
    error_result,
    json_to_any_value,
    success_result,
    task_result_to_outcome,
)
from azolla.app import worker_main
from azolla.domain.ports import ExecutionRequest

pytestmark = [pytest.mark.timeout(90), pytest.mark.grpc]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WORKER = str(Path(sys.executable).with_name("azolla-worker"))
WORKER_ENV = {"PYTHONPATH": str(FIXTURES)}


def req(name: str, *args: Any, **fields: Any) -> ExecutionRequest:
    return ExecutionRequest(
        task_id=str(uuid.uuid4()),
        attempt=fields.pop("attempt", 1),
        name=name,
        args=orjson.dumps(list(args)).decode(),
        kwargs=orjson.dumps(fields.pop("kwargs", {})).decode(),
        **fields,
    )


def read_marker(path: Path) -> str:
    """The marker file's text ("" while it does not exist)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text := read_marker(path):
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout} s")


@pytest_asyncio.fixture(params=["stdin", "argv"])
async def executor(request: pytest.FixtureRequest) -> AsyncIterator[CommandExecutor]:
    ex = CommandExecutor(
        [WORKER, "--tasks", "tasks_basic"],
        task_via_stdin=request.param == "stdin",
        extra_env=WORKER_ENV,
        env={**os.environ, "DATABASE_URL": "postgresql://secret"},
        kill_grace=0.5,
    )
    try:
        yield ex
    finally:
        await asyncio.wait_for(ex.close(), 30)


async def test_results_and_errors_come_back_through_report_result(
    executor: CommandExecutor,
) -> None:
    ok = await executor.execute(req("add", 20, kwargs={"b": "22"}))
    assert (ok.ok, ok.value_json) == (True, "42")
    assert executor.endpoint.startswith("http://127.0.0.1:")
    greeting = await executor.execute(req("greet", kwargs={"name": "Alice", "age": 25}))
    assert orjson.loads(greeting.value_json) == {"greeting": "Hello Alice! You are 25 years old."}
    declined = await executor.execute(req("fail_final"))
    assert (declined.error_type, declined.retriable) == ("PaymentDeclined", False)
    assert orjson.loads(declined.error_data)["code"] == 42
    unknown = await executor.execute(req("no_such_task"))
    assert (unknown.error_type, unknown.retriable) == ("TaskNotFound", False)
    malformed = await executor.execute(
        ExecutionRequest(task_id="t-bad", attempt=1, name="add", args='{"a": 1}', kwargs="{}")
    )
    assert (malformed.error_type, malformed.retriable) == ("TaskValidationError", False)


async def test_the_attempt_number_reaches_the_task_in_stdin_mode(
    executor: CommandExecutor,
) -> None:
    request = req("context", attempt=4)
    outcome = await executor.execute(request)
    context = orjson.loads(outcome.value_json)
    assert context["task_id"] == request.task_id
    # The bare upstream contract carries no attempt number: 0 means "not told".
    assert context["attempt"] == (4 if executor.task_via_stdin else 0)


async def test_the_worker_environment_is_clean(executor: CommandExecutor) -> None:
    names = set(orjson.loads((await executor.execute(req("environment"))).value_json))
    assert "DATABASE_URL" not in names
    assert "PYTHONPATH" in names


async def test_a_worker_that_dies_without_reporting(executor: CommandExecutor) -> None:
    outcome = await executor.execute(req("exit_now", 3))
    assert (outcome.error_type, outcome.retriable) == ("WorkerCrashed", True)
    details = orjson.loads(outcome.error_data)
    assert details["exit_code"] == 3
    assert "about to exit" in details["stderr_tail"]
    segfault = await executor.execute(req("segfault"))
    crashed = orjson.loads(segfault.error_data)
    assert crashed["signal"] == "SIGSEGV"
    assert "Segmentation fault" in crashed["stderr_tail"]  # faulthandler's report, for diagnosis


async def test_timeout_and_cancel(executor: CommandExecutor, tmp_path: Path) -> None:
    started = time.monotonic()
    timed_out = await executor.execute(req("sleep_for", 60, timeout=1.0))
    assert (timed_out.error_type, timed_out.retriable) == ("TaskTimeout", True)
    assert time.monotonic() - started < 20

    marker = tmp_path / "running"
    request = req("sleep_marked", str(marker), 60)
    running = asyncio.ensure_future(executor.execute(request))
    await wait_for_file(marker)
    assert await executor.cancel(request.task_id, 1)
    cancelled = await asyncio.wait_for(running, 20)
    assert (cancelled.error_type, cancelled.retriable) == ("Cancelled", False)
    assert not await executor.cancel(request.task_id, 1)


async def test_memory_limit_through_prlimit(executor: CommandExecutor) -> None:
    outcome = await executor.execute(req("allocate", 2000, memory_limit=256 << 20))
    assert outcome.error_type == "MemoryLimitExceeded"


async def test_reports_for_other_tasks_or_without_the_token_are_refused(
    tmp_path: Path,
) -> None:
    executor = CommandExecutor(
        [WORKER, "--tasks", "tasks_basic"], task_via_stdin=True, extra_env=WORKER_ENV
    )
    try:
        marker = tmp_path / "running"
        request = req("sleep_marked", str(marker), 60)
        running = asyncio.ensure_future(executor.execute(request))
        await wait_for_file(marker)
        forged = shepherd_pb2.ReportResultRequest(
            task_id=request.task_id, result=success_result(request.task_id, 1, '"forged"')
        )
        other = shepherd_pb2.ReportResultRequest(
            task_id="someone-else", result=success_result("someone-else", 1, "1")
        )
        async with grpc.aio.insecure_channel(executor.endpoint.removeprefix("http://")) as channel:
            stub = shepherd_pb2_grpc.WorkerStub(channel)
            refused = await stub.ReportResult(forged)
            assert not refused.success
            assert "token" in refused.message
            assert not (await stub.ReportResult(other)).success
        assert await executor.cancel(request.task_id, 1)
        assert (await running).error_type == "Cancelled"
    finally:
        await executor.close()


async def test_any_executable_that_exits_without_reporting() -> None:
    executor = CommandExecutor([sys.executable, "-c", "import sys; sys.exit(7)"])
    try:
        outcome = await executor.execute(req("anything"))
        assert (outcome.error_type, outcome.retriable) == ("WorkerCrashed", True)
        assert orjson.loads(outcome.error_data)["exit_code"] == 7
    finally:
        await executor.close()


async def test_a_command_that_cannot_be_started() -> None:
    executor = CommandExecutor(["/nonexistent/azolla-worker-binary"])
    try:
        outcome = await executor.execute(req("anything"))
        assert (outcome.error_type, outcome.retriable) == ("WorkerStartFailed", True)
    finally:
        await executor.close()


async def test_close_stops_running_workers(tmp_path: Path) -> None:
    executor = CommandExecutor(
        [WORKER, "--tasks", "tasks_basic"], task_via_stdin=True, extra_env=WORKER_ENV
    )
    marker = tmp_path / "running"
    running = asyncio.ensure_future(executor.execute(req("sleep_marked", str(marker), 60)))
    await wait_for_file(marker)
    await asyncio.wait_for(executor.close(), 20)
    assert (await running).error_type == "ExecutorClosed"
    assert (await executor.execute(req("add", 1, 1))).error_type == "ExecutorClosed"


# -- the azolla-worker command line ----------------------------------------------------------


def run_worker(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [WORKER, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **WORKER_ENV, **(env or {})},
        check=False,
    )


def test_worker_prints_the_result_without_an_endpoint() -> None:
    done = run_worker(
        "--tasks", "tasks_basic", "--task-id", "t1", "--name", "add", "--args", "[1, 2]"
    )
    assert done.returncode == worker_main.EXIT_OK, done.stderr
    assert orjson.loads(done.stdout) == {"task_id": "t1", "attempt": 0, "ok": True, "value": 3}
    failed = run_worker(
        "--stdin",
        stdin='{"task_id": "t2", "attempt": 2, "name": "fail_retryable", "args": ["x"]}',
        env={"AZOLLA_TASKS": "tasks_basic"},
    )
    assert failed.returncode == worker_main.EXIT_TASK_FAILED
    printed = orjson.loads(failed.stdout)
    assert (printed["attempt"], printed["error"]["type"]) == (2, "ValueError")


def test_worker_usage_errors() -> None:
    assert run_worker("--tasks", "tasks_basic", "--args", "[]").returncode == (
        worker_main.EXIT_BAD_USAGE
    )
    no_modules = run_worker("--task-id", "t", "--name", "add", "--args", "[1]")
    assert no_modules.returncode == worker_main.EXIT_BAD_USAGE
    assert "AZOLLA_TASKS" in no_modules.stderr
    bad_stdin = run_worker("--tasks", "tasks_basic", "--stdin", stdin="not json")
    assert bad_stdin.returncode == worker_main.EXIT_BAD_USAGE


def test_worker_with_a_broken_task_module() -> None:
    done = run_worker("--tasks", "tasks_broken", "--task-id", "t", "--name", "x", "--args", "[]")
    assert done.returncode == worker_main.EXIT_IMPORT_FAILED
    assert "broken on purpose" in done.stderr


def test_worker_that_cannot_reach_the_shepherd() -> None:
    done = run_worker(
        "--tasks", "tasks_basic", "--task-id", "t", "--name", "add", "--args", "[1]",
        "--shepherd-endpoint", "http://127.0.0.1:9", "--report-timeout", "1",
    )  # fmt: skip
    assert done.returncode == worker_main.EXIT_DELIVERY_FAILED


# -- conversions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_json", "kind"),
    [
        ('"text"', "string_value"),
        ("true", "bool_value"),
        ("-5", "int_value"),
        ("1.5", "double_value"),
        ("null", "json_value"),
        ('{"a": [1, 2]}', "json_value"),
        ("[1]", "json_value"),
        (str(2**70), "json_value"),
    ],
)
def test_values_round_trip_through_any_value(value_json: str, kind: str) -> None:
    encoded = json_to_any_value(value_json)
    assert encoded.WhichOneof("value") == kind
    assert json.loads(any_value_to_json(encoded)) == json.loads(value_json)


def test_any_values_from_other_workers() -> None:
    assert any_value_to_json(common_pb2.AnyValue()) == "null"
    assert any_value_to_json(common_pb2.AnyValue(json_value="not json")) == '"not json"'
    assert any_value_to_json(common_pb2.AnyValue(uint_value=7)) == "7"


def test_task_results_become_outcomes() -> None:
    ok = task_result_to_outcome(success_result("t", 2, '{"k": 1}'), "t", 2)
    assert (ok.ok, orjson.loads(ok.value_json)) == (True, {"k": 1})
    failed = task_result_to_outcome(error_result("t", 2, "Boom", "m", {"x": 1}, False), "t", 2)
    assert (failed.error_type, failed.error_message, failed.retriable) == ("Boom", "m", False)
    assert orjson.loads(failed.error_data) == {"x": 1}
    odd = common_pb2.TaskResult(task_id="t", error=common_pb2.ErrorResult(data="[1]"))
    weird = task_result_to_outcome(odd, "t", 1)
    assert (weird.error_type, orjson.loads(weird.error_data)) == ("TaskError", {"data": "[1]"})
    empty = task_result_to_outcome(common_pb2.TaskResult(task_id="t"), "t", 1)
    assert (empty.ok, empty.value_json) == (True, "null")
