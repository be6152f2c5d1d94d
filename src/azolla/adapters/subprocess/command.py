"""``--worker-command``: run any executable that follows the worker command-line contract.

For every attempt the shepherd starts ``COMMAND --task-id <id> --name <name> --args <JSON array>
--kwargs <JSON object> --shepherd-endpoint http://127.0.0.1:<port>`` (``WIRE.md``). The worker
runs the one task, calls ``azolla.shepherd.Worker/ReportResult`` on that endpoint (served here,
on loopback, port chosen by the system) and exits.

With ``task_via_stdin=True`` (for ``azolla-worker``, preferred: argv is visible to other users
and bounded in size) ``--args``/``--kwargs`` are left out and the task arrives on stdin as one
JSON object ``{"task_id", "attempt", "name", "args", "kwargs", "domain", "report_token"}``; the
worker must then send ``report_token`` in the ``azolla-report-token`` metadata of its report.

The worker runs in its own session and process group with a clean environment; resource limits
are applied with ``prlimit(1)`` when it is installed. Its stdout and stderr are captured (tail).
A worker that exits without reporting fails the attempt with ``WorkerCrashed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from grpc import aio as grpc_aio

from azolla.adapters.grpc.pb import shepherd_pb2, shepherd_pb2_grpc
from azolla.adapters.subprocess._base import AttemptAlreadyRunning
from azolla.adapters.subprocess._forkclient import signal_group
from azolla.adapters.subprocess._outcomes import (
    ExitStatus,
    cancelled_outcome,
    closed_outcome,
    crash_outcome,
    start_failed_outcome,
    timeout_outcome,
)
from azolla.adapters.subprocess._output import OutputTail
from azolla.adapters.subprocess.limits import ResourceLimits, _effective_memory, scrub_environment
from azolla.adapters.subprocess.wire import REPORT_TOKEN_METADATA, task_result_to_outcome
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest

__all__ = ["CommandExecutor"]

_log = logging.getLogger(__name__)

_REPORTED = "reported"
_EXITED = "exited"
_TIMEOUT = "timeout"
_CANCEL = "cancel"
_CLOSED = "closed"


@dataclass(slots=True)
class _CommandAttempt:
    request: ExecutionRequest
    token: str | None
    event: asyncio.Future[str]
    reported: asyncio.Future[None]
    outcome: ExecutionOutcome | None = None
    tail: OutputTail = field(default_factory=OutputTail)

    def signal(self, kind: str) -> None:
        if not self.event.done():
            self.event.set_result(kind)


class _WorkerService(shepherd_pb2_grpc.WorkerServicer):
    """``azolla.shepherd.Worker``: receives results from worker commands."""

    def __init__(self, attempts: dict[str, _CommandAttempt]) -> None:
        self._attempts = attempts

    async def ReportResult(
        self,
        request: shepherd_pb2.ReportResultRequest,
        context: grpc_aio.ServicerContext[
            shepherd_pb2.ReportResultRequest, shepherd_pb2.ReportResultResponse
        ],
    ) -> shepherd_pb2.ReportResultResponse:
        task_id = request.task_id or request.result.task_id
        attempt = self._attempts.get(task_id)
        if attempt is None:
            return shepherd_pb2.ReportResultResponse(
                success=False, message=f"no attempt of task {task_id!r} is running here"
            )
        reported_attempt = request.result.attempt_number
        if reported_attempt and reported_attempt != attempt.request.attempt:
            return shepherd_pb2.ReportResultResponse(
                success=False,
                message=f"attempt {reported_attempt} is not the running attempt "
                f"({attempt.request.attempt})",
            )
        if attempt.token is not None:
            metadata = dict(context.invocation_metadata() or ())
            if metadata.get(REPORT_TOKEN_METADATA) != attempt.token:
                return shepherd_pb2.ReportResultResponse(
                    success=False, message="missing or wrong report token"
                )
        if attempt.outcome is not None or attempt.event.done():
            return shepherd_pb2.ReportResultResponse(
                success=False, message="a result was already reported for this attempt"
            )
        attempt.outcome = task_result_to_outcome(
            request.result, attempt.request.task_id, attempt.request.attempt
        )
        if not attempt.reported.done():
            attempt.reported.set_result(None)
        attempt.signal(_REPORTED)
        return shepherd_pb2.ReportResultResponse(success=True, message="")


class CommandExecutor:
    """Runs each attempt as ``command`` + the worker contract's options (an ``AttemptExecutor``).

    Args:
        command: The program and its own leading arguments, e.g.
            ``["azolla-worker", "--tasks", "myapp.tasks"]`` (never run through a shell).
        task_via_stdin: Send the task on stdin instead of ``--args``/``--kwargs`` (only for
            workers that support it, like ``azolla-worker``).
        limits: Resource limits (applied with ``prlimit`` when available).
        default_timeout: Timeout for requests that carry none (None: no timeout).
        kill_grace: Seconds between SIGTERM and SIGKILL when an attempt is stopped.
        env: Base environment (default ``os.environ``), cleaned.
        allow_env: Variable names passed on although the clean-environment rule drops them
            (default: ``AZOLLA_TASKS``, which ``azolla-worker`` reads).
        extra_env: Variables added to the workers' environment.
        output_tail_bytes: Output bytes kept for the failure record.
        output_tail_lines: Output lines kept for the failure record.
        host: Loopback address the ``Worker`` service binds to.
        report_grace: Seconds to wait for a report after the worker exited, and for the worker
            to exit after it reported.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        task_via_stdin: bool = False,
        limits: ResourceLimits | None = None,
        default_timeout: float | None = None,
        kill_grace: float = 2.0,
        env: Mapping[str, str] | None = None,
        allow_env: Iterable[str] = ("AZOLLA_TASKS",),
        extra_env: Mapping[str, str] | None = None,
        output_tail_bytes: int = 8192,
        output_tail_lines: int = 50,
        host: str = "127.0.0.1",
        report_grace: float = 0.5,
    ) -> None:
        if not command:
            raise ValueError("the worker command is empty")
        self.command = list(command)
        self.task_via_stdin = task_via_stdin
        self.limits = limits
        self.default_timeout = default_timeout
        self.kill_grace = kill_grace
        self.env = scrub_environment(
            os.environ if env is None else env, allow=allow_env, extra=extra_env
        )
        self.output_tail_bytes = output_tail_bytes
        self.output_tail_lines = output_tail_lines
        self.host = host
        self.report_grace = report_grace
        self._attempts: dict[str, _CommandAttempt] = {}
        self._server: grpc_aio.Server | None = None
        self._port = 0
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._prlimit = shutil.which("prlimit")
        self._warned_prlimit = False

    @property
    def endpoint(self) -> str:
        """The ``--shepherd-endpoint`` given to workers (empty before :meth:`start`)."""
        return f"http://{self.host}:{self._port}" if self._port else ""

    async def start(self) -> None:
        """Start the ``Worker`` gRPC service on loopback (otherwise the first attempt does)."""
        if self._server is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._server is not None:
                return
            server = grpc_aio.server()
            shepherd_pb2_grpc.add_WorkerServicer_to_server(_WorkerService(self._attempts), server)
            port = server.add_insecure_port(f"{self.host}:0")
            await server.start()
            self._port = port
            self._server = server

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt as a worker command and return its outcome.

        Never raises for task failures.

        Raises:
            AttemptAlreadyRunning: When an attempt of the same task is already running here
                (reports are matched by task id).
        """
        if self._closed:
            return closed_outcome(request)
        if request.task_id in self._attempts:
            raise AttemptAlreadyRunning(f"an attempt of task {request.task_id} is already running")
        await self.start()
        loop = asyncio.get_running_loop()
        attempt = _CommandAttempt(
            request=request,
            token=secrets.token_urlsafe(24) if self.task_via_stdin else None,
            event=loop.create_future(),
            reported=loop.create_future(),
            tail=OutputTail(self.output_tail_bytes, self.output_tail_lines),
        )
        self._attempts[request.task_id] = attempt
        self._drained.clear()
        try:
            return await self._run(attempt)
        finally:
            self._attempts.pop(request.task_id, None)
            if not self._attempts:
                self._drained.set()

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """Stop a running attempt (its outcome becomes ``Cancelled``).

        Returns:
            True if the attempt was running.
        """
        entry = self._attempts.get(task_id)
        if entry is None or entry.request.attempt != attempt or entry.event.done():
            return False
        entry.signal(_CANCEL)
        return True

    async def close(self) -> None:
        """Stop every running worker (outcome ``ExecutorClosed``) and the gRPC service."""
        if self._closed:
            return
        self._closed = True
        for attempt in list(self._attempts.values()):
            attempt.signal(_CLOSED)
        if self._attempts:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.kill_grace + 10.0)
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    # -- internals -------------------------------------------------------------------------

    def _argv(self, request: ExecutionRequest) -> list[str]:
        argv = [
            *self.command,
            "--task-id",
            request.task_id,
            "--name",
            request.name,
        ]
        if not self.task_via_stdin:
            argv += ["--args", request.args or "[]", "--kwargs", request.kwargs or "{}"]
        argv += ["--shepherd-endpoint", self.endpoint]
        memory = _effective_memory(
            self.limits.memory_bytes if self.limits else None, request.memory_limit
        )
        limits = self.limits or (ResourceLimits() if memory is not None else None)
        if limits is not None:
            if self._prlimit is not None:
                return [self._prlimit, *limits.prlimit_args(memory), "--", *argv]
            if not self._warned_prlimit:
                self._warned_prlimit = True
                _log.warning("prlimit(1) not found: worker commands run without resource limits")
        return argv

    def _stdin_payload(self, attempt: _CommandAttempt) -> bytes:
        request = attempt.request
        return orjson.dumps(
            {
                "task_id": request.task_id,
                "attempt": request.attempt,
                "name": request.name,
                "args": request.args or "[]",
                "kwargs": request.kwargs or "{}",
                "domain": request.domain,
                "report_token": attempt.token,
            }
        )

    async def _run(self, attempt: _CommandAttempt) -> ExecutionOutcome:
        request = attempt.request
        timeout = request.timeout if request.timeout is not None else self.default_timeout
        if timeout is not None and timeout <= 0:
            timeout = None
        memory = _effective_memory(
            self.limits.memory_bytes if self.limits else None, request.memory_limit
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(request),
                stdin=asyncio.subprocess.PIPE
                if self.task_via_stdin
                else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            return start_failed_outcome(request, f"cannot run {self.command[0]!r}: {exc}")
        helpers: list[asyncio.Task[None]] = []
        assert proc.stdout is not None
        helpers.append(asyncio.create_task(_pump(proc.stdout, attempt.tail)))
        if self.task_via_stdin and proc.stdin is not None:
            helpers.append(asyncio.create_task(_feed(proc.stdin, self._stdin_payload(attempt))))
        exited = asyncio.ensure_future(proc.wait())
        exited.add_done_callback(lambda _f: attempt.signal(_EXITED))
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, attempt.signal, _TIMEOUT) if timeout is not None else None
        try:
            kind = await attempt.event
            if timer is not None:
                timer.cancel()
            if kind == _EXITED and attempt.outcome is None:
                # A report may still be on its way (workers that do not wait for the reply).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(attempt.reported), self.report_grace)
            if kind in (_TIMEOUT, _CANCEL, _CLOSED):
                await _terminate(proc, self.kill_grace)
            elif not exited.done():
                # Reported: give the worker a moment to exit on its own.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), self.report_grace)
                if not exited.done():
                    await _terminate(proc, self.kill_grace)
            signal_group(proc.pid, signal.SIGKILL)  # whatever the worker left behind
            await asyncio.wait(helpers, timeout=1.0)
            if kind == _TIMEOUT:
                assert timeout is not None
                return timeout_outcome(request, timeout, attempt.tail)
            if kind == _CANCEL:
                return cancelled_outcome(request, attempt.tail)
            if kind == _CLOSED:
                return closed_outcome(request)
            if attempt.outcome is not None:
                return attempt.outcome
            code = proc.returncode
            status = (
                ExitStatus(code=None, signal=-code)
                if code is not None and code < 0
                else ExitStatus(code=code, signal=None)
            )
            return crash_outcome(
                request,
                status,
                attempt.tail,
                memory_limit=memory,
                reason="the worker exited without reporting a result",
                pid=proc.pid,
            )
        finally:
            if timer is not None:
                timer.cancel()
            if proc.returncode is None:
                signal_group(proc.pid, signal.SIGKILL)
            for helper in helpers:
                helper.cancel()
            if not exited.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), 5.0)


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        return
    signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)


async def _pump(stream: asyncio.StreamReader, tail: OutputTail) -> None:
    with contextlib.suppress(Exception):
        while True:
            data = await stream.read(1 << 16)
            if not data:
                return
            tail.feed(data)


async def _feed(stream: asyncio.StreamWriter, payload: bytes) -> None:
    with contextlib.suppress(Exception):
        stream.write(payload)
        await stream.drain()
        stream.close()
        await stream.wait_closed()
