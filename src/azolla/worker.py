"""``Worker``: run a shepherd from Python, the programmatic twin of ``azolla-shepherd``.

Example::

    import asyncio
    from azolla import Client, Worker, azolla_task

    @azolla_task
    async def greet_user(name: str, age: int) -> dict:
        return {"greeting": f"Hello {name}! You are {age} years old."}

    async def main() -> None:
        async with Worker(tasks=[greet_user]), Client.connect("http://127.0.0.1:52710") as c:
            handle = await c.submit_task(greet_user, {"name": "Alice", "age": 25}).submit()
            print(await handle.wait())

    if __name__ == "__main__":
        asyncio.run(main())

Task code never runs in the process that creates the ``Worker``: every attempt runs in a child
worker process, which imports the modules that define the tasks. A task defined in the script
itself is found by importing the script as a module, so the script's top level must not start
anything (keep ``asyncio.run(...)`` under ``if __name__ == "__main__":``); ``Worker`` refuses a
script whose top level would run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from azolla.domain.ports import AttemptExecutor
from azolla.shepherd.assembly import (
    TaskSource,
    TaskSources,
    build_executor,
    build_runtime,
    resolve_task_sources,
)
from azolla.shepherd.connection import DEFAULT_ORCHESTRATOR_URL
from azolla.shepherd.runtime import RuntimeState, ShepherdRuntime
from azolla.shepherd.settings import ShepherdSettings, load_settings

__all__ = ["Worker", "WorkerStartError"]

log = logging.getLogger("azolla.shepherd")


class WorkerStartError(RuntimeError):
    """The worker processes could not start (e.g. a task module cannot be imported)."""


class Worker:
    """A shepherd in this process: connects to an orchestrator and runs its tasks.

    Args:
        orchestrator: Orchestrator URL (``http://host:port`` or ``https://host:port``).
        tasks: What to run: ``@azolla_task`` functions, module names (``"myapp.tasks"``),
            paths of ``.py`` files, or modules. Worker processes import the modules that
            define them and register every ``@azolla_task`` they contain.
        domain: The domain whose tasks to run.
        group: The shepherd group whose tasks to run.
        concurrency: Attempts run at once (default: the number of CPUs).
        mode: ``"process"`` (a fresh process per attempt, the default) or ``"pool"`` (reused
            worker processes, for throughput).
        worker_command: Run attempts with this executable instead (the upstream worker
            command-line contract); ``tasks``, if given, reach it in ``AZOLLA_TASKS``.
        token: Bearer token for an orchestrator that requires one.
        ca_file: Certificate authorities (PEM) for ``https``.
        drain_timeout: Seconds running attempts may take to finish on :meth:`stop`.
        **options: Further settings of :class:`~azolla.shepherd.settings.ShepherdSettings`
            (``task_timeout``, ``memory_limit``, ``cpu_limit``, ``allow_env``, ...).

    Raises:
        azolla.shepherd.settings.SettingsError: A setting is invalid.
        ValueError: A task source cannot be used, or neither tasks nor a worker command are
            given.

    Unlike ``azolla-shepherd``, a ``Worker`` reads no ``AZOLLA_*`` environment variables and
    no config file: it does what its arguments say.
    """

    def __init__(
        self,
        orchestrator: str = DEFAULT_ORCHESTRATOR_URL,
        *,
        tasks: Iterable[TaskSource] = (),
        domain: str = "default",
        group: str = "default",
        concurrency: int | None = None,
        mode: str = "process",
        worker_command: str | None = None,
        token: str | None = None,
        ca_file: str | Path | None = None,
        drain_timeout: float | None = None,
        **options: Any,
    ) -> None:
        task_list = list(tasks)
        values: dict[str, Any] = {
            "orchestrator": orchestrator, "domain": domain, "group": group,
            "concurrency": concurrency, "mode": mode, "worker_command": worker_command,
            "token": token, "ca_file": ca_file, "drain_timeout": drain_timeout, **options,
        }
        settings = load_settings(values, use_environment=False)
        sources = resolve_task_sources(task_list)
        self._init(settings, sources)

    @classmethod
    def from_settings(cls, settings: ShepherdSettings,
                      sources: TaskSources | None = None) -> Worker:
        """Build a worker from loaded settings (what ``azolla-shepherd`` does).

        Args:
            settings: The settings.
            sources: Resolved task modules (default: resolved from ``settings.tasks``).

        Returns:
            The worker (not started).
        """
        worker = cls.__new__(cls)
        worker._init(settings, sources if sources is not None else
                     resolve_task_sources(settings.tasks))
        return worker

    def _init(self, settings: ShepherdSettings, sources: TaskSources) -> None:
        if not sources.modules and settings.worker_command is None:
            raise ValueError("a Worker needs tasks (functions, module names or .py files) or a "
                             "worker_command")
        self.settings = settings
        self.sources = sources
        self._executor: AttemptExecutor | None = None
        self._runtime: ShepherdRuntime | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def shepherd_id(self) -> str | None:
        """The id announced to the orchestrator (fresh for every :meth:`start`), or None."""
        return self._runtime.shepherd_id if self._runtime is not None else None

    @property
    def connected(self) -> bool:
        """True while the orchestrator has accepted this worker's connection."""
        return self._runtime is not None and self._runtime.connected.is_set()

    @property
    def running(self) -> int:
        """Attempts executing now."""
        return self._runtime.running if self._runtime is not None else 0

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks the worker processes loaded (empty before :meth:`start`)."""
        names = getattr(self._executor, "task_names", None)
        return sorted(names) if names else []

    @property
    def runtime(self) -> ShepherdRuntime | None:
        """The underlying runtime while started (for statistics and tests)."""
        return self._runtime

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker processes and connect to the orchestrator (in the background).

        Returns once the task modules are loaded; connecting (and reconnecting, forever) goes
        on in the background. Use :meth:`wait_connected` to wait for the connection.

        Raises:
            WorkerStartError: The worker processes could not start (e.g. a task module
                cannot be imported).
            RuntimeError: The worker is already started.
        """
        if self._runtime is not None:
            raise RuntimeError("this Worker is already started")
        executor = build_executor(self.settings, self.sources)
        starter = getattr(executor, "start", None)
        if starter is not None:
            try:
                await starter()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await executor.close()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise WorkerStartError(f"cannot start the worker processes: {first}") from exc
        self._executor = executor
        self._runtime = build_runtime(self.settings, executor)
        names = self.task_names
        if names:
            log.info("tasks: %s", ", ".join(names))
        await self._runtime.start()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the orchestrator has accepted the connection.

        Raises:
            TimeoutError: Not connected within ``timeout`` seconds.
            RuntimeError: The worker is not started.
        """
        if self._runtime is None:
            raise RuntimeError("start the Worker first")
        await self._runtime.wait_connected(timeout)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Drain and stop: take no new work, let running attempts finish, report, disconnect.

        Args:
            drain_timeout: Seconds running attempts may still take (default: the
                ``drain_timeout`` setting, 30 s). Attempts still running then are stopped and
                retried elsewhere by the orchestrator.
        """
        runtime = self._runtime
        if runtime is None:
            return
        try:
            await runtime.stop(drain_timeout)
        finally:
            if runtime.state is RuntimeState.STOPPED:
                self._runtime = None
                self._executor = None

    async def serve(self, *, install_signals: bool = True, started: bool = False) -> None:
        """Start, run until SIGTERM/SIGINT (which drain), then stop.

        A second signal stops at once. Cancelling the call drains too.

        Args:
            install_signals: Handle SIGTERM and SIGINT (only possible in the main thread).
            started: The worker was already started with :meth:`start`.
        """
        if not started:
            await self.start()
        runtime = self._runtime
        assert runtime is not None
        loop = asyncio.get_running_loop()
        stoppers: set[asyncio.Task[None]] = set()
        received = 0

        def on_signal(signum: int) -> None:
            nonlocal received
            received += 1
            name = signal.Signals(signum).name
            if received == 1:
                log.info("%s: draining (up to %.0f s); send it again to stop at once", name,
                         self.settings.drain_timeout)
                stoppers.add(loop.create_task(runtime.stop()))
            else:
                log.warning("%s again: stopping now", name)
                stoppers.add(loop.create_task(runtime.stop(drain_timeout=0)))

        installed: list[int] = []
        if install_signals:
            for signum in (int(signal.SIGTERM), int(signal.SIGINT)):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signum, on_signal, signum)
                    installed.append(signum)
        try:
            await runtime.wait_stopped()
        except asyncio.CancelledError:
            await asyncio.shield(self.stop())
            raise
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
        await self.stop()

    def run(self) -> None:
        """Serve until SIGTERM/Ctrl-C, blocking (for scripts): ``Worker(...).run()``."""
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self.serve())

    async def __aenter__(self) -> Worker:
        """Start the worker (see :meth:`start`)."""
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Drain and stop (see :meth:`stop`)."""
        await self.stop()

    def __repr__(self) -> str:
        state = self._runtime.state.value if self._runtime is not None else "stopped"
        return (f"Worker(orchestrator={self.settings.orchestrator!r}, "
                f"domain={self.settings.domain!r}, group={self.settings.group!r}, "
                f"concurrency={self.settings.concurrency}, mode={self.settings.mode.value!r}, "
                f"{state})")
