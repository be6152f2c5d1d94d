"""Value types shared by the aggregates: states, error records, ids and task specs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from hashlib import sha1
from typing import Any
from uuid import UUID, SafeUUID, uuid5

from azolla.domain.errors import InvalidTaskSpec

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_GROUP",
    "TERMINAL_TASK_STATES",
    "AttemptState",
    "ErrorInfo",
    "SpecLimits",
    "TaskState",
    "attempt_stream_id",
    "check_json_array",
    "check_json_object",
    "check_name",
    "event_time",
    "parse_uuid",
    "partition_day",
    "shepherd_stream_id",
    "uuid_from_int",
    "uuid_text",
]

DEFAULT_DOMAIN = "default"
DEFAULT_GROUP = "default"
SECONDS_PER_DAY = 86_400
_ATTEMPT_NAMESPACE = UUID("6f1f0e2a-5d0b-4c1e-9a53-1b7b7d9e4a01")
_SHEPHERD_NAMESPACE = UUID("0b8f5c1e-2f3a-4d7b-8e6c-9a4d2c1b3e02")


class TaskState(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class AttemptState(StrEnum):
    """Where one attempt is in its life."""

    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


LIVE_ATTEMPT_STATES = frozenset({AttemptState.ASSIGNED, AttemptState.RUNNING})


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as recorded: the error's type name, message, details and retry flag.

    Attributes:
        type: Error type name, e.g. ``"ValueError"`` or ``"WorkerCrashed"``.
        message: Human-readable message.
        data: JSON-serialisable details (exit code, signal, stderr tail, ...).
        retriable: False stops retries whatever the policy says.
    """

    type: str
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    retriable: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form used in event payloads."""
        return {
            "type": self.type,
            "message": self.message,
            "data": self.data,
            "retriable": self.retriable,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ErrorInfo:
        """Build from the JSON form of :meth:`to_dict`."""
        return cls(
            type=str(raw.get("type", "")),
            message=str(raw.get("message", "")),
            data=dict(raw.get("data") or {}),
            retriable=bool(raw.get("retriable", True)),
        )


_last_event_time: list[Any] = [None, None]


def event_time(epoch: float) -> datetime:
    """Return ``epoch`` as an aware datetime, truncated (never rounded up) to the microsecond.

    Event times must not postdate the command's ``now``: ``submitted_at`` (read back from the
    creation event) is the task's first ``ready_at``, and a task started at the very instant it
    was submitted must be due.
    """
    last = _last_event_time
    if last[0] == epoch:  # every event of one decision step shares its ``now``
        cached: datetime = last[1]
        return cached
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    if moment.timestamp() > epoch:
        moment -= timedelta(microseconds=1)
    _last_event_time[:] = (epoch, moment)
    return moment


def partition_day(timestamp: float) -> int:
    """Return the UTC day number (days since the Unix epoch) of ``timestamp``."""
    return int(timestamp // SECONDS_PER_DAY)


_new_object = object.__new__
_set_attribute = object.__setattr__
_UNKNOWN_SAFETY = SafeUUID.unknown


def uuid_from_int(value: int) -> UUID:
    """Return ``UUID(int=value)`` for a ``value`` known to fit in 128 bits, without the checks.

    ``UUID.__init__`` validates its arguments in Python and costs about as much as the rest of
    making a task id; the result here is an ordinary, equal :class:`~uuid.UUID`.
    """
    made: UUID = _new_object(UUID)
    _set_attribute(made, "int", value)
    _set_attribute(made, "is_safe", _UNKNOWN_SAFETY)
    return made


_CANONICAL_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(text: str) -> UUID:
    """Return ``UUID(text)``; the canonical 36-character form skips ``UUID.__init__``.

    Task ids come back from shepherds and the log in the canonical form (``str(uuid)``);
    every other form :class:`~uuid.UUID` accepts goes through it (and so do its errors).

    Raises:
        ValueError: ``text`` is not a UUID.
    """
    if _CANONICAL_UUID.fullmatch(text) is not None:
        return uuid_from_int(int(text.replace("-", ""), 16))
    return UUID(text)


_ATTEMPT_NAMESPACE_BYTES = _ATTEMPT_NAMESPACE.bytes
_V5_KEEP = ((1 << 128) - 1) & ~(0xF << 76 | 0x3 << 62)
_V5_SET = 0x5 << 76 | 0x2 << 62


def uuid_text(value: UUID) -> str:
    """Return ``str(value)`` (the canonical form) without the Python-level ``UUID.__str__``."""
    h = f"{value.int:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@lru_cache(maxsize=65_536)
def attempt_stream_id(task_id: UUID, number: int) -> UUID:
    """Return the deterministic stream id of attempt ``number`` of ``task_id``.

    It is ``uuid5(namespace, f"{task_id}/{number}")``, computed without the Python-level
    ``UUID.__str__`` and ``UUID.__init__`` (every attempt needs it on the dispatch path).
    """
    name = f"{uuid_text(task_id)}/{number}"
    digest = sha1(_ATTEMPT_NAMESPACE_BYTES + name.encode()).digest()
    return uuid_from_int(int.from_bytes(digest[:16], "big") & _V5_KEEP | _V5_SET)


def shepherd_stream_id(shepherd_uuid: str) -> UUID:
    """Return the stream id of a shepherd's self-chosen id (any text, UUIDs included).

    Always derived through a namespace, never the given id itself: a shepherd can therefore
    never name (and block) the stream of a task or of an attempt.
    """
    return uuid5(_SHEPHERD_NAMESPACE, shepherd_uuid)


@dataclass(frozen=True, slots=True)
class SpecLimits:
    """Bounds on what a submission may contain.

    Attributes:
        max_name_length: Longest task name, domain or group, in characters.
        max_payload_bytes: Largest args plus kwargs JSON, in UTF-8 bytes.
        max_nesting: Deepest nesting of arrays/objects in args or kwargs.
        max_idempotency_key_length: Longest idempotency key.
    """

    max_name_length: int = 256
    max_payload_bytes: int = 1 << 20
    max_nesting: int = 64
    max_idempotency_key_length: int = 512


def check_name(value: str, what: str, limits: SpecLimits) -> str:
    """Validate a task name, domain or group and return it.

    A name is 1..``max_name_length`` printable characters without surrounding whitespace.

    Raises:
        InvalidTaskSpec: With a message naming ``what`` and the rule broken.
    """
    if not value:
        raise InvalidTaskSpec(f"{what} must not be empty")
    if len(value) > limits.max_name_length:
        raise InvalidTaskSpec(
            f"{what} is {len(value)} characters long; the limit is {limits.max_name_length}"
        )
    if not value.isprintable() or value.strip() != value:
        raise InvalidTaskSpec(f"{what} must be printable text without surrounding whitespace")
    return value


def _nesting_depth(text: str) -> int:
    """Return the maximum bracket nesting depth of JSON ``text`` (ignoring strings)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        # A lone surrogate: not text any database or other language would accept.
        raise InvalidTaskSpec(f"{what} is not valid UTF-8 text") from None


