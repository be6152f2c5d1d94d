"""Code that runs inside a worker process, right after the fork server forked it.

File descriptors in a worker: 0 = ``/dev/null``, 1 and 2 = the output pipe (captured by the
shepherd), 3 = request frames in, 4 = result frames out. 3 and 4 are close-on-exec, so programs
the task starts never inherit them.

The worker serves request frames one at a time, in order, until its request pipe closes, or
``max_attempts`` have run, or it must retire (after a ``MemoryError``, or when descendants it
started cannot be cleaned up). It is a child subreaper: after each attempt every process the task
left behind (even ones that called ``setsid``) is killed, so nothing outlives its attempt. After
its last attempt it exits at once: the fork server kills its process group before reaping it and
kills whatever was re-parented to it (see ``_forkserver``). It is killed when the fork server
dies (``PR_SET_PDEATHSIG``), so no attempt runs on unseen after its fork server is gone. In
pool mode the shepherd may queue the next request in the pipe while one runs, so the worker goes
on without waiting; before it starts a request it already holds, it picks up whatever else
arrived (one ``FIONREAD``, no blocking), so that a revocation of that request (an ``S`` frame,
see ``_frames``) is seen in time: the revoked request is answered with ``S`` and not run.

Cost: every page of the fork server's memory that a worker writes to (a reference count is
enough) is copied for it, a few microseconds each on a VM. So everything that can be prepared
once is prepared in the fork server (:class:`WorkerPlan`: the ``/dev/null`` descriptor, the
resource limits to set, the ``prctl`` entry point, ``faulthandler``, line-buffered stdout), and
the path from ``fork()`` to the task's first line runs as little Python as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import fcntl
import functools
import importlib
import io
import os
import resource
import signal
import struct
import sys
import termios
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import orjson

from azolla.adapters.subprocess._frames import (
    HEADER,
    KIND_ERROR,
    KIND_ERROR_RETIRE,
    KIND_OK,
    KIND_SKIPPED,
    FrameDecoder,
    write_all,
)
from azolla.adapters.subprocess.limits import (
    ResourceLimits,
    _effective_memory,
    static_limit_plan,
)
from azolla.tasks import TaskContext, TaskOutcome, TaskRegistry, execute_sync

__all__ = ["WorkerPlan", "worker_entry"]

REQUEST_FD = 3
RESULT_FD = 4
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: Freed when the task hits MemoryError, so that reporting the failure has memory to work with.
_CUSHION_BYTES = 1 << 20
#: Exit code of a worker that failed before or between attempts (not a task's own exit).
EXIT_INTERNAL_ERROR = 70
#: Exit code of a worker whose task left processes behind that could not be killed.
EXIT_DESCENDANTS_LEFT = 71
_READ_CHUNK = 1 << 16
_OK = bytes((KIND_OK,))
_SKIPPED_FRAME = HEADER.pack(1) + bytes((KIND_SKIPPED,))
_REVOKE = ord("S")
_FIONREAD_ARG = bytes(4)
_INT = struct.Struct("i")

#: ``signal.signal`` without its enum conversions (which run a dozen Python functions); it
#: recognises only its own ``SIG_DFL`` object.
_signal: Any = importlib.import_module("_signal")
_set_handler: Callable[[int, Any], Any] = _signal.signal
_SIG_DFL: Any = _signal.SIG_DFL


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _close_range_works() -> bool:
    # os.closerange() is one close_range(2) call on Linux 5.9+; older kernels close one by one.
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return sys.platform == "linux" and (major, minor) >= (5, 9)


class WorkerPlan:
    """What every worker needs, prepared once in the fork server (runs there, not in workers).

    Creating the plan also enables :mod:`faulthandler` and line-buffered stdout in the fork
    server, so that workers inherit both instead of setting them up.

    Args:
        registry: The tasks.
        limits: Resource limits.
        max_result_bytes: Largest result frame a worker sends.
        max_request_bytes: Largest request frame a worker accepts.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        limits: ResourceLimits,
        max_result_bytes: int,
        max_request_bytes: int,
    ) -> None:
        self.registry = registry
        self.limits = limits
        #: The fork server's pid: a worker whose parent is no longer this process exits at once.
        self.server_pid = os.getpid()
        self.max_result_bytes = max_result_bytes
        self.max_request_bytes = max_request_bytes
        #: ``(resource, soft, hard)`` for every limit that holds for a worker's whole life.
        self.rlimits = static_limit_plan(limits)
        #: Limits every worker starts with (it inherits them from the fork server).
        self.base_as = resource.getrlimit(resource.RLIMIT_AS)
        self.base_cpu = resource.getrlimit(resource.RLIMIT_CPU)
        #: Names of the ``async`` tasks (they need an event loop).
        self.async_tasks = frozenset(t.name for t in registry if t.is_async)
        #: :func:`worker_entry`, for the fork server (which imports this module late).
        self.worker_entry = worker_entry
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.close_range = _close_range_works()
        try:
            self.prctl: Any = _libc().prctl
        except (OSError, AttributeError):
            self.prctl = None
        faulthandler.enable()
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        _flush_stdio()  # nothing the fork server printed may reach a worker's output

    def close(self) -> None:
        """Release the fork server's ``/dev/null`` descriptor."""
        with contextlib.suppress(OSError):
            os.close(self.devnull)


