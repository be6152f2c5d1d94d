"""Building task submissions: task names, argument mapping, options and validation."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import weakref
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from azolla.adapters.grpc.pb import orchestrator_pb2
from azolla.errors import ValidationError
from azolla.retry import RetryPolicy

if TYPE_CHECKING:
    from typing import Self

    from azolla.client._client import Client
    from azolla.client._handle import TaskHandle

__all__ = ["TaskSubmission", "map_args", "task_name_of"]

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
#: Largest args + kwargs JSON accepted client-side, in bytes (the server may accept less).
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Final = _Unset()


def task_name_of(task: object) -> str:
    """Return the task name for a name, an ``azolla_task`` object or a plain function.

    Args:
        task: A task name (str), an object with a ``name`` attribute (an ``azolla_task``), or
            a function (its ``__name__``).

    Raises:
        ValidationError: No usable name.
    """
    if isinstance(task, str):
        name = task
    else:
        attr = getattr(task, "name", None)
        if callable(attr) and not isinstance(attr, str):
            attr = attr()
        if not isinstance(attr, str):
            attr = getattr(task, "__name__", None)
        if not isinstance(attr, str):
            raise ValidationError(
                f"cannot tell the task name of {task!r}: pass the name as a string, a function, "
                "or an @azolla_task"
            )
        name = attr
    if not name.strip():
        raise ValidationError("the task name must not be empty")
    if name != name.strip():
        raise ValidationError(f"the task name {name!r} has leading or trailing whitespace")
    return name


def task_retry_policy(task: object) -> RetryPolicy | None:
    """Return the default retry policy an ``@azolla_task`` declares, if any."""
    policy = getattr(task, "retry_policy", None)
    return policy if isinstance(policy, RetryPolicy) else None


def map_args(value: Any) -> tuple[list[Any], dict[str, Any]]:
    """Map the ``args`` value of ``submit_task`` to (positional, keyword) arguments.

    * ``None`` or nothing: no arguments;
    * a dict (any mapping): keyword arguments;
    * a list or tuple: positional arguments;
    * anything else: one positional argument.

    Raises:
        ValidationError: A mapping has non-string keys.
    """
    kind = type(value)
    if kind is list:  # the common cases first: no ABC check
        return list(value), {}
    if value is None or value is UNSET:
        return [], {}
    if kind is dict:
        return [], _kwargs_dict(value)
    if isinstance(value, Mapping):
        return [], _kwargs_dict(value)
    if isinstance(value, list | tuple):
        return list(value), {}
    return [value], {}


def _kwargs_dict(value: Mapping[Any, Any]) -> dict[str, Any]:
    for key in value:
        if not isinstance(key, str):
            raise ValidationError(f"keyword argument names must be strings, not {key!r}")
    return dict(value)


#: One encoder for every submit (``json.dumps`` with options builds a new one per call).
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
#: Encodings of the empty containers, the most common arguments of all.
_EMPTY_JSON: Final[dict[type, str]] = {list: "[]", dict: "{}", tuple: "[]"}


def encode_json(value: Any, what: str, task_name: str) -> str:
    """Encode ``value`` as compact JSON text.

    Raises:
        ValidationError: The value cannot be represented as JSON (with the reason).
    """
    if not value:
        empty = _EMPTY_JSON.get(type(value))
        if empty is not None:
            return empty
    try:
        text: str = _ENCODER.encode(value)
        return text
    except (TypeError, ValueError, RecursionError) as exc:
        reason = str(exc) or type(exc).__name__
        if "Out of range float" in reason:
            reason = "NaN and infinity are not valid JSON"
        raise ValidationError(
            f"the {what} of task {task_name!r} are not JSON-serialisable: {reason}. Use JSON "
            "types only (str, int, float, bool, None, list, and dict with str keys)."
        ) from None


_signatures: weakref.WeakKeyDictionary[Any, inspect.Signature | None] = weakref.WeakKeyDictionary()


def _signature(task: Any) -> inspect.Signature | None:
    try:
        return _signatures[task]
    except (KeyError, TypeError):
        pass
    try:
        signature: inspect.Signature | None = inspect.signature(task)
    except (TypeError, ValueError):
        signature = None
    with contextlib.suppress(TypeError):  # not weak-referenceable: no caching
        _signatures[task] = signature
    return signature


def check_call(task: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Check that ``task`` (a callable) accepts ``args`` and ``kwargs``.

    Raises:
        ValidationError: The arguments do not fit the task's signature.
    """
    if isinstance(task, str) or not callable(task):
        return
    func = getattr(task, "func", None)  # an @azolla_task: check the function it wraps
    signature = _signature(func if callable(func) else task)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        hint = ""
        if kwargs and not args:
            hint = " (a dict given to submit_task means keyword arguments; wrap it in a list to "
            hint += "pass one dict argument)"
        shown = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        raise ValidationError(f"arguments do not fit task {name}{shown}: {exc}{hint}") from None