def _parse_json(text: str, what: str, limits: SpecLimits) -> Any:
    if len(text) > limits.max_payload_bytes or _utf8_size(text, what) > limits.max_payload_bytes:
        raise InvalidTaskSpec(f"{what} is larger than {limits.max_payload_bytes} bytes")
    if ("[" in text or "{" in text) and _nesting_depth(text) > limits.max_nesting:
        raise InvalidTaskSpec(f"{what} nests deeper than {limits.max_nesting} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise InvalidTaskSpec(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        # 1e400 overflows to infinity, which is as unportable as the Infinity literal.
        raise ValueError(f"{literal} is not allowed in JSON (not a finite number)")
    return value


def check_json_array(text: str, what: str, limits: SpecLimits) -> str:
    """Validate that ``text`` is a JSON array within the limits; return it ("[]" if empty).

    Raises:
        InvalidTaskSpec: If it is not valid JSON, not an array, too large or too deep.
    """
    if not text:
        return "[]"
    if text == "[]":
        return text
    if not isinstance(_parse_json(text, what, limits), list):
        raise InvalidTaskSpec(f"{what} must be a JSON array")
    return text


def check_json_object(text: str, what: str, limits: SpecLimits) -> str:
    """Validate that ``text`` is a JSON object within the limits; return it ("{}" if empty).

    Raises:
        InvalidTaskSpec: If it is not valid JSON, not an object, too large or too deep.
    """
    if not text:
        return "{}"
    if text == "{}":
        return text
    if not isinstance(_parse_json(text, what, limits), dict):
        raise InvalidTaskSpec(f"{what} must be a JSON object")
    return text


def check_finite(value: float | None, what: str, low: float, high: float) -> float | None:
    """Validate an optional number is finite and within ``[low, high]``.

    Raises:
        InvalidTaskSpec: If it is NaN, infinite or out of range.
    """
    if value is None:
        return None
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidTaskSpec(f"{what} must be between {low} and {high}, got {value}")
    return value
