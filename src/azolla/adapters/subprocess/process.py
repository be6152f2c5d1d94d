"""``process`` mode: a fresh worker process for every attempt.

Each attempt runs in a new process forked from a fork server that has already imported the task
modules (a fork costs about a millisecond; a fresh interpreter tens to hundreds). The process
leads its own session and process group, applies the resource limits, reads the attempt from a
pipe (written before the fork, so it is there at once), writes the result to another pipe and
exits; its output is captured. Whatever it leaves behind is killed with its group.
"""

from __future__ import annotations

from azolla.adapters.subprocess._base import CANCEL, EXIT, ForkingExecutorBase
from azolla.adapters.subprocess._forkclient import WorkerLostError, WorkerStartError
from azolla.adapters.subprocess._outcomes import (
    ExitStatus,
    cancelled_outcome,
    closed_outcome,
    crash_outcome,
    start_failed_outcome,
)
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

__all__ = ["ProcessExecutor"]


class ProcessExecutor(ForkingExecutorBase):
    """Runs every attempt in its own process (an :class:`~azolla.domain.ports.AttemptExecutor`).

    Constructor arguments: see :class:`~azolla.adapters.subprocess._base.ForkingExecutorBase`
    (``task_modules``, ``limits``, ``default_timeout``, ``kill_grace``, ``env``, ``allow_env``,
    ``extra_env``, ``python``, ``sys_path``, ``output_tail_bytes``, ``output_tail_lines``,
    ``max_result_bytes``, ``max_request_bytes``, ``startup_timeout``).

    Example:
        >>> executor = ProcessExecutor(["myapp.tasks"], default_timeout=300)
        >>> await executor.start()                      # doctest: +SKIP
        >>> outcome = await executor.execute(request)   # doctest: +SKIP
        >>> await executor.close()                      # doctest: +SKIP
    """

    @property
    def fork_method(self) -> str:
        """How the running fork server forks workers (for benchmarks and diagnostics).

        ``libc`` (without the Python-level at-fork hooks, see ``_forkserver``) or ``os.fork``,
        plus ``+warm`` when its warm-up ran the worker's attempt path; empty before it started.
        """
        client = self._forkserver
        if not client.alive:
            return ""
        return ("libc" if client.raw_fork else "os.fork") + ("+warm" if client.warmed_up else "")

    async def start(self) -> None:
        """Start the fork server now (otherwise the first attempt starts it).

        Raises:
            WorkerStartError: When the task modules cannot be imported or Python cannot run.
        """
        await self._forkserver.ensure_started()

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt in a fresh worker process and return its outcome.

        Never raises for task failures: crashes, timeouts, limits, cancellation and start-up
        failures are all outcomes.

        Raises:
            AttemptAlreadyRunning: When the same (task id, attempt) is already running here.
        """
        if self._closed:
            return closed_outcome(request)
        attempt = self._begin(request)
        child = None
        try:
            frame = self._request_frame(request)
            oversized = self._oversized(attempt, frame)
            if oversized is not None:
                return oversized
            try:
                child = await self._forkserver.spawn(max_attempts=1, request=frame)
            except WorkerLostError as exc:  # its request may have begun: a crash, not "never ran"
                return crash_outcome(request, ExitStatus.unknown(), None, reason=str(exc))
            except WorkerStartError as exc:
                return start_failed_outcome(request, str(exc))
            if attempt.finished:  # cancelled or closed while the worker was being forked
                kind = attempt.event.result()
                child.kill()
                await child.wait_exit(self._exit_wait)
                if kind == CANCEL:
                    return cancelled_outcome(request, None)
                return closed_outcome(request)
            child.on_frame = attempt.on_frame
            child.on_eof = lambda: attempt.signal(EXIT)
            self._watch_exit(child, lambda: attempt.signal(EXIT))
            self._arm_timeout(attempt)
            kind = await attempt.event
            outcome, _ = await self._conclude(attempt, kind, child)
            # The worker exits right after its result; give it a moment, then kill it.
            if child.alive and await child.wait_exit(self._exit_wait) is None:
                child.kill()
                await child.wait_exit(self._exit_wait)
            return outcome
        finally:
            if child is not None:
                if child.alive:
                    child.kill()
                child.close()
            self._end(attempt)

    async def close(self) -> None:
        """Stop running attempts (outcome ``ExecutorClosed``), then the fork server; bounded."""
        if self._closed:
            return
        self._closed = True
        await self._close_common()