def worker_entry(fds: Sequence[int], plan: WorkerPlan, max_attempts: int | None) -> NoReturn:
    """Set the freshly forked process up as a worker and serve attempts; never returns.

    Args:
        fds: ``[request_read, result_write, output_write]`` received from the shepherd.
        plan: Prepared by the fork server.
        max_attempts: Attempts to serve before exiting (1 in ``process`` mode), or None.
    """
    code = EXIT_INTERNAL_ERROR
    try:
        if plan.prctl is not None:
            # Die with the fork server: if it dies before the shepherd learns this worker's pid,
            # nothing else could stop the attempt. Checked after setting, so no window is left.
            plan.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != plan.server_pid:
            os._exit(code)
        os.setsid()
        _reset_signals()  # first: the wake-up descriptor's number is about to be reused
        _setup_fds(fds, plan)
        setrlimit = resource.setrlimit
        for which, soft, hard in plan.rlimits:
            setrlimit(which, (soft, hard))
        if plan.prctl is not None:
            plan.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        code = _Worker(plan, max_attempts).run()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _setup_fds(fds: Sequence[int], plan: WorkerPlan) -> None:
    request_r, result_w, output_w = fds
    devnull = plan.devnull
    if min(request_r, result_w, output_w, devnull) <= RESULT_FD:
        # Some source would be overwritten by a dup2 below: move them out of the way first.
        request_r, result_w, output_w, devnull = (
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            for fd in (request_r, result_w, output_w, devnull)
        )
    dup2 = os.dup2
    dup2(devnull, 0)
    dup2(output_w, 1)
    dup2(output_w, 2)
    dup2(request_r, REQUEST_FD, inheritable=False)
    dup2(result_w, RESULT_FD, inheritable=False)
    if plan.close_range:
        os.closerange(RESULT_FD + 1, 1 << 30)
    else:
        _close_listed_fds(RESULT_FD + 1)


def _close_listed_fds(lowest: int) -> None:
    # Without close_range(2), listing /proc/self/fd is far cheaper than close() on every number.
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
    signal.set_wakeup_fd(-1)
    _set_handler(signal.SIGCHLD, _SIG_DFL)
    _set_handler(signal.SIGTERM, _SIG_DFL)
    _set_handler(signal.SIGHUP, _SIG_DFL)
    _set_handler(signal.SIGINT, signal.default_int_handler)


