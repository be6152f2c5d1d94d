"""Resource limits and the clean environment of worker processes.

Resource limits
    Applied with ``setrlimit`` inside each worker process before any task code runs (never with
    ``preexec_fn`` in the async parent). ``memory_bytes`` is ``RLIMIT_AS``: the *address space*
    of the whole worker, interpreter and imported modules included (a Python worker with the
    task modules loaded already maps tens of MB), so choose it generously; an
    :class:`~azolla.domain.ports.ExecutionRequest` may bring its own ``memory_limit`` for one
    attempt. ``cpu_seconds`` is ``RLIMIT_CPU`` per attempt (``SIGXCPU`` ends the worker; the
    attempt fails with ``CpuLimitExceeded``). Core dumps are off by default (they could contain
    secrets and are slow to write). ``max_processes`` (``RLIMIT_NPROC``) is per user and does
    not bind root. For hard memory isolation use cgroups v2 around the shepherd.

Clean environment (:func:`scrub_environment`)
    Worker processes never see the shepherd's secrets. A variable is **dropped** when its name

    * is ``DATABASE_URL`` or ends with ``_DATABASE_URL``;
    * starts with ``AZOLLA_`` (the shepherd's own settings and credentials);
    * starts with ``PG`` (libpq connection settings such as ``PGPASSWORD``, ``PGHOST``);
    * contains, in any letter case, ``KEY``, ``TOKEN``, ``SECRET``, ``PASSWORD``, ``PASSWD``,
      ``CREDENTIAL`` or ``AUTH`` (e.g. ``AWS_SECRET_ACCESS_KEY``, ``GITHUB_TOKEN``,
      ``SSH_AUTH_SOCK``).

    Every other variable is passed on. Names listed in ``allow`` are passed on even when the
    rule would drop them (e.g. ``allow=["AZOLLA_TASKS"]``), and ``extra`` variables are added
    last, unfiltered.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ResourceLimits", "is_secret_variable", "scrub_environment", "static_limit_plan"]

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")


def is_secret_variable(name: str) -> bool:
    """Tell whether the clean-environment rule drops the variable ``name``.

    Args:
        name: An environment variable name.

    Returns:
        True when the variable is kept away from worker processes.
    """
    upper = name.upper()
    if upper == "DATABASE_URL" or upper.endswith("_DATABASE_URL"):
        return True
    if upper.startswith(("AZOLLA_", "PG")):
        return True
    return any(marker in upper for marker in _SECRET_MARKERS)


def scrub_environment(
    env: Mapping[str, str],
    *,
    allow: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return a copy of ``env`` without secrets (see the module docstring for the rule).

    Args:
        env: The environment to clean (usually ``os.environ``).
        allow: Names kept even when the rule would drop them.
        extra: Variables added to the result, unfiltered.

    Returns:
        The clean environment.
    """
    allowed = set(allow)
    clean = {k: v for k, v in env.items() if k in allowed or not is_secret_variable(k)}
    if extra:
        clean.update(extra)
    return clean


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Limits applied to every worker process (see the module docstring).

    Attributes:
        memory_bytes: ``RLIMIT_AS`` in bytes, or None for no limit. A request's
            ``memory_limit`` replaces it for that attempt (never above this value when set).
        cpu_seconds: CPU time allowed per attempt (``RLIMIT_CPU``), or None.
        open_files: ``RLIMIT_NOFILE``, or None to inherit.
        file_size_bytes: Largest file a worker may write (``RLIMIT_FSIZE``), or None.
        max_processes: ``RLIMIT_NPROC`` (per user; root is exempt), or None.
        core_dumps: Allow core dumps (``RLIMIT_CORE``); off by default.
    """

    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = 1024
    file_size_bytes: int | None = None
    max_processes: int | None = None
    core_dumps: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the limits as a JSON-serialisable dict (sent to the fork server)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ResourceLimits:
        """Build limits from :meth:`to_dict` output.

        Args:
            raw: The dict.

        Returns:
            The limits.
        """
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def prlimit_args(self, memory_limit: int | None = None) -> list[str]:
        """Return ``prlimit(1)`` options for these limits (used for worker commands).

        Args:
            memory_limit: A per-attempt address-space limit that replaces ``memory_bytes``.

        Returns:
            Options such as ``["--as=1073741824", "--core=0"]``.
        """
        args: list[str] = []
        memory = _effective_memory(self.memory_bytes, memory_limit)
        if memory is not None:
            args.append(f"--as={memory}")
        if self.cpu_seconds is not None:
            args.append(f"--cpu={self.cpu_seconds}")
        if self.open_files is not None:
            args.append(f"--nofile={self.open_files}")
        if self.file_size_bytes is not None:
            args.append(f"--fsize={self.file_size_bytes}")
        if self.max_processes is not None:
            args.append(f"--nproc={self.max_processes}")
        if not self.core_dumps:
            args.append("--core=0")
        return args


def _effective_memory(configured: int | None, requested: int | None) -> int | None:
    if requested is None or requested <= 0:
        return configured
    if configured is None:
        return requested
    return min(configured, requested)


def static_limit_plan(limits: ResourceLimits) -> list[tuple[int, int, int]]:
    """Return the ``setrlimit`` calls for the limits that hold for a worker's whole life.

    Computed once in the fork server (each limit is capped at the hard limit it has, which its
    workers inherit); every worker then makes the calls itself, before any task code runs.

    Args:
        limits: The limits.

    Returns:
        ``(resource, soft, hard)`` triples.
    """
    wanted: list[tuple[int, int]] = []
    if not limits.core_dumps:
        wanted.append((resource.RLIMIT_CORE, 0))
    if limits.open_files is not None:
        wanted.append((resource.RLIMIT_NOFILE, limits.open_files))
    if limits.file_size_bytes is not None:
        wanted.append((resource.RLIMIT_FSIZE, limits.file_size_bytes))
    if limits.max_processes is not None:
        wanted.append((resource.RLIMIT_NPROC, limits.max_processes))
    plan: list[tuple[int, int, int]] = []
    for which, value in wanted:
        soft = hard = value
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        plan.append((which, soft, hard))
    return plan
