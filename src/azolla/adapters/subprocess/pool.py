"""``pool`` mode: long-lived worker processes, each running one attempt at a time.

Workers are forked from the same fork server as in ``process`` mode (so they start in about a
millisecond and share the imported modules' memory), lead their own process groups and apply the
resource limits; the memory and CPU limits are re-applied for every attempt. A worker that dies,
times out, is cancelled, runs out of memory or leaves processes behind is replaced; with
``max_attempts_per_worker`` every worker is also replaced after that many attempts.

Requests and results travel as length-prefixed frames over pipes (see ``_frames``). The hot path
has no thread, timer or task per attempt: when a worker's result arrives, the read callback hands
the worker the next waiting attempt at once, and the attempt's own coroutine wakes only to build
its outcome. Timeouts live on one heap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from azolla.adapters.subprocess._base import (
    CANCEL,
    CLOSED,
    EXIT,
    FRAME,
    START_FAILED,
    Attempt,
    ForkingExecutorBase,
)
from azolla.adapters.subprocess._forkclient import ChildProcess, WorkerStartError
from azolla.adapters.subprocess._frames import KIND_ERROR, KIND_ERROR_RETIRE, KIND_OK
from azolla.adapters.subprocess._outcomes import (
    ExitStatus,
    cancelled_outcome,
    closed_outcome,
    crash_outcome,
    outcome_from_frame,
    start_failed_outcome,
)
from azolla.adapters.subprocess.limits import ResourceLimits
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

__all__ = ["PoolExecutor"]

_KNOWN_KINDS = frozenset((KIND_OK, KIND_ERROR, KIND_ERROR_RETIRE))


class _PoolWorker:
    """A long-lived worker process and the attempt it runs."""

    __slots__ = ("attempts", "child", "current", "dead")

    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self.current: Attempt | None = None
        self.attempts = 0
        self.dead = False


class PoolExecutor(ForkingExecutorBase):
    """Runs attempts on a pool of reusable worker processes (an ``AttemptExecutor``).

    Args:
        task_modules: Modules that define the tasks.
        size: Number of worker processes (attempts beyond that wait for a free worker; the
            wait does not count against their timeout).
        max_attempts_per_worker: Replace a worker after this many attempts (None: never).
        limits: Resource limits of worker processes.
        default_timeout: Timeout for requests that carry none (None: no timeout).
        kill_grace: Seconds between SIGTERM and SIGKILL when an attempt is stopped.
        env: Base environment of workers (default ``os.environ``), cleaned.
        allow_env: Variable names passed on although the clean-environment rule drops them.
        extra_env: Variables added to the workers' environment.
        python: Interpreter for the fork server.
        sys_path: Import path entries for the fork server.
        output_tail_bytes: Output bytes kept for the failure record.
        output_tail_lines: Output lines kept for the failure record.
        max_result_bytes: Largest result a task may return.
        max_request_bytes: Largest request accepted.
        startup_timeout: Seconds allowed for the fork server to import the task modules.
    """

    def __init__(
        self,
        task_modules: Sequence[str],
        *,
        size: int = 4,
        max_attempts_per_worker: int | None = None,
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
        if size < 1:
            raise ValueError("size must be at least 1")
        if max_attempts_per_worker is not None and max_attempts_per_worker < 1:
            raise ValueError("max_attempts_per_worker must be at least 1 (or None)")
        super().__init__(
            task_modules,
            limits=limits,
            default_timeout=default_timeout,
            kill_grace=kill_grace,
            env=env,
            allow_env=allow_env,
            extra_env=extra_env,
            python=python,
            sys_path=sys_path,
            output_tail_bytes=output_tail_bytes,
            output_tail_lines=output_tail_lines,
            max_result_bytes=max_result_bytes,
            max_request_bytes=max_request_bytes,
            startup_timeout=startup_timeout,
        )
        self.size = size
        self.max_attempts_per_worker = max_attempts_per_worker
        self._workers: set[_PoolWorker] = set()
        self._idle: deque[_PoolWorker] = deque()
        self._pending: deque[Attempt] = deque()
        self._spawning = 0
        self._start_error: str | None = None
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        #: Worker processes started so far (replacements included).
        self.workers_started = 0

    # -- public ----------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the live workers."""
        return [w.child.pid for w in self._workers if not w.dead]

    async def start(self, wait: bool = True) -> None:
        """Start the fork server and the workers.

        Args:
            wait: Wait until every worker is ready.

        Raises:
            WorkerStartError: When the fork server cannot start (e.g. a task module fails to
                import).
        """
        await self._forkserver.ensure_started()
        self._ensure_supervisor()
        if wait and self._full is not None:
            await asyncio.wait_for(self._full.wait(), self._forkserver.startup_timeout)

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt on a free worker and return its outcome.

        Never raises for task failures: crashes, timeouts, limits, cancellation and start-up
        failures are all outcomes.

        Raises:
            AttemptAlreadyRunning: When the same (task id, attempt) is already running here.
        """
        if self._closed:
            return closed_outcome(request)
        attempt = self._begin(request)
        try:
            frame = self._request_frame(request)
            oversized = self._oversized(attempt, frame)
            if oversized is not None:
                return oversized
            attempt.request_frame = frame
            worker = self._take_idle()
            if worker is not None:
                self._start_on(worker, attempt)
            elif self._start_error is not None and not self._spawning and not self._workers:
                return start_failed_outcome(request, self._start_error)
            else:
                self._pending.append(attempt)
                if self._supervisor is None:
                    self._ensure_supervisor()
            try:
                kind = await attempt.event
            except asyncio.CancelledError:
                self._abandon(attempt)
                raise
            result = attempt.frame
            if kind == FRAME and result is not None and result[0] == KIND_OK:
                # Hot path: the worker already went on with the next attempt.
                return ExecutionOutcome(request.task_id, request.attempt, True, result[1:].decode())
            return await self._finish(attempt, kind)
        finally:
            self._end(attempt)

    async def close(self) -> None:
        """Stop running attempts (outcome ``ExecutorClosed``), the workers and the fork server.

        Bounded by about ``kill_grace`` plus a few seconds.
        """
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        for worker in list(self._idle):
            worker.child.close_input()
        await self._close_common()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        for worker in list(self._workers):
            worker.child.close()
        self._workers.clear()
        self._idle.clear()
        self._pending.clear()

    # -- attempts --------------------------------------------------------------------------

    def _start_on(self, worker: _PoolWorker, attempt: Attempt) -> None:
        worker.current = attempt
        attempt.worker = worker
        child = worker.child
        child.tail.clear()
        child.send(attempt.request_frame)
        attempt.request_frame = b""
        self._arm_timeout(attempt)

    async def _finish(self, attempt: Attempt, kind: str) -> ExecutionOutcome:
        request = attempt.request
        if kind == FRAME and attempt.frame is not None:
            try:
                return outcome_from_frame(request, attempt.frame, attempt.tail)
            except (ValueError, TypeError, IndexError) as exc:
                return crash_outcome(
                    request, ExitStatus.unknown(), attempt.tail, reason=f"malformed result: {exc}"
                )
        worker = attempt.worker
        if worker is None:  # never reached a worker
            if kind == CANCEL:
                return cancelled_outcome(request, None)
            if kind == CLOSED or self._closed:
                return closed_outcome(request)
            return start_failed_outcome(request, self._start_error or "no worker available")
        try:
            outcome, _ = await self._conclude(attempt, kind, worker.child)
        finally:
            worker.current = None
            self._discard(worker)
        return outcome

    def _abandon(self, attempt: Attempt) -> None:
        """The caller stopped waiting (its task was cancelled): stop the attempt's worker."""
        worker = attempt.worker
        if worker is not None and worker.current is attempt:
            worker.current = None
            self._discard(worker)

    # -- worker events (event-loop callbacks) ----------------------------------------------

    def _on_worker_frame(self, worker: _PoolWorker, frame: bytes) -> None:
        attempt = worker.current
        if attempt is None or not frame or frame[0] not in _KNOWN_KINDS:
            worker.child.protocol_error = "unexpected or malformed result frame"
            worker.child.kill()
            return
        if frame[0] != KIND_OK:
            worker.child.drain_output()
            attempt.tail = worker.child.tail.snapshot()
        attempt.on_frame(frame)
        event = attempt.event
        if event.cancelled() or event.result() != FRAME:
            return  # timed out or cancelled meanwhile: the worker is being killed
        worker.current = None
        if frame[0] == KIND_ERROR_RETIRE:
            self._retire(worker)
            return
        worker.attempts += 1
        limit = self.max_attempts_per_worker
        if limit is not None and worker.attempts >= limit:
            self._retire(worker)
        else:
            self._release(worker)

    def _on_worker_gone(self, worker: _PoolWorker) -> None:
        if worker.current is not None:
            worker.current.signal(EXIT)
        elif not worker.dead:
            self._discard(worker)

    # -- worker bookkeeping ----------------------------------------------------------------

    def _take_idle(self) -> _PoolWorker | None:
        while self._idle:
            worker = self._idle.pop()  # LIFO: the most recently used worker is warmest
            if not worker.dead:
                return worker
        return None

    def _release(self, worker: _PoolWorker) -> None:
        pending = self._pending
        while pending:
            attempt = pending.popleft()
            if not attempt.finished:
                self._start_on(worker, attempt)
                return
        self._idle.append(worker)

    def _retire(self, worker: _PoolWorker) -> None:
        """Let the worker exit (its request pipe is closed) and start a replacement."""
        self._workers.discard(worker)
        worker.dead = True
        child = worker.child
        child.on_frame = None
        child.on_eof = None
        child.close_input()
        if child.alive:
            timer = asyncio.get_running_loop().call_later(self._exit_wait, child.kill)

            def _exited(_f: object) -> None:
                timer.cancel()
                child.close()

            child.exited.add_done_callback(_exited)
        else:
            child.close()
        self._want_workers()

    def _discard(self, worker: _PoolWorker) -> None:
        """Forget a dead (or killed) worker and start a replacement."""
        self._workers.discard(worker)
        worker.dead = True
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        child = worker.child
        if child.alive:
            child.kill()
            child.exited.add_done_callback(lambda _f: child.close())
        else:
            child.close()
        self._want_workers()

    # -- supervision -----------------------------------------------------------------------

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None and not self._closed:
            self._wake = asyncio.Event()
            self._full = asyncio.Event()
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="azolla-pool-supervisor"
            )
        self._want_workers()

    def _want_workers(self) -> None:
        if self._wake is not None and len(self._workers) < self.size and not self._closed:
            if self._full is not None:
                self._full.clear()
            self._wake.set()

    async def _supervise(self) -> None:
        assert self._wake is not None
        assert self._full is not None
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed and len(self._workers) < self.size:
                self._spawning += 1
                try:
                    child = await self._forkserver.spawn(self.max_attempts_per_worker)
                except WorkerStartError as exc:
                    self._start_error = str(exc)
                    self._fail_pending()
                    await asyncio.sleep(0.05)
                    continue
                finally:
                    self._spawning -= 1
                if self._closed:
                    child.kill()
                    child.close()
                    return
                self._start_error = None
                self.workers_started += 1
                self._add_worker(child)
            if len(self._workers) >= self.size:
                self._full.set()

    def _add_worker(self, child: ChildProcess) -> None:
        worker = _PoolWorker(child)
        child.on_frame = lambda frame: self._on_worker_frame(worker, frame)
        child.on_eof = lambda: self._on_worker_gone(worker)
        self._watch_exit(child, lambda: self._on_worker_gone(worker))
        self._workers.add(worker)
        self._release(worker)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, deque()
        for attempt in pending:
            attempt.signal(START_FAILED)