class _Worker:
    """Serves request frames one at a time."""

    def __init__(self, plan: WorkerPlan, max_attempts: int | None) -> None:
        self.registry = plan.registry
        self.limits = plan.limits
        self.max_attempts = max_attempts
        self.max_result_bytes = plan.max_result_bytes
        self.max_request_bytes = plan.max_request_bytes
        self.loop: asyncio.AbstractEventLoop | None = None
        self.async_tasks = plan.async_tasks
        self.own_pgid = os.getpgrp()
        self.base_as = plan.base_as
        self.base_cpu = plan.base_cpu
        self.current_memory: int | None = None
        self.decoder = FrameDecoder(plan.max_request_bytes)
        #: Requests read but not yet served, with their index on the pipe.
        self.frames: deque[tuple[int, bytes]] = deque()
        #: Indexes of requests revoked by the shepherd that have not been taken yet (a
        #: revocation that arrives after its request was taken is dropped: bounded by prefetch).
        self.revoked: set[int] = set()
        self.received = 0
        #: Index of the last request taken from :attr:`frames` (-1: none yet).
        self.taken = -1
        self.eof = False

    def run(self) -> int:
        served = 0
        while self.max_attempts is None or served < self.max_attempts:
            request = self._next_request()
            if request is None:
                return 0
            index, payload = request
            if index in self.revoked:
                self.revoked.discard(index)
                write_all(RESULT_FD, _SKIPPED_FRAME)
                continue
            frame, retire = self._serve(payload)
            _flush_stdio()
            data = HEADER.pack(len(frame)) + frame
            written = os.write(RESULT_FD, data)
            if written < len(data):
                write_all(RESULT_FD, data[written:])
            served += 1
            if retire:
                return 0
            if self.max_attempts is not None and served >= self.max_attempts:
                return 0  # exiting now: the fork server kills what the task left behind
            if not self._clean_up_descendants():
                return EXIT_DESCENDANTS_LEFT
        return 0

    def _next_request(self) -> tuple[int, bytes] | None:
        """The next request (index, payload), blocking; None at the end of the request pipe.

        A request already read is returned without blocking, after reading whatever else the
        pipe holds (a revocation of it may be there).

        Raises:
            FrameTooLarge: When the frame is larger than ``max_request_bytes``.
        """
        frames = self.frames
        if frames:
            if not self.eof:
                waiting = _INT.unpack(fcntl.ioctl(REQUEST_FD, termios.FIONREAD, _FIONREAD_ARG))[0]
                if waiting > 0:
                    self._feed(os.read(REQUEST_FD, max(waiting, _READ_CHUNK)))
        else:
            while not frames:
                if self.eof:
                    return None
                self._feed(os.read(REQUEST_FD, _READ_CHUNK))
        request = frames.popleft()
        self.taken = request[0]
        return request

    def _feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        for payload in self.decoder.feed(data):
            if payload and payload[0] == _REVOKE:
                index = int(payload[1:])
                if index > self.taken:  # else it was served already: its answer is on the way
                    self.revoked.add(index)
            else:
                self.frames.append((self.received, payload))
                self.received += 1

    def _serve(self, payload: bytes) -> tuple[bytes, bool]:
        task_id, attempt, name, args, kwargs, domain, memory_limit = orjson.loads(payload)
        context = TaskContext(task_id=task_id, attempt=attempt, name=name, domain=domain)
        memory = self.limits.memory_bytes
        if memory_limit is not None:
            memory = _effective_memory(memory, memory_limit)
        limited = memory is not None or self.limits.cpu_seconds is not None
        if limited or self.current_memory is not None:
            self._set_attempt_limits(memory)
        cushion = bytearray(_CUSHION_BYTES) if memory is not None else None
        try:
            loop = self.loop
            if loop is None and name in self.async_tasks:
                loop = self.loop = asyncio.new_event_loop()
            outcome = execute_sync(self.registry, name, args, kwargs, context, loop=loop)
        finally:
            del cushion
        if self.loop is not None:
            self._cancel_leftover_tasks()
        if limited:
            self._restore_limits()
        return self._encode(outcome, memory)

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
                return _OK + value, False
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
