"""Plumbing of the ``azolla`` command line: options, exit codes, errors, input parsing.

Every command ends with one of the exit codes of :data:`EXIT_CODES` (0 success, 1 task failed
or not found, 2 usage, 3 unavailable, 4 not authorised, 5 internal error, 124 wait timed out,
130 interrupted). A failure is reported as one readable line on standard error
(``azolla: error: ...``), never as a traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import typer

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_AUTH",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "CliError",
    "CliOptions",
    "exit_code_for",
    "fail",
    "parse_days",
    "parse_json",
    "parse_time",
    "run_async",
]

#: Where the CLI looks for the orchestrator by default.
DEFAULT_SERVER = "http://127.0.0.1:52710"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_AUTH = 4
EXIT_INTERNAL = 5
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

#: Every exit code and what it means (the reference page is generated from this).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the task failed or was cancelled (`submit --wait`, `retry --wait`, "
                  "`watch`), the task was not found, or the server refused the operation "
                  "(e.g. `retry` of a task that did not fail); `migrate --dry-run`: migrations "
                  "are pending"),
    (EXIT_USAGE, "usage: unknown option, bad JSON, malformed time or duration, invalid "
                 "request"),
    (EXIT_UNAVAILABLE, "the orchestrator (or, for `migrate` and `retention run`, the "
                       "database) could not be reached"),
    (EXIT_AUTH, "missing or invalid token, or the token does not allow this"),
    (EXIT_INTERNAL, "internal error in the server or the database (see its log)"),
    (EXIT_TIMEOUT, "`--wait-timeout` ran out; the task goes on"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)

T = TypeVar("T")


class CliError(Exception):
    """A failure to report in one line, with the exit code to end with.

    Args:
        message: The readable message (one line).
        code: The exit code.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class CliOptions:
    """The global options, shared by every command.

    Attributes:
        server: Orchestrator URL (``http://host:port``, ``https://host:port`` or ``host:port``).
        token: Bearer token, or None.
        ca_file: PEM file of the certificate authorities to trust for ``https``, or None.
        timeout: Seconds each request (and the first connection) may take.
        json: Print machine-readable JSON instead of tables.
    """

    server: str = DEFAULT_SERVER
    token: str | None = None
    ca_file: str | None = None
    timeout: float = 10.0
    json: bool = False


# Exit codes by gRPC status name (the SDK keeps it in AzollaError.code).
_EXIT_BY_STATUS = {
    "NOT_FOUND": EXIT_FAILED,
    "FAILED_PRECONDITION": EXIT_FAILED,
    "ALREADY_EXISTS": EXIT_FAILED,
    "ABORTED": EXIT_FAILED,
    "INVALID_ARGUMENT": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "CANCELLED": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
}


def exit_code_for(exc: BaseException) -> int:
    """Return the exit code for an error raised while a command ran.

    Args:
        exc: A :class:`CliError`, an SDK error (:class:`azolla.errors.AzollaError`) or any
            other exception.
    """
    if isinstance(exc, CliError):
        return exc.code
    from azolla.errors import (
        AuthenticationError,
        AzollaConnectionError,
        AzollaError,
        TaskFailedError,
        TaskNotFoundError,
        ValidationError,
        WaitTimeoutError,
    )

    if isinstance(exc, AzollaError):
        code = exc.code
        if code in _EXIT_BY_STATUS:
            return _EXIT_BY_STATUS[code]
        if isinstance(exc, AzollaConnectionError):
            return EXIT_UNAVAILABLE
        if isinstance(exc, AuthenticationError):
            return EXIT_AUTH
        if isinstance(exc, ValidationError):
            return EXIT_USAGE
        if isinstance(exc, WaitTimeoutError):
            return EXIT_TIMEOUT
        if isinstance(exc, TaskNotFoundError | TaskFailedError):
            return EXIT_FAILED
        return EXIT_INTERNAL
    return EXIT_INTERNAL


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else "unknown error"


def fail(message: str, code: int) -> NoReturn:
    """Print ``azolla: error: <message>`` on standard error and exit with ``code``.

    Args:
        message: What went wrong (folded to one line).
        code: The exit code.

    Raises:
        typer.Exit: Always.
    """
    typer.echo(f"azolla: error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``await work()`` on a new event loop; turn errors into a one-line message and exit.

    Args:
        work: The command's coroutine function.

    Returns:
        What the coroutine returned.

    Raises:
        typer.Exit: The coroutine raised (the message is printed first), or Ctrl-C (130).
    """

    async def main() -> T:
        return await work()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        typer.echo("azolla: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        if exit_code_for(exc) == EXIT_INTERNAL and not isinstance(exc, CliError):
            from azolla.errors import AzollaError

            if not isinstance(exc, AzollaError):
                message = f"{type(exc).__name__}: {message}"
        fail(message, exit_code_for(exc))


def parse_json(text: str | None, option: str, *, expect: type | None = None) -> Any:
    """Parse a JSON option value.

    Args:
        text: The option's text; None means the option was not given.
        option: The option's name, for messages (e.g. ``"--args"``).
        expect: ``list`` or ``dict`` to require an array or an object.

    Returns:
        The decoded value (None when ``text`` is None).

    Raises:
        CliError: Not valid JSON, or not of the expected kind (exit code 2).
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{option} is not valid JSON ({exc}): {text[:80]!r}", EXIT_USAGE) from None
    if expect is dict and not isinstance(value, dict):
        raise CliError(f"{option} must be a JSON object such as '{{\"name\": \"Alice\"}}'",
                       EXIT_USAGE)
    if expect is list and not isinstance(value, list):
        raise CliError(f"{option} must be a JSON array such as '[1, 2]'", EXIT_USAGE)
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration_seconds(text: str) -> float | None:
    match = _DURATION.match(text)
    if match is None:
        return None
    unit = (match.group(2) or "s").lower()
    return float(match.group(1)) * _UNIT_SECONDS[unit]


def parse_time(text: str | None, option: str, *, now: dt.datetime | None = None
               ) -> dt.datetime | None:
    """Parse a point in time: ISO 8601 (UTC unless it says otherwise) or an age like ``2h``.

    ``30s``, ``15m``, ``2h``, ``7d``, ``1w`` mean that long before now; ``2024-05-01`` and
    ``2024-05-01T12:00:00+02:00`` are absolute.

    Args:
        text: The option's text; None means not given.
        option: The option's name, for messages.
        now: The current time (for tests); default the clock.

    Returns:
        An aware datetime, or None when ``text`` is None.

    Raises:
        CliError: Neither a duration nor an ISO 8601 time (exit code 2).
    """
    if text is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    age = _duration_seconds(text) if text.strip()[-1:].isalpha() else None
    if age is not None:
        return now - dt.timedelta(seconds=age)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"{option} must be an ISO 8601 time (2024-05-01T12:00:00Z) or an age "
                       f"such as 15m, 2h, 7d; got {text!r}", EXIT_USAGE) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def parse_days(text: str, option: str) -> int:
    """Parse a whole number of days: ``30d``, ``4w`` or ``30`` (days).

    Args:
        text: The option's text.
        option: The option's name, for messages.

    Returns:
        The number of days (>= 0).

    Raises:
        CliError: Malformed, negative or not whole days (exit code 2).
    """
    match = re.match(r"^\s*(\d+)\s*(d|w)?\s*$", text, re.IGNORECASE)
    if match is None:
        raise CliError(f"{option} must be a number of days or weeks such as 30d or 4w; got "
                       f"{text!r}", EXIT_USAGE)
    days = int(match.group(1))
    return days * 7 if (match.group(2) or "d").lower() == "w" else days