def _check_seconds(what: str, value: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"{what} must be a finite number of seconds, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValidationError(f"{what} must be {'> 0' if positive else '>= 0'}, not {value!r}")
    return float(value)


def _check_text(what: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} must be a non-empty string, not {value!r}")
    return value


@dataclass(slots=True)
class SubmitOptions:
    """Options shared by single and batch submissions (all validated)."""

    retry_policy: RetryPolicy | None = None
    shepherd_group: str | None = None
    idempotency_key: str | None = None
    priority: int = 0
    delay: float | None = None
    not_before: datetime | None = None
    timeout: float | None = None

    @staticmethod
    def check_policy(policy: RetryPolicy | None) -> RetryPolicy | None:
        """Validate a retry policy option."""
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ValidationError(f"retry_policy must be a RetryPolicy, not {policy!r}")
        return policy

    @staticmethod
    def check_priority(priority: int) -> int:
        """Validate a priority option (a 32-bit signed int)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValidationError(f"priority must be an int, not {priority!r}")
        if not INT32_MIN <= priority <= INT32_MAX:
            raise ValidationError(f"priority must fit in 32 bits, not {priority}")
        return priority

    @staticmethod
    def check_not_before(when: datetime) -> datetime:
        """Validate a not-before time (timezone-aware)."""
        if not isinstance(when, datetime):
            raise ValidationError(f"not_before must be a datetime, not {when!r}")
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValidationError(
                "not_before must be timezone-aware, e.g. datetime.now(UTC) + timedelta(...)"
            )
        return when

    @classmethod
    def build(
        cls,
        *,
        retry_policy: RetryPolicy | None = None,
        shepherd_group: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: datetime | None = None,
        timeout: float | None = None,
    ) -> SubmitOptions:
        """Validate options given as keywords (``delay`` and ``not_before`` exclude each other).

        Raises:
            ValidationError: An option is out of range.
        """
        if delay is not None and not_before is not None:
            raise ValidationError("give either delay or not_before, not both")
        return cls(
            retry_policy=cls.check_policy(retry_policy),
            shepherd_group=None
            if shepherd_group is None
            else _check_text("shepherd_group", shepherd_group),
            idempotency_key=None
            if idempotency_key is None
            else _check_text("idempotency_key", idempotency_key),
            priority=cls.check_priority(priority),
            delay=None if delay is None else _check_seconds("delay", delay, positive=False),
            not_before=None if not_before is None else cls.check_not_before(not_before),
            timeout=None if timeout is None else _check_seconds("timeout", timeout, positive=True),
        )

    def wire_fields(self, now: float | None = None) -> dict[str, Any]:
        """The ``CreateTaskRequest`` fields these options set (not the idempotency key).

        Args:
            now: Epoch seconds a ``delay`` counts from (default: the current time).
        """
        fields: dict[str, Any] = {}
        if self.priority:
            fields["priority"] = self.priority
        if self.retry_policy is not None:
            fields["retry_policy"] = self.retry_policy.wire_message()
        if self.shepherd_group is not None:
            fields["shepherd_group"] = self.shepherd_group
        if self.not_before is not None or self.delay is not None:
            not_before = self.not_before_ms(time.time() if now is None else now)
            if not_before is not None:
                fields["not_before_ms"] = not_before
        if self.timeout is not None:
            fields["timeout_ms"] = max(1, math.ceil(self.timeout * 1000))
        return fields

    def not_before_ms(self, now: float) -> int | None:
        """The not-before time in epoch milliseconds, computing a delay from ``now``."""
        if self.not_before is not None:
            return max(0, int(self.not_before.timestamp() * 1000))
        if self.delay is not None and self.delay > 0:
            return int((now + self.delay) * 1000)
        return None


def encode_arguments(name: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, str]:
    """Encode a task's arguments as the JSON texts of a ``CreateTaskRequest``.

    Raises:
        ValidationError: Arguments are not JSON-serialisable or too large.
    """
    args_json = encode_json(args, "positional arguments", name)
    kwargs_json = encode_json(kwargs, "keyword arguments", name)
    if len(args_json) + len(kwargs_json) > MAX_PAYLOAD_BYTES:
        raise ValidationError(
            f"the arguments of task {name!r} take {len(args_json) + len(kwargs_json)} bytes as "
            f"JSON, more than the {MAX_PAYLOAD_BYTES} allowed; pass a reference (a URL, a key) "
            "instead of the data"
        )
    return args_json, kwargs_json


def build_request(
    name: str,
    domain: str,
    args: list[Any],
    kwargs: dict[str, Any],
    options: SubmitOptions,
    *,
    now: float | None = None,
    idempotency_key: str | None = None,
) -> orchestrator_pb2.CreateTaskRequest:
    """Build and validate one ``CreateTaskRequest``.

    Raises:
        ValidationError: Arguments are not JSON-serialisable or too large.
    """
    args_json, kwargs_json = encode_arguments(name, args, kwargs)
    fields = options.wire_fields(now)
    key = idempotency_key if idempotency_key is not None else options.idempotency_key
    if key is not None:
        return orchestrator_pb2.CreateTaskRequest(
            name=name,
            domain=domain,
            args=args_json,
            kwargs=kwargs_json,
            idempotency_key=key,
            **fields,
        )
    return orchestrator_pb2.CreateTaskRequest(
        name=name, domain=domain, args=args_json, kwargs=kwargs_json, **fields
    )


class TaskSubmission:
    """A task about to be submitted; configure it, then ``await .submit()``.

    Obtained from :meth:`Client.submit_task`. Every option method returns the submission
    itself, so calls chain. Awaiting the submission itself is the same as awaiting
    :meth:`submit`.

    Example:
        >>> handle = await (
        ...     client.submit_task("send_email", {"to": "a@example.com"})
        ...     .retry_policy(RetryPolicy(max_attempts=3))
        ...     .priority(5)
        ...     .submit()
        ... )
    """

    __slots__ = ("_args", "_client", "_kwargs", "_name", "_options", "_task")

    def __init__(self, client: Client, task: Any, args: Any = UNSET) -> None:
        self._client = client
        self._task = task
        self._name = task_name_of(task)
        self._args, self._kwargs = map_args(args)
        self._options = SubmitOptions(retry_policy=task_retry_policy(task))

    @property
    def name(self) -> str:
        """The task name that will be submitted."""
        return self._name

    def args(self, *values: Any) -> Self:
        """Set the positional arguments, exactly as given.

        ``.args("Alice", 25)`` calls the task as ``task("Alice", 25)``; ``.args([1, 2])`` passes
        one list argument. Replaces positional arguments given before.

        Args:
            *values: The positional arguments.
        """
        self._args = list(values)
        return self

    def kwargs(self, mapping: Mapping[str, Any] | None = None, /, **values: Any) -> Self:
        """Set the keyword arguments, from a mapping and/or keywords.

        Replaces keyword arguments given before.

        Args:
            mapping: Keyword arguments as a dict.
            **values: Keyword arguments.

        Raises:
            ValidationError: A key is not a string.
        """
        merged = _kwargs_dict(mapping) if mapping is not None else {}
        merged.update(values)
        self._kwargs = merged
        return self

    def retry_policy(self, policy: RetryPolicy | None) -> Self:
        """Set the retry policy.

        Without this call, an ``@azolla_task`` that declares a ``retry_policy`` uses it; any
        other task gets the server's default. ``None`` asks for the server's default.

        Args:
            policy: The policy.

        Raises:
            ValidationError: ``policy`` is not a :class:`~azolla.retry.RetryPolicy`.
        """
        self._options.retry_policy = SubmitOptions.check_policy(policy)
        return self

    def with_retry(self, policy: RetryPolicy | None) -> Self:
        """Alias of :meth:`retry_policy`.

        Args:
            policy: The policy.
        """
        return self.retry_policy(policy)

    def shepherd_group(self, group: str) -> Self:
        """Run the task only on shepherds of this group (default group: ``"default"``).

        Args:
            group: The shepherd group.
        """
        self._options.shepherd_group = _check_text("shepherd_group", group)
        return self

    def idempotency_key(self, key: str) -> Self:
        """Make the submission idempotent: the same key in the same domain returns the same task.

        Submits with a key are also retried automatically after a connection failure.

        Args:
            key: The idempotency key.
        """
        self._options.idempotency_key = _check_text("idempotency_key", key)
        return self

    def priority(self, priority: int) -> Self:
        """Set the priority: higher runs first among ready tasks (default 0, 32-bit signed).

        Args:
            priority: The priority.
        """
        self._options.priority = SubmitOptions.check_priority(priority)
        return self

    def delay(self, seconds: float) -> Self:
        """Start the task no sooner than ``seconds`` after submission.

        Replaces an earlier :meth:`not_before`.

        Args:
            seconds: The delay (>= 0).
        """
        self._options.delay = _check_seconds("delay", seconds, positive=False)
        self._options.not_before = None
        return self

    def not_before(self, when: datetime) -> Self:
        """Start the task no sooner than ``when`` (a timezone-aware datetime).

        Replaces an earlier :meth:`delay`.

        Args:
            when: The earliest start time.
        """
        self._options.not_before = SubmitOptions.check_not_before(when)
        self._options.delay = None
        return self

    def timeout(self, seconds: float) -> Self:
        """Limit each attempt to ``seconds``; an attempt that runs longer fails and may retry.

        Args:
            seconds: The per-attempt timeout (> 0).
        """
        self._options.timeout = _check_seconds("timeout", seconds, positive=True)
        return self

    def to_request(self, domain: str) -> orchestrator_pb2.CreateTaskRequest:
        """Validate and build the wire request (used by :meth:`submit`).

        Args:
            domain: The domain to submit in.

        Raises:
            ValidationError: Arguments do not fit the task or are not JSON-serialisable.
        """
        check_call(self._task, self._name, self._args, self._kwargs)
        return build_request(self._name, domain, self._args, self._kwargs, self._options)

    async def submit(self) -> TaskHandle:
        """Submit the task; return its handle once the orchestrator has durably accepted it.

        Concurrent submits of one client share batch RPCs; a lone submit is sent at once.

        Returns:
            The handle of the new task (or of the existing one, for a repeated idempotency key).

        Raises:
            ValidationError: Bad arguments or options (nothing was sent), or the server
                rejected the task.
            AzollaConnectionError: The orchestrator could not be reached; the task may or may
                not exist, unless an idempotency key was set (then the submit was retried).
            OverloadedError: The server stayed overloaded through the retries.
            ClientClosedError: The client is closed.
        """
        return await self._client._submit_one(self)

    def __await__(self) -> Generator[Any, None, TaskHandle]:
        return self.submit().__await__()

    def __repr__(self) -> str:
        return f"<TaskSubmission {self._name!r} args={self._args!r} kwargs={self._kwargs!r}>"
