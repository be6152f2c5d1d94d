"""``pool`` mode: long-lived worker processes, each running one attempt at a time.

Workers are forked from the same fork server as in ``process`` mode (so they start in about a
millisecond and share the imported modules' memory), lead their own process groups and apply the
resource limits; the memory and CPU limits are re-applied for every attempt. A worker that dies,
times out, is cancelled, runs out of memory or leaves processes behind is replaced; with
``max_attempts_per_worker`` every worker is also replaced after that many attempts.

Requests and results travel as length-prefixed frames over pipes (see ``_frames``). The hot path
has no thread, timer or task per attempt: when a worker's result arrives, the read callback hands
the worker the next waiting attempt at once, and the attempt's own coroutine wakes only to build
its outcome. With :meth:`PoolExecutor.submit` (what the shepherd runtime uses) there is no
coroutine either: the read callback hands the outcome to the caller's callback (a task and its
two wake-ups cost the shepherd about 12 us per attempt on the 2-core development VM). Timeouts
live on one heap.

**Prefetch.** With ``prefetch`` > 0, an attempt that finds no idle worker is written into the
pipe of a busy one (at most ``prefetch`` behind the attempt it runs), so the worker starts it the
moment it is done, without going to sleep and without waiting for the shepherd to read its
result. A queued attempt has not started: its timeout starts when the worker reaches it. It is
taken back (*revoked*: an ``S`` frame, which the worker honours when it reaches the request)
when it is cancelled, or when the attempt ahead of it has run longer than ``revoke_after``
(it then goes to the next free worker, so it never waits behind a long attempt). A worker
that dies or is stopped gives its queued attempts back; they run on another worker. A revoked
request that the worker had already started when the revocation arrived (a race of
microseconds) is run, its result dropped; such a worker is stopped if it is still on it
``revoke_after`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

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
from azolla.adapters.subprocess._frames import (
    KIND_ERROR,
    KIND_ERROR_RETIRE,
    KIND_OK,
    KIND_SKIPPED,
    revoke_frame,
)
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

log = logging.getLogger("azolla.shepherd")

_KNOWN_KINDS = frozenset((KIND_OK, KIND_ERROR, KIND_ERROR_RETIRE, KIND_SKIPPED))


class _Entry:
    """A request written into a worker's pipe."""

    __slots__ = ("attempt", "index", "started")

    def __init__(self, attempt: Attempt, index: int) -> None:
        #: None once revoked: the worker's answer to it is dropped.
        self.attempt: Attempt | None = attempt
        #: Its index among the request frames of the pipe.
        self.index = index
        #: Loop time at which it became the worker's current request (0.0: queued).
        self.started = 0.0


class _PoolWorker:
    """A long-lived worker process and the requests in its pipe (the first one runs)."""

    __slots__ = ("attempts", "child", "dead", "gone", "in_room", "queue", "sent")

    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self.queue: deque[_Entry] = deque()
        self.attempts = 0
        self.sent = 0
        #: Out of the pool (killed, retired or dead); its child is being closed.
        self.dead = False
        #: Its process ended (or is ending): nothing more is written to it.
        self.gone = False
        self.in_room = False

    @property
    def current(self) -> Attempt | None:
        """The attempt the worker runs (None when idle or running a revoked request)."""
        return self.queue[0].attempt if self.queue else None


