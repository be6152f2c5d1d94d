"""Code that runs inside a worker process, right after the fork server forked it.

File descriptors in a worker: 0 = ``/dev/null``, 1 and 2 = the output pipe (captured by the
shepherd), 3 = request frames in, 4 = result frames out. 3 and 4 are close-on-exec, so programs
the task starts never inherit them.

The worker serves request frames one at a time until its request pipe closes, or
``max_attempts`` have run, or it must retire (after a ``MemoryError``, or when descendants it
started cannot be cleaned up). It is a child subreaper: after each attempt every process the task
left behind (even ones that called ``setsid``) is killed, so nothing outlives its attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import fcntl
import functools
import io
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from azolla.adapters.subprocess._frames import (
    KIND_ERROR,
    KIND_ERROR_RETIRE,
    KIND_OK,
    pack,
    read_frame,
    write_all,
)
from azolla.adapters.subprocess.limits import (
    ResourceLimits,
    _effective_memory,
    apply_static_limits,
)
from azolla.tasks import TaskContext, TaskOutcome, TaskRegistry, execute_sync

__all__ = ["preload", "worker_entry"]

REQUEST_FD = 3
RESULT_FD = 4
_PR_SET_CHILD_SUBREAPER = 36
#: Freed when the task hits MemoryError, so that reporting the failure has memory to work with.
_CUSHION_BYTES = 1 << 20
#: Exit code of a worker that failed before or between attempts (not a task's own exit).
EXIT_INTERNAL_ERROR = 70
#: Exit code of a worker whose task left processes behind that could not be killed.
EXIT_DESCENDANTS_LEFT = 71


def worker_entry(
    fds: Sequence[int],
    registry: TaskRegistry,
    limits: ResourceLimits,
    max_attempts: int | None,
    max_result_bytes: int,
    max_request_bytes: int,
) -> NoReturn:
    """Set the freshly forked process up as a worker and serve attempts; never returns.

    Args:
        fds: ``[request_read, result_write, output_write]`` received from the shepherd.
        registry: The tasks.
        limits: Resource limits.
        max_attempts: Attempts to serve before exiting (1 in ``process`` mode), or None.
        max_result_bytes: Largest result frame the worker sends.
        max_request_bytes: Largest request frame accepted.
    """
    code = EXIT_INTERNAL_ERROR
    try:
        os.setsid()
        _setup_fds(fds)
        _reset_signals()
        apply_static_limits(limits)
        with contextlib.suppress(OSError):
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        faulthandler.enable()
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        code = _Worker(registry, limits, max_attempts, max_result_bytes, max_request_bytes).run()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _setup_fds(fds: Sequence[int]) -> None:
    # Move the received descriptors out of the way first, then into place.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd in fds:
        os.close(fd)
    request_r, result_w, output_w = high
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_w, 1)
    os.dup2(output_w, 2)
    os.dup2(request_r, REQUEST_FD, inheritable=False)
    os.dup2(result_w, RESULT_FD, inheritable=False)
    _close_other_fds(RESULT_FD + 1)


def _close_other_fds(lowest: int) -> None:
    # Listing /proc/self/fd is far cheaper than close() on every possible number.
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(lowest, 65536)
        return
    for fd in fds:
        if fd >= lowest:
            with contextlib.suppress(OSError):
                os.close(fd)


def _reset_signals() -> None:
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def preload() -> None:
    """Do, once in the fork server, the work every forked worker would otherwise repeat."""
    _libc()


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class _Worker:
    """Serves request frames one at a time."""

    def __init__(
        self,
        registry: TaskRegistry,
        limits: ResourceLimits,
        max_attempts: int | None,
        max_result_bytes: int,
        max_request_bytes: int,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.max_attempts = max_attempts
        self.max_result_bytes = max_result_bytes
        self.max_request_bytes = max_request_bytes
        self.loop: asyncio.AbstractEventLoop | None = None
        self.own_pgid = os.getpgrp()
        self.base_as = resource.getrlimit(resource.RLIMIT_AS)
        self.base_cpu = resource.getrlimit(resource.RLIMIT_CPU)
        self.current_memory: int | None = None

    def run(self) -> int:
        reader = open(REQUEST_FD, "rb", buffering=1 << 16, closefd=False)  # noqa: SIM115
        served = 0
        while self.max_attempts is None or served < self.max_attempts:
            payload = read_frame(reader, self.max_request_bytes)
            if payload is None:
                return 0
            frame, retire = self._serve(payload)
            _flush_stdio()
            write_all(RESULT_FD, pack(frame))
            served += 1
            if not self._clean_up_descendants():
                return EXIT_DESCENDANTS_LEFT
            if retire:
                return 0
        return 0

    def _serve(self, payload: bytes) -> tuple[bytes, bool]:
        task_id, attempt, name, args, kwargs, domain, memory_limit = orjson.loads(payload)
        context = TaskContext(task_id=task_id, attempt=attempt, name=name, domain=domain)
        memory = _effective_memory(self.limits.memory_bytes, memory_limit)
        self._set_attempt_limits(memory)
        cushion = bytearray(_CUSHION_BYTES) if memory is not None else None
        try:
            loop = self._loop_for(name)
            outcome = execute_sync(self.registry, name, args, kwargs, context, loop=loop)
        finally:
            del cushion
        self._cancel_leftover_tasks()
        self._restore_limits()
        return self._encode(outcome, memory)

    def _loop_for(self, name: str) -> asyncio.AbstractEventLoop | None:
        if self.loop is None and name in self.registry and self.registry.get(name).is_async:
            self.loop = asyncio.new_event_loop()
        return self.loop

    def _cancel_leftover_tasks(self) -> None:
        loop = self.loop
        if loop is None:
            return
        pending = asyncio.all_tasks(loop)
        if not pending:
            return
        for task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))

    def _encode(self, outcome: TaskOutcome, memory: int | None) -> tuple[bytes, bool]:
        if outcome.ok:
            value = outcome.value_json.encode()
            if len(value) + 1 <= self.max_result_bytes:
                return bytes((KIND_OK,)) + value, False
            return self._error_frame(
                "ResultTooLarge",
                f"task result of {len(value)} bytes exceeds the limit of "
                f"{self.max_result_bytes} bytes",
                {"size": len(value), "limit": self.max_result_bytes},
                retriable=False,
            ), False
        error = outcome.error
        assert error is not None
        if error.type == "MemoryError":
            message = "the task ran out of memory (MemoryError)"
            if memory is not None:
                message = f"memory limit of {memory} bytes exceeded (MemoryError)"
            frame = self._error_frame(
                "MemoryLimitExceeded", message, {"memory_limit": memory}, retriable=True
            )
            return bytes((KIND_ERROR_RETIRE,)) + frame[1:], True
        data = orjson.dumps(error.data)
        if len(data) > self.max_result_bytes // 2:
            data = orjson.dumps({"truncated": True})
        return (
            bytes((KIND_ERROR,))
            + orjson.dumps([error.type, error.message[:65536], data.decode(), error.retriable]),
            False,
        )

    @staticmethod
    def _error_frame(
        error_type: str, message: str, data: dict[str, Any], *, retriable: bool
    ) -> bytes:
        return bytes((KIND_ERROR,)) + orjson.dumps(
            [error_type, message, orjson.dumps(data).decode(), retriable]
        )

    def _set_attempt_limits(self, memory: int | None) -> None:
        if memory != self.current_memory:
            soft, hard = memory if memory is not None else self.base_as[0], self.base_as[1]
            if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            self.current_memory = memory
        if self.limits.cpu_seconds is not None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            used = int(usage.ru_utime + usage.ru_stime) + 1
            resource.setrlimit(
                resource.RLIMIT_CPU, (used + self.limits.cpu_seconds, self.base_cpu[1])
            )

    def _restore_limits(self) -> None:
        if self.current_memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.base_as)
            self.current_memory = None
        if self.limits.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, self.base_cpu)

    def _clean_up_descendants(self, budget: float = 2.0) -> bool:
        """Kill and reap every process the task left behind; False if some survive."""
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True  # the usual case: no children at all
        deadline = time.monotonic() + budget
        while True:
            try:
                while pid:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            for child in _children():
                with contextlib.suppress(OSError):
                    pgid = os.getpgid(child)
                    if pgid != self.own_pgid:
                        os.killpg(pgid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
            pid = -1


def _children() -> list[int]:
    pids: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as fh:
                pids.extend(int(p) for p in fh.read().split())
        except OSError:
            continue
    return pids


def _flush_stdio() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a task may have closed or replaced them
        with contextlib.suppress(Exception):
            sys.stderr.flush()
