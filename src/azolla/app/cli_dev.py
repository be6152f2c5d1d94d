"""``azolla dev``: an orchestrator and one shepherd for local development, in one command.

It starts ``azolla-server`` (embedded PostgreSQL by default: no ``DATABASE_URL`` is passed on)
and, once the server answers health checks, ``azolla-shepherd`` for the given task modules.
Both are child processes in their own process groups with their output on this terminal.
Ctrl-C (or SIGTERM) stops the shepherd first (it drains), then the server; if either child
exits on its own, the other is stopped too and ``azolla dev`` exits with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azolla.app.cli_support import EXIT_FAILED, EXIT_OK, CliError

__all__ = ["DevOptions", "child_command", "dev"]

#: Seconds the server may take to answer health checks (the first start runs ``initdb``).
SERVER_START_TIMEOUT = 120.0
#: Seconds a child gets after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class DevOptions:
    """What ``azolla dev`` runs.

    Attributes:
        tasks: Task modules (or ``.py`` files) for the shepherd.
        port: The server's port.
        store: ``postgres`` (embedded unless ``database_url``) or ``memory``.
        data_dir: Data folder of the embedded PostgreSQL, or None for the default.
        database_url: Use this PostgreSQL instead of the embedded one, or None.
        concurrency: Attempts the shepherd runs at once, or None for its default.
    """

    tasks: tuple[str, ...]
    port: int = 52710
    store: str = "postgres"
    data_dir: str | None = None
    database_url: str | None = None
    concurrency: int | None = None


def child_command(script: str, module: str) -> list[str]:
    """Return the command line of a console script installed next to this Python.

    Falls back to ``python -m module`` when the script is not installed (a source checkout).

    Args:
        script: The console script's name, e.g. ``azolla-server``.
        module: The module that runs it with ``-m``.
    """
    path = Path(sys.executable).parent / script
    if path.exists():
        return [str(path)]
    return [sys.executable, "-m", module]


def _server_args(options: DevOptions) -> tuple[list[str], dict[str, str]]:
    args = [*child_command("azolla-server", "azolla.app.server_main"),
            "--host", "127.0.0.1", "--port", str(options.port), "--store", options.store]
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("DATABASE_URL", "AZOLLA_DATABASE_URL")}
    if options.data_dir:
        args += ["--data-dir", options.data_dir]
    if options.database_url:
        args += ["--database-url", options.database_url]
    return args, env


def _shepherd_args(options: DevOptions) -> list[str]:
    args = [*child_command("azolla-shepherd", "azolla.app.shepherd_main"),
            "--orchestrator", f"http://127.0.0.1:{options.port}"]
    for module in options.tasks:
        args += ["--tasks", module]
    if options.concurrency is not None:
        args += ["--concurrency", str(options.concurrency)]
    return args


async def _wait_serving(port: int, timeout: float) -> None:
    import grpc
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0,
                                          wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise CliError(f"the server did not become ready within {timeout:g} s",
                               EXIT_FAILED)
            await asyncio.sleep(0.2)  # bounded retry while the server starts


async def _stop(process: asyncio.subprocess.Process, name: str) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            await process.wait()
    except TimeoutError:
        print(f"azolla dev: {name} did not stop within {STOP_TIMEOUT:g} s; killing it",
              file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


async def dev(options: DevOptions) -> int:
    """Run the server and a shepherd until Ctrl-C/SIGTERM or until one of them exits.

    Returns:
        0 after Ctrl-C/SIGTERM, 1 when a child exited on its own or the server did not start.
    """
    if not options.tasks:
        raise CliError("give at least one task module with --tasks", 2)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    server_args, server_env = _server_args(options)
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    waiters: list[asyncio.Future[object]] = []
    try:
        server = await asyncio.create_subprocess_exec(*server_args, env=server_env,
                                                      start_new_session=True)
        children.append(("azolla-server", server))
        stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        server_exit: asyncio.Future[object] = asyncio.ensure_future(server.wait())
        waiters += [stopped, server_exit]
        ready = asyncio.ensure_future(_wait_serving(options.port, SERVER_START_TIMEOUT))
        try:
            await _first(stopped, server_exit, ready)
        finally:
            ready.cancel()
        if stop.is_set():
            return EXIT_OK
        if server_exit.done():
            raise CliError(f"azolla-server exited with code {server.returncode} before it was "
                           "ready (see its messages above)", EXIT_FAILED)
        ready.result()
        print(f"azolla dev: server ready on http://127.0.0.1:{options.port}; starting the "
              f"shepherd for {', '.join(options.tasks)} (Ctrl-C stops both)", file=sys.stderr,
              flush=True)
        shepherd = await asyncio.create_subprocess_exec(*_shepherd_args(options),
                                                        start_new_session=True)
        children.append(("azolla-shepherd", shepherd))
        shepherd_exit: asyncio.Future[object] = asyncio.ensure_future(shepherd.wait())
        waiters.append(shepherd_exit)
        await _first(stopped, server_exit, shepherd_exit)
        for name, process, done in (("azolla-server", server, server_exit),
                                    ("azolla-shepherd", shepherd, shepherd_exit)):
            if done.done() and not stop.is_set():
                raise CliError(f"{name} exited with code {process.returncode}; stopping",
                               EXIT_FAILED)
        return EXIT_OK
    finally:
        for waiter in waiters:
            waiter.cancel()
        for name, process in reversed(children):  # the shepherd drains first, then the server
            await _stop(process, name)
        for signum in installed:
            loop.remove_signal_handler(signum)

