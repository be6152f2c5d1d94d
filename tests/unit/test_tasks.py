"""Unit tests of ``azolla.tasks``: the decorator, argument binding, the registry, invocation."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import uuid
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest

from azolla.tasks import (
    DuplicateTaskName,
    NoTaskContext,
    ResultNotSerializable,
    TaskContext,
    TaskDefinition,
    TaskError,
    TaskModuleImportError,
    TaskRegistry,
    TaskValidationError,
    UnknownTask,
    azolla_task,
    current_task,
    default_registry,
    describe_error,
    encode_result,
    execute,
    execute_sync,
    invoke,
    load_modules,
    task_context,
)

pytestmark = pytest.mark.timeout(30)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CTX = TaskContext(task_id="task-1", attempt=2, name="t", domain="d")


class Point(pydantic.BaseModel):
    x: int
    y: int = 0


@dataclasses.dataclass
class Pair:
    left: str
    right: str


# -- the decorator ---------------------------------------------------------------------------


def test_bare_decorator_keeps_function_callable_and_names_it() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert isinstance(add, TaskDefinition)
    assert add.name == "add"
    assert add(2, b=3) == 5
    assert add.func(2) == 3
    assert add.__name__ == "add"
    assert not add.is_async
    assert registry.get("add") is add


def test_bare_decorator_registers_in_the_default_registry() -> None:
    @azolla_task
    def unit_test_default_registry_task() -> str:
        return "ok"

    assert default_registry.get("unit_test_default_registry_task") is (
        unit_test_default_registry_task
    )
    assert unit_test_default_registry_task() == "ok"


async def test_async_task_is_awaited_when_called_directly() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    async def greet_user(name: str, age: int) -> dict[str, Any]:
        return {"greeting": f"Hello {name}! You are {age} years old."}

    assert greet_user.is_async
    assert await greet_user("Alice", 25) == {"greeting": "Hello Alice! You are 25 years old."}


def test_decorator_with_options() -> None:
    registry = TaskRegistry()
    policy = object()

    @azolla_task(name="reports.build", retry_policy=policy, registry=registry)
    def build(report_id: int) -> int:
        return report_id

    assert build.name == "reports.build"
    assert build.retry_policy is policy
    assert "reports.build" in registry
    assert "build" not in registry


def test_invalid_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        azolla_task(name=" ", registry=TaskRegistry())(lambda: None)


def test_direct_call_has_no_task_context() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def who() -> TaskContext:
        return current_task()

    with pytest.raises(NoTaskContext):
        who()
    with task_context(CTX):
        assert who() == CTX


# -- argument binding ------------------------------------------------------------------------


@pytest.fixture
def registry() -> TaskRegistry:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def add(a: int, b: int = 0) -> int:
        return a + b

    @azolla_task(registry=registry)
    def greet(name: str, *, polite: bool = False) -> str:
        return ("Dear " if polite else "") + name

    @azolla_task(registry=registry)
    def flexible(first: int, /, *rest: int, scale: float = 1.0, **labels: str) -> dict[str, Any]:
        return {"total": (first + sum(rest)) * scale, "labels": labels}

    @azolla_task(registry=registry)
    def models(point: Point, pair: Pair, when: datetime.date, ids: list[uuid.UUID]) -> Any:
        return {"point": point, "pair": pair, "when": when, "ids": ids}

    return registry


def test_json_array_maps_to_positional_arguments(registry: TaskRegistry) -> None:
    assert registry.get("add").bind_json("[1, 2]", "{}") == ((), {"a": 1, "b": 2})


def test_json_object_maps_to_keyword_arguments(registry: TaskRegistry) -> None:
    assert registry.get("add").bind_json("[]", '{"b": 5, "a": 1}') == ((), {"a": 1, "b": 5})
    assert registry.get("greet").bind_json('["Al"]', '{"polite": true}') == (
        (),
        {"name": "Al", "polite": True},
    )


def test_arguments_are_converted_from_type_hints(registry: TaskRegistry) -> None:
    args, kwargs = registry.get("models").bind_json(
        '[{"x": "3"}, {"left": "l", "right": "r"}, "2024-02-29"]',
        '{"ids": ["12345678-1234-5678-1234-567812345678"]}',
    )
    assert args == ()
    assert kwargs["point"] == Point(x=3)
    assert kwargs["pair"] == Pair("l", "r")
    assert kwargs["when"] == datetime.date(2024, 2, 29)
    assert kwargs["ids"] == [uuid.UUID("12345678-1234-5678-1234-567812345678")]


def test_var_positional_var_keyword_and_positional_only(registry: TaskRegistry) -> None:
    definition = registry.get("flexible")
    args, kwargs = definition.bind_json('[1, "2", 3]', '{"scale": "2", "colour": "red"}')
    assert definition.func(*args, **kwargs) == {"total": 12.0, "labels": {"colour": "red"}}


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "fragment"),
    [
        ("add", '["x"]', "{}", "a: Input should be a valid integer"),
        ("add", "[1, 2, 3]", "{}", "too many positional arguments"),
        ("add", "[]", "{}", "missing required argument(s) 'a'"),
        ("add", "[1]", '{"c": 1}', "unexpected argument 'c'"),
        ("add", "[1]", '{"a": 1}', "multiple values for 'a'"),
        ("add", '{"a": 1}', "{}", "args must be a JSON array"),
        ("add", "[1]", "[2]", "kwargs must be a JSON object"),
        ("add", "[1", "{}", "args is not valid JSON"),
        ("flexible", "[]", "{}", "arguments do not match the task signature"),
        ("flexible", '[1, "x"]', "{}", "rest.0"),
        ("models", "[{}, {}, 1, []]", "{}", "point.x"),
    ],
)
def test_bad_arguments_raise_a_non_retryable_validation_error(
    registry: TaskRegistry, name: str, args: str, kwargs: str, fragment: str
) -> None:
    with pytest.raises(TaskValidationError) as caught:
        registry.get(name).bind_json(args, kwargs)
    assert fragment in caught.value.message
    assert caught.value.retriable is False
    assert caught.value.error_type == "TaskValidationError"


def test_validation_error_details_hold_no_argument_values(registry: TaskRegistry) -> None:
    with pytest.raises(TaskValidationError) as caught:
        registry.get("add").bind_json('["secret-value"]', "{}")
    errors = caught.value.data["errors"]
    assert errors == [
        {
            "loc": ["a"],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "type": "int_parsing",
        }
    ]
    assert "secret-value" not in orjson.dumps(caught.value.data).decode()


def test_empty_json_text_means_no_arguments(registry: TaskRegistry) -> None:
    assert registry.get("greet").bind_json("", '{"name": "x"}') == ((), {"name": "x"})
    assert registry.get("greet").bind_json('["x"]', " ") == ((), {"name": "x"})


def test_upstream_clients_send_named_arguments_as_a_one_element_array(
    registry: TaskRegistry,
) -> None:
    assert registry.get("greet").bind_json('[{"name": "Al", "polite": true}]', "{}") == (
        (),
        {"name": "Al", "polite": True},
    )


def test_a_single_dict_argument_is_still_positional_when_it_fits() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def takes_dict(payload: dict[str, int]) -> int:
        return sum(payload.values())

    assert takes_dict.bind_json('[{"payload": 1}]', "{}") == ((), {"payload": {"payload": 1}})


def test_unannotated_parameters_accept_anything() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def loose(a, b=None):  # type: ignore[no-untyped-def]
        return [a, b]

    assert loose.bind_json('[{"k": [1]}, "x"]', "{}") == ((), {"a": {"k": [1]}, "b": "x"})


def test_forward_references_are_resolved_at_first_use() -> None:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    def later(item: LaterModel) -> int:  # LaterModel is defined below on purpose
        return item.n

    class LaterModel(pydantic.BaseModel):
        n: int

    globals()["LaterModel"] = LaterModel
    try:
        assert later.bind_json('[{"n": "4"}]', "{}") == ((), {"item": LaterModel(n=4)})
    finally:
        del globals()["LaterModel"]


# -- registry --------------------------------------------------------------------------------


def test_unknown_task_name_is_a_typed_non_retryable_error() -> None:
    with pytest.raises(UnknownTask) as caught:
        TaskRegistry().get("missing")
    error = caught.value
    assert isinstance(error, LookupError)
    assert error.error_type == "TaskNotFound"
    assert error.retriable is False
    assert error.name == "missing"


def test_two_functions_cannot_share_a_name() -> None:
    registry = TaskRegistry()

    @azolla_task(name="same", registry=registry)
    def one() -> None:
        return None

    def two() -> None:
        return None

    with pytest.raises(DuplicateTaskName):
        azolla_task(name="same", registry=registry)(two)


def test_registering_the_same_function_again_replaces_it() -> None:
    registry = TaskRegistry()

    def job() -> int:
        return 1

    first = azolla_task(registry=registry)(job)
    second = azolla_task(registry=registry)(job)
    assert registry.get("job") is second is not first
    assert len(registry) == 1
    assert registry.names() == ["job"]
    assert list(registry) == [second]


def test_load_modules_collects_the_tasks_of_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    registry = load_modules(["tasks_basic"])
    assert {"add", "noop", "greet", "segfault"} <= set(registry.names())
    assert registry.get("add").module == "tasks_basic"
    again = load_modules(["tasks_basic"], registry=TaskRegistry())
    assert again.names() == registry.names()


def test_load_modules_reports_import_failures() -> None:
    with pytest.raises(TaskModuleImportError, match="no_such_module_for_azolla"):
        load_modules(["no_such_module_for_azolla"])


# -- invocation ------------------------------------------------------------------------------


@pytest.fixture
def runtime() -> TaskRegistry:
    registry = TaskRegistry()

    @azolla_task(registry=registry)
    async def context_of_attempt() -> dict[str, Any]:
        await asyncio.sleep(0)
        ctx = current_task()
        return dataclasses.asdict(ctx)

    @azolla_task(registry=registry)
    def sync_context() -> list[Any]:
        ctx = current_task()
        return [ctx.task_id, ctx.attempt]

    @azolla_task(registry=registry)
    def fails(message: str) -> None:
        raise KeyError(message)

    @azolla_task(registry=registry)
    def declines() -> None:
        raise TaskError("declined", retriable=False, data={"code": 7}, error_type="Declined")

    @azolla_task(registry=registry)
    def custom_error() -> None:
        class QuotaExceeded(TaskError):
            pass

        raise QuotaExceeded("over quota")

    @azolla_task(registry=registry)
    def returns_object() -> object:
        return object()

    @azolla_task(registry=registry)
    def returns_model() -> Point:
        return Point(x=1, y=2)

    @azolla_task(registry=registry)
    def returns_rich() -> dict[str, Any]:
        return {"when": datetime.date(2025, 1, 15), "id": uuid.UUID(int=1), "pair": Pair("a", "b")}

    @azolla_task(registry=registry)
    def out_of_memory() -> None:
        raise MemoryError

    return registry


async def test_invoke_runs_with_the_context_and_returns_the_value(runtime: TaskRegistry) -> None:
    value = await invoke(runtime.get("context_of_attempt"), "[]", "{}", CTX)
    assert value == {"task_id": "task-1", "attempt": 2, "name": "t", "domain": "d"}
    with pytest.raises(NoTaskContext):
        current_task()


async def test_execute_captures_success_and_failure(runtime: TaskRegistry) -> None:
    ok = await execute(runtime, "sync_context", "[]", "{}", CTX)
    assert ok.ok
    assert orjson.loads(ok.value_json) == ["task-1", 2]

    failed = await execute(runtime, "fails", '["boom"]', "{}", CTX)
    assert not failed.ok
    assert failed.error is not None
    assert failed.error.type == "KeyError"
    assert failed.error.message == "'boom'"
    assert failed.error.retriable is True
    assert "raise KeyError(message)" in failed.error.data["traceback"]
    assert "execute" not in failed.error.data["traceback"].split("\n")[1]


def test_task_error_chooses_type_data_and_retry(runtime: TaskRegistry) -> None:
    outcome = execute_sync(runtime, "declines", "[]", "{}", CTX)
    assert outcome.error is not None
    assert outcome.error.type == "Declined"
    assert outcome.error.retriable is False
    assert outcome.error.data["code"] == 7
    custom = execute_sync(runtime, "custom_error", "[]", "{}", CTX)
    assert custom.error is not None
    assert (custom.error.type, custom.error.retriable) == ("QuotaExceeded", True)


def test_unknown_task_and_bad_arguments_are_non_retryable_outcomes(runtime: TaskRegistry) -> None:
    unknown = execute_sync(runtime, "nope", "[]", "{}", CTX)
    assert unknown.error is not None
    assert (unknown.error.type, unknown.error.retriable) == ("TaskNotFound", False)
    bad = execute_sync(runtime, "fails", "[1, 2]", "{}", CTX)
    assert bad.error is not None
    assert (bad.error.type, bad.error.retriable) == ("TaskValidationError", False)


def test_results_must_be_json_serialisable(runtime: TaskRegistry) -> None:
    outcome = execute_sync(runtime, "returns_object", "[]", "{}", CTX)
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.retriable) == ("ResultNotSerializable", False)
    model = execute_sync(runtime, "returns_model", "[]", "{}", CTX)
    assert orjson.loads(model.value_json) == {"x": 1, "y": 2}
    rich = execute_sync(runtime, "returns_rich", "[]", "{}", CTX)
    assert orjson.loads(rich.value_json) == {
        "when": "2025-01-15",
        "id": "00000000-0000-0000-0000-000000000001",
        "pair": {"left": "a", "right": "b"},
    }
    with pytest.raises(ResultNotSerializable):
        encode_result({1, 2, object()})
    assert encode_result([2**70, {"a": 1}]) == f'[{2**70},{{"a":1}}]'
    with pytest.raises(ResultNotSerializable):
        encode_result([2**70, object()])


def test_execute_sync_runs_async_tasks_on_a_given_or_fresh_loop(runtime: TaskRegistry) -> None:
    fresh = execute_sync(runtime, "context_of_attempt", "[]", "{}", CTX)
    assert orjson.loads(fresh.value_json)["task_id"] == "task-1"
    loop = asyncio.new_event_loop()
    try:
        for attempt in (1, 2):
            ctx = dataclasses.replace(CTX, attempt=attempt)
            reused = execute_sync(runtime, "context_of_attempt", "[]", "{}", ctx, loop=loop)
            assert orjson.loads(reused.value_json)["attempt"] == attempt
    finally:
        loop.close()


def test_memory_error_is_reported_without_a_traceback(runtime: TaskRegistry) -> None:
    outcome = execute_sync(runtime, "out_of_memory", "[]", "{}", CTX)
    assert outcome.error is not None
    assert outcome.error.type == "MemoryError"
    assert outcome.error.data == {}


def test_describe_error_keeps_data_json_serialisable() -> None:
    info = describe_error(TaskError("x", data={"obj": object()}))
    assert "unserialisable_data" in info.data
    orjson.dumps(info.data)
