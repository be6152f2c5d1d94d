"""Build a shepherd from settings: task modules, the executor, the connector, the runtime.

Task code is never imported into the shepherd process itself: the executors' fork server
imports the task modules (and fails fast, at start, when one cannot be imported). This module
only turns what the user named — module names, ``.py`` files, ``@azolla_task`` functions —
into module names and import-path entries for that fork server.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from azolla.domain.ports import AttemptExecutor
from azolla.shepherd.connection import ConnectionOptions, GrpcConnector
from azolla.shepherd.runtime import RuntimeConfig, ShepherdRuntime
from azolla.shepherd.settings import ExecutionMode, ShepherdSettings

__all__ = [
    "TaskSource",
    "TaskSources",
    "build_executor",
    "build_runtime",
    "connection_options",
    "resolve_task_sources",
    "shepherd_version",
]

#: What may name tasks: a module name, a ``.py`` file, a module, or a task function.
TaskSource = str | os.PathLike[str] | ModuleType | Any


@dataclass(frozen=True, slots=True)
class TaskSources:
    """Where the worker processes find the tasks.

    Attributes:
        modules: Module names to import.
        sys_path: Import path for the fork server (this process's path plus what the sources
            need, e.g. the folder of a ``.py`` file).
    """

    modules: tuple[str, ...] = ()
    sys_path: tuple[str, ...] = field(default_factory=tuple)


def shepherd_version() -> str:
    """Return ``azolla-shepherd/<package version>`` (announced in the Hello)."""
    try:
        version = importlib.metadata.version("azolla")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"azolla-shepherd/{version} python/{sys.version_info.major}.{sys.version_info.minor}"


def resolve_task_sources(sources: Iterable[TaskSource], *,
                         base_path: Sequence[str] | None = None) -> TaskSources:
    """Turn task sources into module names and import-path entries.

    Args:
        sources: Module names (``"myapp.tasks"``), paths of ``.py`` files, imported modules,
            or ``@azolla_task`` functions (their defining module is used).
        base_path: Import path to start from (default: ``sys.path`` with the current
            directory first, as ``python -m`` would have it).

    Returns:
        The modules and the import path.

    Raises:
        ValueError: A source cannot be turned into an importable module (e.g. a task defined
            in an interactive session, or in a script whose top level would run again when
            imported).
    """
    path = list(base_path) if base_path is not None else _default_path()
    modules: dict[str, None] = {}
    for source in sources:
        for module in _modules_of(source, path):
            modules[module] = None
    return TaskSources(tuple(modules), tuple(dict.fromkeys(path)))


def _default_path() -> list[str]:
    cwd = os.getcwd()
    return [cwd, *(p for p in sys.path if p and p != cwd)]


def _modules_of(source: TaskSource, path: list[str]) -> list[str]:
    if isinstance(source, ModuleType):
        return [_module_name(source.__name__, source, path)]
    if isinstance(source, os.PathLike) or (
            isinstance(source, str) and (source.endswith(".py") or os.sep in source)):
        return [_module_from_file(Path(source), path)]
    if isinstance(source, str):
        name = source.strip()
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"not a module name or .py file: {source!r}")
        return [name]
    module = getattr(source, "module", None) or getattr(source, "__module__", None)
    if not isinstance(module, str):
        raise ValueError(f"cannot tell which module defines {source!r}; pass a module name")
    return [_module_name(module, sys.modules.get(module), path)]


def _module_name(name: str, module: ModuleType | None, path: list[str]) -> str:
    if name != "__main__":
        return name
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)  # run with ``python -m pkg.mod``
    file = getattr(module, "__file__", None)
    if not file:
        raise ValueError("tasks defined in an interactive session cannot run in worker "
                         "processes; define them in a module and pass its name")
    return _module_from_file(Path(file), path)


def _module_from_file(file: Path, path: list[str]) -> str:
    file = file.resolve()
    if file.suffix != ".py" or not file.is_file():
        raise ValueError(f"no such Python file: {file}")
    if not file.stem.isidentifier():
        raise ValueError(f"{file.name} cannot be imported as a module (rename it)")
    _check_import_safe(file)
    folder = str(file.parent)
    if folder not in path:
        path.insert(0, folder)
    return file.stem


def _check_import_safe(file: Path) -> None:
    """Refuse a script whose top level calls something: workers would run it again."""
    try:
        tree = ast.parse(file.read_text(), str(file))
    except (OSError, SyntaxError, ValueError):
        return  # the fork server reports the import error itself
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
            call = ast.get_source_segment(file.read_text(), node) or "a call"
            raise ValueError(
                f"{file.name}:{node.lineno}: worker processes import this file to load its "
                f"tasks, and its top level runs `{call.strip()}` again; move that under "
                "`if __name__ == \"__main__\":` (or define the tasks in their own module)")


def connection_options(settings: ShepherdSettings) -> ConnectionOptions:
    """Return how to reach the orchestrator named in ``settings``."""
    return ConnectionOptions(
        url=settings.orchestrator, root_certificates=settings.root_certificates(),
        token=settings.bearer_token(),
        certificate_chain=settings.cert_file.read_bytes() if settings.cert_file else None,
        private_key=settings.key_file.read_bytes() if settings.key_file else None)


def build_executor(settings: ShepherdSettings, sources: TaskSources) -> AttemptExecutor:
    """Build the executor the settings ask for (not started yet).

    Args:
        settings: The shepherd settings.
        sources: The task modules and import path.

    Returns:
        A :class:`~azolla.adapters.subprocess.ProcessExecutor`,
        :class:`~azolla.adapters.subprocess.PoolExecutor` or
        :class:`~azolla.adapters.subprocess.CommandExecutor`.
    """
    from azolla.adapters import subprocess as execution

    limits = execution.ResourceLimits(memory_bytes=settings.memory_limit,
                                      cpu_seconds=settings.cpu_limit,
                                      open_files=settings.open_files)
    common: dict[str, Any] = {
        "limits": limits,
        "default_timeout": settings.task_timeout,
        "kill_grace": settings.kill_grace,
    }
    modules = list(sources.modules)
    argv = settings.worker_argv
    if argv is not None:
        extra_env = {"AZOLLA_TASKS": ",".join(modules)} if modules else None
        return execution.CommandExecutor(
            argv, task_via_stdin=settings.task_via_stdin, extra_env=extra_env,
            allow_env=("AZOLLA_TASKS", *settings.allow_env), **common)
    common["allow_env"] = settings.allow_env
    if settings.mode is ExecutionMode.POOL:
        return execution.PoolExecutor(modules, size=settings.concurrency,
                                      max_attempts_per_worker=settings.max_attempts_per_worker,
                                      prefetch=settings.prefetch,
                                      sys_path=list(sources.sys_path), **common)
    return execution.ProcessExecutor(modules, sys_path=list(sources.sys_path), **common)


def runtime_config(settings: ShepherdSettings) -> RuntimeConfig:
    """Return the runtime tunables for ``settings``."""
    concurrency = settings.concurrency
    if settings.mode is ExecutionMode.POOL and settings.worker_argv is None:
        # Slots for the attempts queued in busy workers' pipes (see PoolExecutor's prefetch).
        concurrency *= 1 + settings.prefetch
    return RuntimeConfig(
        domain=settings.domain, group=settings.group, concurrency=concurrency,
        version=shepherd_version(), ack_delay=settings.ack_delay,
        drain_timeout=settings.drain_timeout, reconnect_max_delay=settings.reconnect_max_delay,
        max_buffered_results=settings.max_buffered_results,
        kill_grace=max(settings.kill_grace * 2 + 1.0, 5.0))


def build_runtime(settings: ShepherdSettings, executor: AttemptExecutor, *,
                  shepherd_id: str | None = None) -> ShepherdRuntime:
    """Build a runtime (not started) that serves ``settings.orchestrator`` with ``executor``."""
    return ShepherdRuntime(executor, GrpcConnector(connection_options(settings)),
                           runtime_config(settings), shepherd_id=shepherd_id)
