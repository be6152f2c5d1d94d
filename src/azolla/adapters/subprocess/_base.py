"""Shared machinery of the fork-server based executors (``process`` and ``pool`` modes)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import orjson

from azolla.adapters.subprocess._forkclient import ChildProcess, ForkServerClient
from azolla.adapters.subprocess._frames import KIND_ERROR_RETIRE, KIND_OK, pack
from azolla.adapters.subprocess._outcomes import (
    ExitStatus,
    cancelled_outcome,
    closed_outcome,
    crash_outcome,
    error_outcome,
    outcome_from_frame,
    timeout_outcome,
)
from azolla.adapters.subprocess._output import OutputTail
from azolla.adapters.subprocess.limits import ResourceLimits, _effective_memory, scrub_environment
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

if TYPE_CHECKING:
    from azolla.adapters.subprocess.pool import _PoolWorker

__all__ = ["AttemptAlreadyRunning", "ForkingExecutorBase"]

#: Events that end the wait for an attempt.
FRAME = "frame"
EXIT = "exit"
TIMEOUT = "timeout"
CANCEL = "cancel"
CLOSED = "closed"
START_FAILED = "start_failed"


class AttemptAlreadyRunning(RuntimeError):
    """``execute`` was called for a (task id, attempt) that this executor is already running."""


class Attempt:
    """One attempt in flight."""

    __slots__ = (
        "done",
        "event",
        "frame",
        "in_heap",
        "key",
        "memory",
        "request",
        "request_frame",
        "tail",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: ExecutionRequest,
        timeout: float | None,
        memory: int | None,
    ) -> None:
        self.request = request
        self.key = (request.task_id, request.attempt)
        self.event: asyncio.Future[str] = loop.create_future()
        self.frame: bytes | None = None
        self.timeout = timeout
        self.memory = memory
        self.worker: _PoolWorker | None = None
        self.in_heap = False
        self.request_frame = b""
        self.tail: OutputTail | None = None
        #: Set for attempts started with ``submit`` (no coroutine waits for them): called
        #: with the attempt and the event that ended it, except ``FRAME``, which the
        #: executor handles where the frame is read.
        self.done: Callable[[Attempt, str], None] | None = None

    def signal(self, kind: str) -> None:
        """End the wait with ``kind`` (the first signal wins)."""
        if not self.event.done():
            self.event.set_result(kind)
            if self.done is not None and kind != FRAME:
                self.done(self, kind)

    def on_frame(self, frame: bytes) -> None:
        """Record the result frame."""
        if self.frame is None:
            self.frame = frame
            self.signal(FRAME)

    @property
    def finished(self) -> bool:
        """True once the wait ended."""
        return self.event.done()


class Deadlines:
    """Attempt timeouts on one heap with a single armed timer (no timer per attempt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Attempt]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._live = 0

    def add(self, delay: float, attempt: Attempt) -> None:
        """Signal ``TIMEOUT`` to ``attempt`` after ``delay`` seconds unless it finished."""
        when = self._loop.time() + delay
        heapq.heappush(self._heap, (when, next(self._seq), attempt))
        attempt.in_heap = True
        self._live += 1
        if len(self._heap) > 1024 and len(self._heap) > 4 * self._live:
            self._compact()
        if self._timer is None or when < self._timer_at:
            self._arm(when)

    def done(self, attempt: Attempt) -> None:
        """Tell the heap that ``attempt`` finished (its entry becomes garbage)."""
        if attempt.in_heap:
            attempt.in_heap = False
            self._live -= 1

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].in_heap]
        heapq.heapify(self._heap)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        heap = self._heap
        while heap and (heap[0][0] <= now or not heap[0][2].in_heap):
            _, _, attempt = heapq.heappop(heap)
            if attempt.in_heap:
                attempt.in_heap = False
                self._live -= 1
                attempt.signal(TIMEOUT)
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        """Disarm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()


class ForkingExecutorBase:
    """Configuration, fork server, timeouts, cancel and close shared by both modes.

    Args:
        task_modules: Modules that define the tasks (imported once by the fork server).
        limits: Resource limits of worker processes.
        default_timeout: Timeout in seconds for requests that carry none (None: no timeout).
        kill_grace: Seconds between SIGTERM and SIGKILL when an attempt is stopped.
        env: Base environment of workers (default: ``os.environ``), cleaned by
            :func:`~azolla.adapters.subprocess.limits.scrub_environment`.
        allow_env: Variable names passed on even though the clean-environment rule drops them.
        extra_env: Variables added to the workers' environment, unfiltered.
        python: Interpreter for the fork server (default: ``sys.executable``).
        sys_path: Import path entries for the fork server (default: this process's ``sys.path``).
        output_tail_bytes: Output bytes kept for the failure record.
        output_tail_lines: Output lines kept for the failure record.
        max_result_bytes: Largest result a task may return (larger: ``ResultTooLarge``).
        max_request_bytes: Largest request (args plus kwargs) accepted.
        startup_timeout: Seconds allowed for the fork server to import the task modules.
    """

    def __init__(
        self,
        task_modules: Sequence[str],
        *,
        limits: ResourceLimits | None = None,
        default_timeout: float | None = None,
        kill_grace: float = 2.0,
        env: Mapping[str, str] | None = None,
        allow_env: Iterable[str] = (),
        extra_env: Mapping[str, str] | None = None,
        python: str | None = None,
        sys_path: Sequence[str] | None = None,
        output_tail_bytes: int = 8192,
        output_tail_lines: int = 50,
        max_result_bytes: int = 64 << 20,
        max_request_bytes: int = 64 << 20,
        startup_timeout: float = 60.0,
    ) -> None:
        self.limits = limits or ResourceLimits()
        self.default_timeout = default_timeout
        self.kill_grace = kill_grace
        self.max_request_bytes = max_request_bytes
        clean_env = scrub_environment(
            os.environ if env is None else env, allow=allow_env, extra=extra_env
        )
        self._forkserver = ForkServerClient(
            task_modules,
            limits=self.limits,
            env=clean_env,
            python=python or sys.executable,
            sys_path=sys_path,
            startup_timeout=startup_timeout,
            max_result_bytes=max_result_bytes,
            max_request_bytes=max_request_bytes,
            tail_bytes=output_tail_bytes,
            tail_lines=output_tail_lines,
        )
        self._running: dict[tuple[str, int], Attempt] = {}
        self._deadlines: Deadlines | None = None
        self._closed = False
        self._drained: asyncio.Event | None = None
        self._exit_wait = 5.0

    # -- public ----------------------------------------------------------------------------

    @property
    def fork_server_pid(self) -> int | None:
        """The pid of the running fork server, if any."""
        return self._forkserver.pid

    @property
    def fork_server_starts(self) -> int:
        """How many times a fork server was started (restarts included)."""
        return self._forkserver.starts

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks the fork server loaded."""
        return list(self._forkserver.task_names)

    @property
    def running(self) -> int:
        """Attempts in flight."""
        return len(self._running)

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """Stop a running attempt (SIGTERM to its process group, then SIGKILL after the grace).

        ``execute`` for it then returns an outcome with error type ``Cancelled``.

        Args:
            task_id: The task.
            attempt: The attempt number.

        Returns:
            True if the attempt was running (or waiting for a worker).
        """
        entry = self._running.get((task_id, attempt))
        if entry is None or entry.finished:
            return False
        entry.signal(CANCEL)
        return True

    # -- helpers for subclasses ------------------------------------------------------------

    def _begin(self, request: ExecutionRequest) -> Attempt:
        loop = asyncio.get_running_loop()
        if self._deadlines is None:
            self._deadlines = Deadlines(loop)
        if request.task_id is None or (request.task_id, request.attempt) in self._running:
            raise AttemptAlreadyRunning(
                f"attempt {request.attempt} of task {request.task_id} is already running"
            )
        timeout = request.timeout if request.timeout is not None else self.default_timeout
        if timeout is not None and timeout <= 0:
            timeout = None
        memory = _effective_memory(self.limits.memory_bytes, request.memory_limit)
        attempt = Attempt(loop, request, timeout, memory)
        self._running[attempt.key] = attempt
        if self._drained is not None:
            self._drained.clear()
        return attempt

    def _end(self, attempt: Attempt) -> None:
        self._running.pop(attempt.key, None)
        if self._deadlines is not None:
            self._deadlines.done(attempt)
        if not self._running and self._drained is not None:
            self._drained.set()

    def _oversized(self, attempt: Attempt, frame: bytes) -> ExecutionOutcome | None:
        if len(frame) - 4 <= self.max_request_bytes:
            return None
        return error_outcome(
            attempt.request,
            "RequestTooLarge",
            f"task arguments of {len(frame)} bytes exceed the limit of "
            f"{self.max_request_bytes} bytes",
            {"size": len(frame), "limit": self.max_request_bytes},
            retriable=False,
        )

    @staticmethod
    def _request_frame(request: ExecutionRequest) -> bytes:
        return pack(
            orjson.dumps(
                [
                    request.task_id,
                    request.attempt,
                    request.name,
                    request.args,
                    request.kwargs,
                    request.domain,
                    request.memory_limit,
                ]
            )
        )

    def _arm_timeout(self, attempt: Attempt) -> None:
        if attempt.timeout is not None and self._deadlines is not None:
            self._deadlines.add(attempt.timeout, attempt)

    async def _conclude(
        self, attempt: Attempt, kind: str, child: ChildProcess
    ) -> tuple[ExecutionOutcome, bool]:
        """Turn the event that ended an attempt into its outcome.

        Returns:
            The outcome and whether the worker may serve another attempt.
        """
        request = attempt.request
        if kind == FRAME and attempt.frame is not None:
            frame = attempt.frame
            if not frame or frame[0] != KIND_OK:
                child.drain_output()
            try:
                outcome = outcome_from_frame(request, frame, child.tail)
            except (ValueError, TypeError, IndexError) as exc:
                child.kill()
                status = await child.wait_exit(self._exit_wait) or ExitStatus.unknown()
                return crash_outcome(
                    request, status, child.tail, reason=f"malformed result: {exc}", pid=child.pid
                ), False
            return outcome, frame[0] != KIND_ERROR_RETIRE
        if kind in (TIMEOUT, CANCEL, CLOSED):
            await child.terminate(self.kill_grace)
            child.drain()
            if kind == TIMEOUT:
                assert attempt.timeout is not None
                return timeout_outcome(request, attempt.timeout, child.tail), False
            if kind == CANCEL:
                return cancelled_outcome(request, child.tail), False
            return closed_outcome(request), False
        # The worker died (result pipe closed or exit reported) before sending a result.
        observed = await child.wait_exit(self._exit_wait)
        if observed is None:
            child.kill()
            observed = await child.wait_exit(self._exit_wait)
        status = observed or ExitStatus.unknown()
        child.drain()
        if attempt.frame is not None:
            try:
                return outcome_from_frame(request, attempt.frame, child.tail), False
            except (ValueError, TypeError, IndexError):
                pass
        reason = child.protocol_error
        if not status.known and reason is None:
            reason = "the fork server died"
        return crash_outcome(
            request,
            status,
            child.tail,
            memory_limit=attempt.memory,
            reason=reason,
            pid=child.pid,
        ), False

    def _signal_all_closed(self) -> None:
        for attempt in list(self._running.values()):
            attempt.signal(CLOSED)

    async def _wait_drained(self, timeout: float) -> None:
        if not self._running:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    async def _close_common(self) -> None:
        self._signal_all_closed()
        await self._wait_drained(self.kill_grace + 2 * self._exit_wait)
        await self._forkserver.close()
        if self._deadlines is not None:
            self._deadlines.close()

    @staticmethod
    def _watch_exit(child: ChildProcess, callback: Callable[[], None]) -> None:
        child.exited.add_done_callback(lambda _f: callback())
