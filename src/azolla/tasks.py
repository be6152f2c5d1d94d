"""Task definitions: the ``@azolla_task`` decorator, the task registry and task invocation.

Define a task by decorating a function (``async`` or plain)::

    from azolla import azolla_task

    @azolla_task
    async def greet_user(name: str, age: int) -> dict:
        return {"greeting": f"Hello {name}! You are {age} years old."}

    @azolla_task(name="reports.build", retry_policy=RetryPolicy(max_attempts=3))
    def build_report(report_id: int, *, fmt: str = "pdf") -> str:
        ...

The decorated object stays callable exactly like the function (``await greet_user("Al", 3)``)
and exposes ``.name`` and ``.func``. When a shepherd runs the task, the JSON arguments of the
attempt are validated and converted with pydantic from the function's type hints: a JSON array
fills the positional parameters, a JSON object the keyword parameters. Arguments that do not fit
fail the attempt with the non-retryable :class:`TaskValidationError` instead of crashing.

Compatibility: the original Azolla Python client sends a dict of named arguments as a one-element
array (``args=[{"name": "Al", "age": 3}]``, ``kwargs={}``). When binding that array positionally
fails and every key of the object names a parameter, the object is used as keyword arguments.

Errors raised by task code become a failed attempt whose type is the exception's class name and
which may be retried; raise :class:`TaskError` to choose the type, the details (``data``) and
whether a retry makes sense::

    raise TaskError("card declined", retriable=False, data={"code": "insufficient_funds"})

Task code can learn which attempt it runs with :func:`current_task`, to make side effects
idempotent (Azolla executes at least once)::

    ctx = current_task()
    payments.charge(idempotency_key=f"{ctx.task_id}:{ctx.name}")

Return values must be JSON-serialisable (dicts, lists, strings, numbers, booleans, None, plus
pydantic models, dataclasses, datetimes, UUIDs, enums, which are converted); anything else fails
the attempt with the non-retryable :class:`ResultNotSerializable`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar, overload

import orjson
import pydantic
import pydantic_core
import typing_extensions

__all__ = [
    "DuplicateTaskName",
    "NoTaskContext",
    "ResultNotSerializable",
    "TaskContext",
    "TaskDefinition",
    "TaskError",
    "TaskErrorInfo",
    "TaskModuleImportError",
    "TaskOutcome",
    "TaskRegistry",
    "TaskValidationError",
    "UnknownTask",
    "azolla_task",
    "current_task",
    "default_registry",
    "describe_error",
    "encode_result",
    "execute",
    "execute_sync",
    "invoke",
    "load_modules",
    "task_context",
]

P = ParamSpec("P")
R = TypeVar("R")

#: Most characters of a formatted traceback kept in an error's ``data["traceback"]``.
TRACEBACK_TAIL_CHARS = 4000


# --------------------------------------------------------------------------------------------
# Task context
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The attempt a piece of task code is running in.

    Attributes:
        task_id: The task's id (the same for every attempt of the task).
        attempt: The attempt number, from 1 (0 when a worker started under the bare upstream
            command-line contract was not told). Together with ``task_id`` it identifies one
            run; use it to make side effects idempotent.
        name: The registered task name.
        domain: The task's domain.
    """

    task_id: str
    attempt: int
    name: str
    domain: str = "default"


_CURRENT: ContextVar[TaskContext | None] = ContextVar("azolla_current_task", default=None)


class NoTaskContext(LookupError):
    """:func:`current_task` was called outside a running task attempt."""


def current_task() -> TaskContext:
    """Return the context of the task attempt the caller runs in.

    Returns:
        The current :class:`TaskContext`.

    Raises:
        NoTaskContext: When called outside a task attempt (e.g. when the decorated function is
            called directly).
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise NoTaskContext("current_task() called outside a running Azolla task attempt")
    return ctx


@contextmanager
def task_context(ctx: TaskContext) -> Iterator[TaskContext]:
    """Make ``ctx`` the current task context inside the ``with`` block.

    Executors use it around the task call; tests can use it to run task code directly.

    Args:
        ctx: The context to install.

    Yields:
        ``ctx``.
    """
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class TaskError(Exception):
    """An error raised by task code that says how the attempt failed.

    Any exception fails the attempt; raising this one lets the task choose the error type the
    retry policy sees, attach JSON details and forbid a retry.

    Args:
        message: Readable message.
        retriable: False stops retries whatever the retry policy says.
        data: JSON-serialisable details recorded with the failure.
        error_type: The error type name recorded (default: the exception's class name).

    Attributes:
        message: See Args.
        retriable: See Args.
        data: See Args (a dict, empty by default).
        error_type: The error type name recorded for the attempt.
    """

    def __init__(
        self,
        message: str = "",
        *,
        retriable: bool = True,
        data: Mapping[str, Any] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retriable = retriable
        self.data: dict[str, Any] = dict(data) if data else {}
        self.error_type = error_type or type(self).__name__


class TaskValidationError(TaskError):
    """The attempt's arguments do not fit the task's signature (never retried).

    Args:
        message: Readable message.
        data: Details, e.g. ``{"errors": [{"loc": [...], "msg": ..., "type": ...}]}``.
    """

    def __init__(self, message: str, *, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, retriable=False, data=data)


class UnknownTask(TaskError, LookupError):
    """No task with that name is registered (recorded as ``TaskNotFound``, never retried).

    Args:
        name: The unknown task name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no task named {name!r} is registered with this worker",
            retriable=False,
            data={"name": name},
            error_type="TaskNotFound",
        )
        self.name = name


