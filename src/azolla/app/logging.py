"""Structured logs for ``azolla-server`` (structlog over the standard ``logging`` module).

Azolla's modules log with the standard library (``logging.getLogger("azolla....")``); the
server's own messages use structlog with key-value context. :func:`configure_logging` routes
both through one handler on stderr, rendered either for people (``console``) or for machines
(``json``: one object per line with ``timestamp``, ``level``, ``logger`` and ``event``).
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Literal

import structlog

__all__ = ["configure_logging"]

LogFormat = Literal["auto", "console", "json"]

_QUIET = ("asyncio", "grpc._cython", "asyncpg")


def configure_logging(fmt: LogFormat = "auto", level: str = "info",
                      stream: IO[str] | None = None) -> None:
    """Install the log handler on the root logger and configure structlog.

    Args:
        fmt: ``console``, ``json``, or ``auto`` (console when ``stream`` is a terminal).
        level: Lowest level logged (``debug``, ``info``, ``warning``, ``error``).
        stream: Where to write; default ``sys.stderr``.
    """
    out = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    final: list[structlog.typing.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if use_json:
        final.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    final.append(renderer)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()], processors=final)
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_azolla", False):
            root.removeHandler(old)
    handler._azolla = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
