"""Unit tests of the client's error hierarchy, status mapping and result decoding.

The tests marked ``grpc`` use an in-process TEST DOUBLE of the orchestrator (see
``_client_fake.py``), not the real server, to make it answer with each gRPC status.
"""

from __future__ import annotations

import pickle
from typing import Any

import grpc
import pytest
from _client_fake import fake_orchestrator

from azolla import (
    AuthenticationError,
    AzollaConnectionError,
    AzollaError,
    Client,
    OverloadedError,
    ServerError,
    TaskFailedError,
    TaskFailure,
    TaskNotFoundError,
    TaskResult,
    ValidationError,
    WaitTimeoutError,
)
from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2
from azolla.client._results import decode_any_value, decode_result
from azolla.errors import error_from_status

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("code", "cls", "retriable"),
    [
        ("UNAVAILABLE", AzollaConnectionError, True),
        ("DEADLINE_EXCEEDED", AzollaConnectionError, False),
        ("CANCELLED", AzollaConnectionError, False),
        ("UNAUTHENTICATED", AuthenticationError, False),
        ("PERMISSION_DENIED", AuthenticationError, False),
        ("INVALID_ARGUMENT", ValidationError, False),
        ("OUT_OF_RANGE", ValidationError, False),
        ("NOT_FOUND", TaskNotFoundError, False),
        ("RESOURCE_EXHAUSTED", OverloadedError, True),
        ("ABORTED", ServerError, True),
        ("FAILED_PRECONDITION", ServerError, False),
        ("INTERNAL", ServerError, False),
        ("UNKNOWN", ServerError, False),
        ("UNIMPLEMENTED", ServerError, False),
        ("DATA_LOSS", ServerError, False),
    ],
)
def test_status_mapping(code: str, cls: type[AzollaError], retriable: bool) -> None:
    error = error_from_status(code, "the details", "submit task 'x'", task_id="t1")
    assert type(error) is cls
    assert error.code == code
    assert error.details == "the details"
    assert error.retriable is retriable
    assert str(error).startswith("submit task 'x' failed: ")
    assert str(error).endswith(f"({code}): the details")


def test_builtin_bases_let_callers_catch_broadly() -> None:
    assert issubclass(AzollaConnectionError, ConnectionError)
    assert issubclass(WaitTimeoutError, TimeoutError)
    assert issubclass(ValidationError, ValueError)
    assert issubclass(TaskNotFoundError, LookupError)
    for cls in (AzollaConnectionError, WaitTimeoutError, ValidationError, TaskNotFoundError):
        assert issubclass(cls, AzollaError)
    assert not ValidationError("client side").server_side
    assert error_from_status("INVALID_ARGUMENT", "", "x").server_side  # type: ignore[attr-defined]


def test_errors_pickle_with_their_attributes() -> None:
    error = error_from_status("NOT_FOUND", "gone", "get task", task_id="abc")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is TaskNotFoundError
    assert (again.code, again.details, again.task_id, str(again)) == (
        "NOT_FOUND",
        "gone",
        "abc",
        str(error),
    )


# -- result decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw", "value"),
    [
        ("string_value", "hi", "hi"),
        ("int_value", -3, -3),
        ("uint_value", 2**63, 2**63),
        ("double_value", 1.5, 1.5),
        ("bool_value", True, True),
        ("json_value", '{"a": [1, null]}', {"a": [1, None]}),
        ("json_value", "null", None),
        ("json_value", "not json", "not json"),
    ],
)
def test_any_value_decoding(field: str, raw: object, value: object) -> None:
    fields: dict[str, Any] = {field: raw}
    assert decode_any_value(common_pb2.AnyValue(**fields)) == value


def test_unset_any_value_is_none() -> None:
    assert decode_any_value(common_pb2.AnyValue()) is None


def test_failed_result_reads_well_and_unwrap_raises() -> None:
    response = orchestrator_pb2.WaitForTaskResponse(
        status_code=orchestrator_pb2.WAIT_FOR_TASK_STATUS_COMPLETED,
        error=common_pb2.ErrorResult(
            type="ValueError", message="bad input", data='{"field": "age"}', retriable=False
        ),
        state="failed",
    )
    result = decode_result("t1", response, response.state)
    assert not result.success
    assert result.value is None
    assert result.error == TaskFailure("ValueError", "bad input", {"field": "age"}, False)
    assert str(result.error) == "ValueError: bad input"
    assert str(result) == "task t1 failed: ValueError: bad input"
    with pytest.raises(TaskFailedError, match="task t1 failed: ValueError: bad input") as info:
        result.unwrap()
    assert info.value.error is result.error


def test_cancelled_and_empty_results() -> None:
    empty = orchestrator_pb2.TaskOutcome(task_id="t")
    cancelled = decode_result("t", empty, "cancelled")
    assert (cancelled.success, cancelled.cancelled, cancelled.error and cancelled.error.type) == (
        False,
        True,
        "Cancelled",
    )
    none = decode_result("t", empty, "succeeded")
    assert none == TaskResult("t", True, None, None, "succeeded")
    weird = decode_result("t", empty, "")
    assert not weird.success


def test_error_data_that_is_not_an_object() -> None:
    for raw, data in (("", {}), ("[1]", {"value": [1]}), ("oops", {"raw": "oops"})):
        message = orchestrator_pb2.TaskOutcome(error=common_pb2.ErrorResult(type="E", data=raw))
        result = decode_result("t", message, "failed")
        assert result.error is not None
        assert result.error.data == data


# -- no raw grpc.RpcError reaches the caller (against the test double) --------------------------


@pytest.mark.grpc
@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.INVALID_ARGUMENT, ValidationError),
        (grpc.StatusCode.FAILED_PRECONDITION, ServerError),
    ],
)
@pytest.mark.parametrize("submit_stream", [True, False], ids=["stream", "unary"])
async def test_submit_errors_are_translated(
    code: grpc.StatusCode, cls: type[AzollaError], submit_stream: bool
) -> None:
    async with fake_orchestrator(submit_stream=submit_stream) as fake, Client(fake.url) as client:
        key = fake.submit_key(1)
        fake.fail_next[key] = [code]
        with pytest.raises(cls) as info:
            await client.submit_task("send_email", ["a@b.c"]).submit()
        assert not isinstance(info.value, grpc.RpcError)
        assert "submit task 'send_email' failed" in str(info.value)
        assert info.value.code == code.name
        assert info.value.details == f"injected failure of {key}"


@pytest.mark.grpc
async def test_status_and_cancel_of_unknown_task() -> None:
    async with fake_orchestrator() as fake, Client(fake.url) as client:
        handle = client.handle("no-such-task")
        with pytest.raises(TaskNotFoundError) as info:
            await handle.status()
        assert info.value.task_id == "no-such-task"
        with pytest.raises(TaskNotFoundError):
            await handle.cancel()
        with pytest.raises(TaskNotFoundError):
            async for _ in handle.watch():
                pass
        with pytest.raises(TaskNotFoundError, match="does not exist in domain 'default'"):
            await handle.wait(timeout=5)


@pytest.mark.grpc
async def test_unreachable_server_is_a_connection_error() -> None:
    async with fake_orchestrator() as fake:
        url = fake.url
    # The server is gone now: nothing listens on that port.
    with pytest.raises(AzollaConnectionError, match="cannot connect to the orchestrator"):
        await Client.connect(url, timeout=0.3)
    client = Client(url, timeout=0.3)
    try:
        with pytest.raises(AzollaConnectionError, match="may or may not have been created"):
            await client.submit_task("t").submit()
    finally:
        await client.close()