class PoolExecutor(ForkingExecutorBase):
    """Runs attempts on a pool of reusable worker processes (an ``AttemptExecutor``).

    Args:
        task_modules: Modules that define the tasks.
        size: Number of worker processes (attempts beyond that wait for a free worker; the
            wait does not count against their timeout).
        max_attempts_per_worker: Replace a worker after this many attempts (None: never).
        prefetch: Attempts queued in a busy worker's pipe behind the one it runs, so it goes
            on without waiting (0: one attempt per worker at a time).
        revoke_after: A queued attempt is taken back and given to the next free worker when
            the attempt ahead of it has run this long (seconds).
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
        prefetch: int = 0,
        revoke_after: float = 0.05,
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
        if prefetch < 0:
            raise ValueError("prefetch must not be negative")
        if revoke_after <= 0:
            raise ValueError("revoke_after must be positive")
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
        self.prefetch = prefetch
        self.revoke_after = revoke_after
        self._depth = 1 + prefetch
        self._workers: set[_PoolWorker] = set()
        self._idle: deque[_PoolWorker] = deque()
        #: Busy workers with room in their pipe (entries may be stale: checked when taken).
        self._room: deque[_PoolWorker] = deque()
        self._pending: deque[Attempt] = deque()
        #: Outcome callbacks of the attempts started with ``submit``.
        self._callbacks: dict[tuple[str, int], Callable[[ExecutionOutcome], None]] = {}
        #: Live attempts queued in pipes behind a running one.
        self._queued = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._spawning = 0
        self._start_error: str | None = None
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        #: Worker processes started so far (replacements included).
        self.workers_started = 0
        #: Queued attempts taken back from a worker's pipe (cancelled, or behind a long one).
        self.revoked = 0

    # -- public ----------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the live workers."""
        return [w.child.pid for w in self._workers if not w.dead]

    @property
    def capacity(self) -> int:
        """Attempts this pool holds at once without a wait: ``size * (1 + prefetch)``."""
        return self.size * self._depth

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
        """Run one attempt on a worker and return its outcome.

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
            worker = self._take_worker()
            if worker is not None:
                self._push(worker, attempt)
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

    def submit(
        self, request: ExecutionRequest, done: Callable[[ExecutionOutcome], None]
    ) -> None:
        """Start one attempt without a coroutine waiting for it; ``done`` gets its outcome.

        The same as :meth:`execute` (outcomes, timeouts, cancel with :meth:`cancel`, close),
        minus a task per attempt: a success is handed to ``done`` from the callback that read
        the worker's result. ``done`` is called exactly once, always from the event loop and
        never from within ``submit``; exceptions it raises are logged.

        Raises:
            AttemptAlreadyRunning: When the same (task id, attempt) is already running here.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            loop.call_soon(done, closed_outcome(request))
            return
        attempt = self._begin(request)
        frame = self._request_frame(request)
        oversized = self._oversized(attempt, frame)
        if oversized is not None:
            self._end(attempt)
            loop.call_soon(done, oversized)
            return
        attempt.request_frame = frame
        worker = self._take_worker()
        if worker is None and self._start_error is not None and not self._spawning \
                and not self._workers:
            self._end(attempt)
            loop.call_soon(done, start_failed_outcome(request, self._start_error))
            return
        self._callbacks[attempt.key] = done
        attempt.done = self._on_submitted_signal
        if worker is not None:
            self._push(worker, attempt)
        else:
            self._pending.append(attempt)
            if self._supervisor is None:
                self._ensure_supervisor()

    def _on_submitted_signal(self, attempt: Attempt, kind: str) -> None:
        """A submitted attempt ended without a result frame (timeout, cancel, death...)."""
        task = asyncio.get_running_loop().create_task(self._finish_submitted(attempt, kind))
        self._finishing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._finishing.discard)

    async def _finish_submitted(self, attempt: Attempt, kind: str) -> None:
        try:
            outcome = await self._finish(attempt, kind)
        except Exception as exc:  # a bug: still give the attempt an outcome
            log.exception("concluding %s attempt %d failed", *attempt.key)
            outcome = crash_outcome(
                attempt.request, ExitStatus.unknown(), None, reason=f"executor error: {exc}"
            )
        self._complete(attempt, outcome)

    def _complete(self, attempt: Attempt, outcome: ExecutionOutcome) -> None:
        self._end(attempt)
        done = self._callbacks.pop(attempt.key, None)
        if done is not None:
            try:
                done(outcome)
            except Exception:
                log.exception("the outcome callback of %s attempt %d failed", *attempt.key)

    def _frame_outcome(self, attempt: Attempt) -> ExecutionOutcome:
        """The outcome of an attempt whose result frame arrived."""
        request = attempt.request
        frame = attempt.frame
        assert frame is not None
        if frame[0] == KIND_OK:
            return ExecutionOutcome(request.task_id, request.attempt, True, frame[1:].decode())
        try:
            return outcome_from_frame(request, frame, attempt.tail)
        except (ValueError, TypeError, IndexError) as exc:
            return crash_outcome(
                request, ExitStatus.unknown(), attempt.tail, reason=f"malformed result: {exc}"
            )

    async def close(self) -> None:
        """Stop running attempts (outcome ``ExecutorClosed``), the workers and the fork server.

        Bounded by about ``kill_grace`` plus a few seconds.
        """
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
        self._room.clear()
        self._pending.clear()

    # -- attempts --------------------------------------------------------------------------

    def _push(self, worker: _PoolWorker, attempt: Attempt) -> None:
        """Write ``attempt``'s request into ``worker``'s pipe (it runs it after the others)."""
        entry = _Entry(attempt, worker.sent)
        worker.sent += 1
        queue = worker.queue
        queue.append(entry)
        attempt.worker = worker
        worker.child.send(attempt.request_frame)
        if len(queue) == 1:
            self._started(worker, entry)
        else:
            self._queued += 1
            self._arm_sweeper()
        if len(queue) < self._depth and self._has_room(worker):
            self._offer(worker)

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.revoke_after, self._sweep)

    def _started(self, worker: _PoolWorker, entry: _Entry) -> None:
        """``entry`` became the request ``worker`` runs."""
        entry.started = asyncio.get_running_loop().time()
        attempt = entry.attempt
        if attempt is not None:
            worker.child.tail.clear()
            attempt.request_frame = b""
            self._arm_timeout(attempt)

    def _has_room(self, worker: _PoolWorker) -> bool:
        """Whether another request may be written into ``worker``'s pipe now."""
        queue = worker.queue
        if worker.dead or worker.gone or len(queue) >= self._depth:
            return False
        limit = self.max_attempts_per_worker
        if limit is not None and worker.attempts + len(queue) >= limit:
            return False
        return not queue or asyncio.get_running_loop().time() - queue[0].started < (
            self.revoke_after
        )

    def _offer(self, worker: _PoolWorker) -> None:
        if not worker.in_room:
            worker.in_room = True
            self._room.append(worker)

    def _take_worker(self) -> _PoolWorker | None:
        """An idle worker (the most recently used: warmest), else a busy one with room."""
        idle = self._idle
        while idle:
            worker = idle.pop()
            if not worker.dead and not worker.gone and not worker.queue:
                return worker
        room = self._room
        while room:
            worker = room.popleft()
            worker.in_room = False
            if self._has_room(worker):
                return worker
        return None

    def _is_current(self, attempt: Attempt) -> bool:
        worker = attempt.worker
        return worker is not None and bool(worker.queue) and worker.queue[0].attempt is attempt

    async def _finish(self, attempt: Attempt, kind: str) -> ExecutionOutcome:
        request = attempt.request
        if kind == FRAME and attempt.frame is not None:
            return self._frame_outcome(attempt)
        worker = attempt.worker
        if worker is not None and not self._is_current(attempt):
            # Queued in a pipe, not started: take it back; the worker is not disturbed.
            self._revoke(worker, attempt)
            worker = None
        if worker is None:  # never reached a worker
            if kind == CANCEL:
                return cancelled_outcome(request, None)
            if kind == CLOSED or self._closed:
                return closed_outcome(request)
            return start_failed_outcome(request, self._start_error or "no worker available")
        try:
            outcome, _ = await self._conclude(attempt, kind, worker.child)
        finally:
            if worker.queue and worker.queue[0].attempt is attempt:
                worker.queue[0].attempt = None
            self._discard(worker)
        return outcome

    def _abandon(self, attempt: Attempt) -> None:
        """The caller stopped waiting (its task was cancelled): stop the attempt's worker."""
        worker = attempt.worker
        if worker is None:
            return
        if self._is_current(attempt):
            worker.queue[0].attempt = None
            self._discard(worker)
        else:
            self._revoke(worker, attempt)

    def _revoke(self, worker: _PoolWorker, attempt: Attempt) -> None:
        """Take ``attempt`` back from ``worker``'s pipe (where it waits behind another)."""
        attempt.worker = None
        for entry in worker.queue:
            if entry.attempt is attempt:
                entry.attempt = None
                if not entry.started:
                    self._queued -= 1
                self.revoked += 1
                if not worker.dead and not worker.gone:
                    worker.child.send(revoke_frame(entry.index))
                return

    def _sweep(self) -> None:
        """Take back queued attempts that wait behind a long one; stop runaway revoked ones."""
        self._sweeper = None
        if self._closed:
            return
        cutoff = asyncio.get_running_loop().time() - self.revoke_after
        taken: list[Attempt] = []
        for worker in list(self._workers):
            queue = worker.queue
            if not queue or queue[0].started > cutoff:
                continue
            if queue[0].attempt is None:
                self._discard(worker)  # runs a revoked request: it started before the revoke
                continue
            for entry in list(queue)[1:]:
                attempt = entry.attempt
                if attempt is not None:
                    self._revoke(worker, attempt)
                    taken.append(attempt)
        if taken:
            self._pending.extendleft(reversed(taken))
            self._dispatch()
        if self._queued > 0 or any(
                worker.queue and worker.queue[0].attempt is None for worker in self._workers):
            # Queued attempts to take back, or revoked requests a worker may be running (it
            # started them before the revoke reached it): look again later.
            self._arm_sweeper()

    # -- worker events (event-loop callbacks) ----------------------------------------------

    def _on_worker_frame(self, worker: _PoolWorker, frame: bytes) -> None:
        queue = worker.queue
        if not queue or not frame or frame[0] not in _KNOWN_KINDS:
            worker.child.protocol_error = "unexpected or malformed result frame"
            worker.child.kill()
            return
        entry = queue[0]
        attempt = entry.attempt
        kind = frame[0]
        if attempt is not None:
            if kind == KIND_SKIPPED:
                worker.child.protocol_error = "a request that was not revoked was skipped"
                worker.child.kill()
                return
            if kind != KIND_OK:
                worker.child.drain_output()
                attempt.tail = worker.child.tail.snapshot()
            attempt.on_frame(frame)
            event = attempt.event
            if event.cancelled() or event.result() != FRAME:
                return  # timed out or cancelled meanwhile: the worker is being killed
        queue.popleft()
        self._after_frame(worker, kind)
        if attempt is not None and attempt.done is not None:
            # Submitted: hand the outcome over now that the worker's state is settled.
            self._complete(attempt, self._frame_outcome(attempt))

    def _after_frame(self, worker: _PoolWorker, kind: int) -> None:
        """Bookkeeping after ``worker`` answered the request at the head of its queue."""
        queue = worker.queue
        if kind != KIND_SKIPPED:
            worker.attempts += 1
        if kind == KIND_ERROR_RETIRE:
            if not worker.dead:
                self._retire(worker)
            return
        if queue:
            # The worker went on with the next request in its pipe.
            entry = queue[0]
            if entry.attempt is not None:
                self._queued -= 1
            else:
                self._arm_sweeper()  # a revoked request: stop the worker if it runs it anyway
            self._started(worker, entry)
        if worker.dead or worker.gone:
            return  # being stopped, or drained after its death (see _on_worker_gone)
        limit = self.max_attempts_per_worker
        if limit is not None and worker.attempts >= limit:
            self._retire(worker)
        else:
            self._release(worker)

    def _on_worker_gone(self, worker: _PoolWorker) -> None:
        if worker.dead or worker.gone:
            return
        worker.gone = True
        # Frames the worker wrote before it died belong to the requests at the head of its
        # queue: read them first (the exit may be reported before the pipe is read). The
        # request it was on when it died is its current one; those behind it never started.
        worker.child.drain()
        if worker.dead:
            return
        current = worker.current
        if current is not None:
            self._give_back(worker, keep_current=True)
            self._dispatch()
            current.signal(EXIT)  # its _finish concludes and discards the worker
        else:
            self._discard(worker)

    # -- worker bookkeeping ----------------------------------------------------------------

    def _give_back(self, worker: _PoolWorker, *, keep_current: bool = False) -> None:
        """Return the attempts queued behind ``worker``'s current one to the pending queue.

        They never started: the worker runs requests in order and is done or being stopped.
        """
        queue = worker.queue
        entries = list(queue)
        first = entries[0] if keep_current and entries else None
        returned: list[Attempt] = []
        for entry in entries:
            attempt = entry.attempt
            if attempt is None or entry is first:
                continue
            if not entry.started:
                self._queued -= 1
            entry.attempt = None
            if not attempt.finished:
                attempt.worker = None
                returned.append(attempt)
        if returned:
            self._pending.extendleft(reversed(returned))
        queue.clear()
        if first is not None:
            queue.append(first)

    def _release(self, worker: _PoolWorker) -> None:
        """Fill ``worker``'s pipe from the pending attempts; mark it idle or with room."""
        pending = self._pending
        while pending and self._has_room(worker):
            attempt = pending.popleft()
            if not attempt.finished:
                self._push(worker, attempt)
        if worker.dead or worker.gone:
            return
        if not worker.queue:
            self._idle.append(worker)
        elif self._has_room(worker):
            self._offer(worker)

    def _dispatch(self) -> None:
        """Hand pending attempts to idle workers."""
        while self._pending:
            worker = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.dead and not candidate.gone and not candidate.queue:
                    worker = candidate
                    break
            if worker is None:
                return
            self._release(worker)

    def _retire(self, worker: _PoolWorker) -> None:
        """Let the worker exit (its request pipe is closed) and start a replacement."""
        self._workers.discard(worker)
        self._give_back(worker)
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
        self._dispatch()
        self._want_workers()

    def _discard(self, worker: _PoolWorker) -> None:
        """Forget a dead (or killed) worker and start a replacement."""
        if not worker.dead:
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
        if worker.queue:
            # A live current attempt is concluded by its own execute(); the rest go back.
            self._give_back(worker, keep_current=True)
        self._dispatch()
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