class ResultNotSerializable(TaskError):
    """The task returned a value that cannot be encoded as JSON (never retried).

    Args:
        message: Readable message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class DuplicateTaskName(ValueError):
    """Two different functions were registered under one task name."""


class TaskModuleImportError(ImportError):
    """A task module named in :func:`load_modules` could not be imported."""


# --------------------------------------------------------------------------------------------
# Argument binding
# --------------------------------------------------------------------------------------------


class _Binder:
    """Validates and converts call arguments against a function's signature with pydantic."""

    __slots__ = (
        "_adapter",
        "_keyword_call",
        "_names",
        "_positional_names",
        "_required",
        "_signature",
    )

    def __init__(self, func: Callable[..., Any]) -> None:
        self._signature = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        fields: dict[str, Any] = {}
        positional: list[str] = []
        names: set[str] = set()
        for param in self._signature.parameters.values():
            annotation: Any = hints.get(param.name, Any)
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                annotation = tuple[annotation, ...]
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                annotation = dict[str, annotation]
            else:
                if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                    positional.append(param.name)
                if param.kind is not inspect.Parameter.POSITIONAL_ONLY:
                    names.add(param.name)
            fields[param.name] = typing_extensions.NotRequired[annotation]
        make_typed_dict: Any = typing_extensions.TypedDict
        typed_dict: Any = make_typed_dict(f"{func.__name__}_arguments", fields)
        typed_dict.__pydantic_config__ = pydantic.ConfigDict(arbitrary_types_allowed=True)
        self._adapter: pydantic.TypeAdapter[dict[str, Any]] = pydantic.TypeAdapter(typed_dict)
        self._positional_names = positional
        self._names = names
        params = list(self._signature.parameters.values())
        # Fast path: only positional-or-keyword and keyword-only parameters, so every argument
        # can be passed by keyword.
        self._keyword_call = all(
            p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            for p in params
        )
        self._required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty)

    def bind(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            return self._bind(args, kwargs)
        except TaskValidationError:
            if (
                len(args) == 1
                and not kwargs
                and isinstance(args[0], dict)
                and all(isinstance(k, str) and k in self._names for k in args[0])
            ):
                # Original Azolla Python clients send named arguments as [ {..} ].
                return self._bind((), args[0])
            raise

    def _bind(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._keyword_call:
            return (), self._validate(self._map_to_names(args, kwargs))
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskValidationError(f"arguments do not match the task signature: {exc}") from None
        if not bound.arguments:
            return (), {}
        bound.arguments.update(self._validate(dict(bound.arguments)))
        return bound.args, bound.kwargs

    def _map_to_names(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        positional = self._positional_names
        if len(args) > len(positional):
            raise TaskValidationError(
                "arguments do not match the task signature: too many positional arguments "
                f"({len(args)} given, at most {len(positional)} accepted)"
            )
        data = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():
            if key not in self._names:
                raise TaskValidationError(
                    f"arguments do not match the task signature: unexpected argument {key!r}"
                )
            if key in data:
                raise TaskValidationError(
                    f"arguments do not match the task signature: multiple values for {key!r}"
                )
            data[key] = value
        if not self._required.issubset(data):
            missing = sorted(self._required.difference(data))
            raise TaskValidationError(
                "arguments do not match the task signature: missing required argument(s) "
                + ", ".join(repr(m) for m in missing)
            )
        return data

    def _validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if not data:
            return data
        try:
            return self._adapter.validate_python(data)
        except pydantic.ValidationError as exc:
            errors = [
                {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
                for err in exc.errors(include_url=False, include_input=False, include_context=False)
            ]
            raise TaskValidationError(
                f"invalid task arguments: {_summarise_errors(errors)}", data={"errors": errors}
            ) from None


def _summarise_errors(errors: list[dict[str, Any]]) -> str:
    parts = [".".join(str(p) for p in err["loc"]) + ": " + str(err["msg"]) for err in errors[:5]]
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts)


def _parse_json(text: str | bytes, kind: type, what: str) -> Any:
    if not text or (isinstance(text, str) and not text.strip()):
        return kind()
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise TaskValidationError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        expected = "array" if kind is list else "object"
        raise TaskValidationError(f"{what} must be a JSON {expected}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# Task definitions and the decorator
# --------------------------------------------------------------------------------------------


class TaskDefinition(Generic[P, R]):
    """A function registered as an Azolla task (what ``@azolla_task`` returns).

    Calling the definition calls the function unchanged (no validation, no task context), so
    tasks stay easy to unit-test.

    Args:
        func: The task function, ``async`` or plain.
        name: The task name (default: the function's ``__name__``).
        retry_policy: The task's default retry policy (an :class:`azolla.retry.RetryPolicy`),
            used by clients that submit the task by reference.

    Attributes:
        func: The wrapped function.
        name: The registered task name.
        retry_policy: See Args.
        is_async: True when ``func`` is a coroutine function.
    """

    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(
        self, func: Callable[P, R], *, name: str | None = None, retry_policy: object | None = None
    ) -> None:
        if not callable(func):
            raise TypeError(f"@azolla_task needs a function, got {func!r}")
        task_name = func.__name__ if name is None else name
        if not isinstance(task_name, str) or not task_name.strip():
            raise ValueError(f"invalid task name {task_name!r}")
        self.func = func
        self.name = task_name
        self.retry_policy = retry_policy
        self.is_async = inspect.iscoroutinefunction(func)
        self._binder: _Binder | None = None
        functools.update_wrapper(self, func)
        try:
            self._binder = _Binder(func)
        except NameError:
            # Forward references that are not defined yet; resolved at the first call.
            self._binder = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function directly, exactly like the undecorated function."""
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name!r} {self.qualified_function}>"

    @property
    def module(self) -> str:
        """The name of the module the function is defined in."""
        return str(getattr(self.func, "__module__", "") or "")

    @property
    def qualified_function(self) -> str:
        """``module:qualname`` of the function (identifies it across re-imports)."""
        qualname = getattr(self.func, "__qualname__", repr(self.func))
        return f"{self.module}:{qualname}"

    def bind(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Validate and convert decoded arguments against the function's signature.

        Args:
            args: Positional arguments (a decoded JSON array).
            kwargs: Keyword arguments (a decoded JSON object).

        Returns:
            ``(args, kwargs)`` converted to the annotated types, ready to call ``func`` with.

        Raises:
            TaskValidationError: When the arguments do not fit.
        """
        binder = self._binder
        if binder is None:
            try:
                binder = self._binder = _Binder(self.func)
            except NameError as exc:
                raise TaskValidationError(
                    f"cannot resolve the type hints of task {self.name!r}: {exc}"
                ) from None
        return binder.bind(args, kwargs or {})

    def bind_json(
        self, args_json: str | bytes, kwargs_json: str | bytes
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Like :meth:`bind`, from JSON text (an array and an object; empty text means none).

        Args:
            args_json: JSON array text.
            kwargs_json: JSON object text.

        Returns:
            ``(args, kwargs)`` ready to call ``func`` with.

        Raises:
            TaskValidationError: When the text is not a JSON array/object or does not fit.
        """
        args = _parse_json(args_json, list, "args")
        kwargs = _parse_json(kwargs_json, dict, "kwargs")
        return self.bind(args, kwargs)


@overload
def azolla_task(func: Callable[P, R], /) -> TaskDefinition[P, R]: ...


@overload
def azolla_task(
    *,
    name: str | None = None,
    retry_policy: object | None = None,
    registry: TaskRegistry | None = None,
) -> Callable[[Callable[P, R]], TaskDefinition[P, R]]: ...


def azolla_task(
    func: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retry_policy: object | None = None,
    registry: TaskRegistry | None = None,
) -> TaskDefinition[P, R] | Callable[[Callable[P, R]], TaskDefinition[P, R]]:
    """Declare a function as an Azolla task and register it.

    Use it bare (``@azolla_task``) or with options (``@azolla_task(name="x")``).

    Args:
        func: The function (when used bare).
        name: The task name (default: the function's name).
        retry_policy: The task's default retry policy.
        registry: The registry to add the task to (default: :data:`default_registry`).

    Returns:
        The :class:`TaskDefinition`, or a decorator that makes one.

    Raises:
        DuplicateTaskName: When another function is already registered under the name.
    """

    def decorate(fn: Callable[P, R]) -> TaskDefinition[P, R]:
        definition = TaskDefinition(fn, name=name, retry_policy=retry_policy)
        (registry if registry is not None else default_registry).register(definition)
        return definition

    if func is not None:
        return decorate(func)
    return decorate


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class TaskRegistry:
    """Task definitions by name.

    Args:
        tasks: Definitions to register at once.
    """

    def __init__(self, tasks: Iterable[TaskDefinition[Any, Any]] = ()) -> None:
        self._tasks: dict[str, TaskDefinition[Any, Any]] = {}
        for task in tasks:
            self.register(task)

    def register(self, definition: TaskDefinition[P, R]) -> TaskDefinition[P, R]:
        """Add a definition.

        Registering the same function again (e.g. after a module reload) replaces the entry.

        Args:
            definition: The task definition.

        Returns:
            ``definition``.

        Raises:
            DuplicateTaskName: When a different function already has that name.
        """
        existing = self._tasks.get(definition.name)
        if (
            existing is not None
            and existing is not definition
            and existing.qualified_function != definition.qualified_function
        ):
            raise DuplicateTaskName(
                f"task name {definition.name!r} is used by both {existing.qualified_function} "
                f"and {definition.qualified_function}"
            )
        self._tasks[definition.name] = definition
        return definition

    def get(self, name: str) -> TaskDefinition[Any, Any]:
        """Return the definition registered under ``name``.

        Args:
            name: The task name.

        Returns:
            The definition.

        Raises:
            UnknownTask: When no task has that name.
        """
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(name) from None

    def names(self) -> list[str]:
        """Return the registered task names, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskDefinition[Any, Any]]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)


#: The registry ``@azolla_task`` adds to unless told otherwise.
default_registry = TaskRegistry()


def load_modules(modules: Iterable[str], *, registry: TaskRegistry | None = None) -> TaskRegistry:
    """Import task modules and collect the tasks they define.

    Args:
        modules: Dotted module names, e.g. ``["myapp.tasks", "myapp.reports"]``.
        registry: Registry to add the tasks to (default: a new one).

    Returns:
        The registry, holding every task defined in (or imported into) the modules.

    Raises:
        TaskModuleImportError: When a module cannot be imported (the cause is chained).
        DuplicateTaskName: When two different functions use one name.
    """
    result = registry if registry is not None else TaskRegistry()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise TaskModuleImportError(
                f"cannot import task module {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        for value in list(vars(module).values()):
            if isinstance(value, TaskDefinition):
                result.register(value)
        for definition in default_registry:
            if definition.module == module_name and definition.name not in result:
                result.register(definition)
    return result


# --------------------------------------------------------------------------------------------
# Invocation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskErrorInfo:
    """How an attempt failed, in the shape of the wire's ``ErrorResult``.

    Attributes:
        type: Error type name (e.g. ``"ValueError"``, ``"TaskNotFound"``).
        message: Readable message.
        data: JSON-serialisable details.
        retriable: Whether a retry may help.
    """

    type: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    retriable: bool = True


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What one invocation produced.

    Attributes:
        ok: True when the task returned a value.
        value_json: The value as JSON text when ``ok``.
        error: The failure when not ``ok``.
    """

    ok: bool
    value_json: str = "null"
    error: TaskErrorInfo | None = None


def _json_default(value: Any) -> Any:
    try:
        return pydantic_core.to_jsonable_python(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise TypeError(str(exc)) from None


def encode_result(value: Any) -> str:
    """Encode a task's return value as JSON text.

    Args:
        value: The value.

    Returns:
        The JSON text.

    Raises:
        ResultNotSerializable: When the value cannot be encoded.
    """
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise ResultNotSerializable(
                f"task returned a value that is not JSON-serialisable "
                f"({type(value).__name__}): {exc}"
            ) from None
    try:  # integers beyond 64 bits: the standard library encodes them exactly
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ResultNotSerializable(
            f"task returned a value that is not JSON-serialisable ({type(value).__name__}): {exc}"
        ) from None


def _safe_data(data: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return dict(orjson.loads(orjson.dumps(dict(data), default=_json_default)))
    except (TypeError, ValueError):
        return {"unserialisable_data": repr(data)[:TRACEBACK_TAIL_CHARS]}


def describe_error(exc: BaseException) -> TaskErrorInfo:
    """Turn an exception raised by (or around) task code into a :class:`TaskErrorInfo`.

    :class:`TaskError` gives its own type, data and retry flag; any other exception is recorded
    under its class name, retriable, with the traceback's tail in ``data["traceback"]``.

    Args:
        exc: The exception.

    Returns:
        The error info.
    """
    if isinstance(exc, MemoryError):
        # Keep the failure path allocation-free-ish: no traceback formatting.
        return TaskErrorInfo(type="MemoryError", message=str(exc) or "out of memory")
    if isinstance(exc, TaskError):
        data = _safe_data(exc.data)
        if not isinstance(exc, TaskValidationError | UnknownTask | ResultNotSerializable):
            data.setdefault("traceback", _traceback_tail(exc))
        return TaskErrorInfo(
            type=exc.error_type, message=exc.message, data=data, retriable=exc.retriable
        )
    return TaskErrorInfo(
        type=type(exc).__name__,
        message=str(exc),
        data={"traceback": _traceback_tail(exc)},
        retriable=True,
    )


def _traceback_tail(exc: BaseException) -> str:
    tb = exc.__traceback__
    # Leave out the frames of this module (the invocation machinery).
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-TRACEBACK_TAIL_CHARS:]


async def invoke(
    definition: TaskDefinition[..., Any],
    args_json: str | bytes,
    kwargs_json: str | bytes,
    context: TaskContext | None = None,
) -> Any:
    """Run a task once with JSON arguments and return its value.

    Plain (non-``async``) functions are called inline, blocking the event loop: executors run
    them in worker processes.

    Args:
        definition: The task.
        args_json: JSON array of positional arguments.
        kwargs_json: JSON object of keyword arguments.
        context: The task context visible to :func:`current_task` during the call.

    Returns:
        What the function returned (awaited when it is awaitable).

    Raises:
        TaskValidationError: When the arguments do not fit.
        Exception: Whatever the task raises.
    """
    args, kwargs = definition.bind_json(args_json, kwargs_json)
    token = _CURRENT.set(context) if context is not None else None
    try:
        result = definition.func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        if token is not None:
            _CURRENT.reset(token)


async def execute(
    registry: TaskRegistry,
    name: str,
    args_json: str | bytes,
    kwargs_json: str | bytes,
    context: TaskContext | None = None,
) -> TaskOutcome:
    """Look a task up, run it and capture its outcome; never raises for task failures.

    Args:
        registry: Where to find the task.
        name: The task name.
        args_json: JSON array of positional arguments.
        kwargs_json: JSON object of keyword arguments.
        context: The task context (default: one with an empty task id, attempt 1).

    Returns:
        The outcome.
    """
    try:
        definition = registry.get(name)
        value = await invoke(definition, args_json, kwargs_json, context)
        return TaskOutcome(ok=True, value_json=encode_result(value))
    except Exception as exc:
        return TaskOutcome(ok=False, error=describe_error(exc))


def execute_sync(
    registry: TaskRegistry,
    name: str,
    args_json: str | bytes,
    kwargs_json: str | bytes,
    context: TaskContext | None = None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
) -> TaskOutcome:
    """Like :func:`execute`, from synchronous code (worker processes).

    Plain functions are called directly; coroutine functions run to completion on ``loop``
    (a fresh event loop when None, closed afterwards).

    Args:
        registry: Where to find the task.
        name: The task name.
        args_json: JSON array of positional arguments.
        kwargs_json: JSON object of keyword arguments.
        context: The task context.
        loop: A reusable event loop, not running, for ``async`` tasks.

    Returns:
        The outcome.
    """
    token = _CURRENT.set(context) if context is not None else None
    try:
        definition = registry.get(name)
        args, kwargs = definition.bind_json(args_json, kwargs_json)
        value: Any = definition.func(*args, **kwargs)
        if inspect.isawaitable(value):
            value = _run_awaitable(value, loop)
        return TaskOutcome(ok=True, value_json=encode_result(value))
    except Exception as exc:
        return TaskOutcome(ok=False, error=describe_error(exc))
    finally:
        if token is not None:
            _CURRENT.reset(token)


def _run_awaitable(awaitable: Any, loop: asyncio.AbstractEventLoop | None) -> Any:
    if not asyncio.iscoroutine(awaitable):
        awaitable = _await(awaitable)
    if loop is None:
        return asyncio.run(awaitable)
    return loop.run_until_complete(awaitable)


async def _await(awaitable: Any) -> Any:
    return await awaitable
