"""``azolla-shepherd``: run a shepherd that executes tasks for an orchestrator.

Usage::

    azolla-shepherd --tasks MODULE [--tasks MODULE ...] [--orchestrator URL]
                    [--domain D] [--group G] [--concurrency N] [--mode process|pool]
                    [--worker-command CMD] [--config FILE] [...]

Settings come from the flags, then the environment (``AZOLLA_ORCHESTRATOR``, ``AZOLLA_TASKS``,
``AZOLLA_CONCURRENCY``, ...), then the TOML file (``--config`` or ``AZOLLA_CONFIG``); see
``docs/shepherd.md``. A shepherd needs something to run: task modules (``--tasks`` or
``AZOLLA_TASKS``) or a worker command; without either it refuses to start rather than fail
every task it would be given.

SIGTERM or Ctrl-C drains: no new work is taken, running attempts get ``--drain-timeout``
seconds to finish, their outcomes are reported, then the shepherd exits. A second signal
stops at once (attempts still running are retried elsewhere by the orchestrator).

Exit codes: 0 after a clean shutdown, 1 when the shepherd failed while running, 2 for invalid
flags or settings (including task modules that cannot be imported). Errors are one line on
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from azolla.app.logging import configure_logging
from azolla.shepherd.assembly import TaskSources, resolve_task_sources, shepherd_version
from azolla.shepherd.settings import (
    ExecutionMode,
    SettingsError,
    ShepherdSettings,
    load_settings,
)
from azolla.worker import Worker, WorkerStartError

__all__ = ["build_parser", "main", "serve"]

PROG = "azolla-shepherd"

log = logging.getLogger("azolla.shepherd")


class UsageError(Exception):
    """A problem with what the user asked for (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Report a bad flag in one line (argparse's default prints the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Return the command-line parser of ``azolla-shepherd``."""
    parser = _Parser(
        prog=prog,
        description="Run an Azolla shepherd: connect to an orchestrator and run the task "
                    "attempts it pushes, each in a child worker process.",
        epilog="Flags win over environment variables (AZOLLA_ORCHESTRATOR, AZOLLA_TASKS, "
               "AZOLLA_CONCURRENCY, ...), which win over the config file. "
               "Docs: docs/shepherd.md.",
    )
    add = parser.add_argument
    add("--orchestrator", metavar="URL",
        help="orchestrator URL, http://host:port or https://host:port "
             "(default http://127.0.0.1:52710)")
    add("--tasks", metavar="MODULE", action="append",
        help="module (or .py file) whose @azolla_task functions this shepherd runs; "
             "repeat for several")
    add("--domain", help="domain whose tasks to run (default 'default')")
    add("--group", help="shepherd group whose tasks to run (default 'default')")
    add("--concurrency", type=int, metavar="N",
        help="attempts run at once (default: the number of CPUs)")
    add("--mode", choices=[m.value for m in ExecutionMode],
        help="process: a fresh process per attempt (default); pool: reused worker processes")
    add("--worker-command", metavar="CMD",
        help="run each attempt with this executable (upstream worker command-line contract); "
             "--tasks, if given, reach it in AZOLLA_TASKS (e.g. for azolla-worker)")
    add("--worker-stdin", action=argparse.BooleanOptionalAction, default=None,
        help="send the task to the worker command on stdin, not in argv (default: only for "
             "azolla-worker)")
    add("--config", metavar="FILE", help="TOML file with settings (default $AZOLLA_CONFIG)")
    add("--drain-timeout", type=float, metavar="S",
        help="on SIGTERM/Ctrl-C, seconds running attempts may take to finish (default 30)")
    add("--task-timeout", type=float, metavar="S",
        help="per-attempt timeout for tasks submitted without one (default: none)")
    add("--memory-limit", metavar="SIZE",
        help="address-space limit per worker process, e.g. 512M or 2G (default: none)")
    add("--cpu-limit", type=int, metavar="S", help="CPU seconds per attempt (default: none)")
    add("--prefetch", type=int, metavar="N",
        help="pool mode: attempts queued in a busy worker's pipe (default 0; 1 pays for many "
             "short tasks, see docs/shepherd.md)")
    add("--ca-file", metavar="FILE", help="PEM certificate authorities for https")
    add("--cert-file", metavar="FILE",
        help="PEM client certificate, for an orchestrator that requires mutual TLS")
    add("--key-file", metavar="FILE", help="PEM private key of --cert-file")
    add("--token-file", metavar="FILE",
        help="file holding the bearer token (or set AZOLLA_TOKEN)")
    add("--log-format", choices=("auto", "console", "json"),
        help="log format (default auto: console on a terminal, else JSON)")
    add("--log-level", choices=("debug", "info", "warning", "error"),
        help="lowest level logged (default info)")
    add("--version", action="version", version=shepherd_version())
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("orchestrator", "tasks", "domain", "group", "concurrency", "mode",
             "worker_command", "worker_stdin", "drain_timeout", "task_timeout", "memory_limit",
             "cpu_limit", "prefetch", "ca_file", "cert_file", "key_file", "token_file",
             "log_format", "log_level")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def configure(argv: Sequence[str] | None = None) -> tuple[ShepherdSettings, TaskSources]:
    """Parse flags and settings and resolve the task modules.

    Raises:
        SettingsError: A setting is invalid.
        UsageError: Nothing to run, or a task source cannot be used.
    """
    args = build_parser().parse_args(argv)
    settings = load_settings(_overrides(args), args.config)
    if not settings.tasks and settings.worker_command is None:
        raise UsageError("no tasks to run: give --tasks MODULE (or set AZOLLA_TASKS), e.g. "
                         f"`{PROG} --tasks myapp.tasks`, or --worker-command CMD")
    try:
        sources = resolve_task_sources(settings.tasks)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return settings, sources


async def serve(settings: ShepherdSettings, sources: TaskSources, *,
                install_signals: bool = True) -> int:
    """Run a shepherd until SIGTERM/SIGINT (or cancellation); return the exit code.

    Raises:
        UsageError: The task modules cannot be loaded.
    """
    worker = Worker.from_settings(settings, sources)
    try:
        await worker.start()
    except WorkerStartError as exc:
        raise UsageError(str(exc)) from None
    runtime = worker.runtime
    assert runtime is not None
    log.info("shepherd %s: %s mode, concurrency %d, domain %s, group %s, orchestrator %s",
             runtime.shepherd_id, "command" if settings.worker_command else settings.mode.value,
             settings.concurrency, settings.domain, settings.group, settings.orchestrator)
    await worker.serve(install_signals=install_signals, started=True)
    log.info("shepherd %s stopped", runtime.shepherd_id)
    return 0


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on a new event loop: uvloop when installed (task code never runs on it).

    The shepherd's loop does per-attempt work (a request frame out, a result frame in, a task
    per attempt, the stream writes); uvloop takes about a third off its CPU per attempt.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``azolla-shepherd``; returns (and exits with) the exit code."""
    try:
        settings, sources = configure(argv)
    except (SettingsError, UsageError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(settings.log_format, settings.log_level.lower())
    try:
        code = _run(serve(settings, sources))
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a signal before the handlers were installed
        code = 130
    except Exception as exc:
        log.exception("the shepherd failed")
        sys.stderr.write(f"{PROG}: error: {type(exc).__name__}: {exc}\n")
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover - ``python -m azolla.app.shepherd_main``
    main()
