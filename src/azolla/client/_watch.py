"""One shared WatchTasks stream for every waiter of a client.

Each ``TaskHandle.wait()`` registers a future under its task id. A single pump task owns one
bidirectional ``WatchTasks`` stream: ids registered during one event-loop iteration leave in one
request message, and each response may carry the outcomes of many tasks. If the stream breaks,
the pump reopens it with backoff and sends again every id still awaited; it gives up (failing
the waiters with :class:`~azolla.errors.AzollaConnectionError`) after ``max_reconnects``
consecutive failed attempts. Against a server without ``WatchTasks`` (UNIMPLEMENTED, e.g. the
original orchestrator) each awaited task falls back to long-polling ``WaitForTask``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2
from azolla.client._results import TaskResult, decode_result
from azolla.client._transport import Transport, translate_rpc_error
from azolla.errors import (
    AzollaConnectionError,
    AzollaError,
    ClientClosedError,
    ServerError,
    TaskNotFoundError,
    WaitTimeoutError,
)

__all__ = ["WatchMux"]

_log = logging.getLogger(__name__)

_COMPLETED = orchestrator_pb2.WAIT_FOR_TASK_STATUS_COMPLETED
_NOT_FOUND = orchestrator_pb2.WAIT_FOR_TASK_STATUS_TASK_NOT_FOUND
_TIMEOUT = orchestrator_pb2.WAIT_FOR_TASK_STATUS_TIMEOUT
_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
#: Most task ids sent in one WatchTasksRequest.
MAX_IDS_PER_MESSAGE = 10_000
#: A stream that lived this long before breaking counts as having worked (resets the count).
_HEALTHY_STREAM_SECONDS = 5.0
#: Server-side wait of one WaitForTask long poll (fallback), in milliseconds.
_POLL_WAIT_MS = 30_000


class _StreamBroken(Exception):
    """The stream ended or broke; reconnect."""

    def __init__(self, error: grpc.RpcError | None = None) -> None:
        super().__init__("stream broken")
        self.error = error


class WatchMux:
    """Multiplexes every ``wait()`` of one client over one ``WatchTasks`` stream.

    Args:
        transport: The client's transport.
        max_reconnects: Consecutive failed (re)connections before waiters fail.
        backoff_initial: First reconnect delay in seconds (doubles, with jitter).
        backoff_max: Largest reconnect delay in seconds.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_reconnects: int = 10,
        backoff_initial: float = 0.05,
        backoff_max: float = 3.0,
    ) -> None:
        self._transport = transport
        self._max_reconnects = max_reconnects
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._waiters: dict[str, list[asyncio.Future[TaskResult]]] = {}
        self._domain_of: dict[str, str] = {}
        self._unsent: dict[str, None] = {}
        self._wake: asyncio.Event | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._unsupported = False
        self._closed = False
        #: Streams opened (1 + reconnects).
        self.streams_opened = 0
        #: WatchTasksRequest messages sent.
        self.messages_sent = 0

    @property
    def awaited(self) -> int:
        """Number of distinct task ids currently awaited."""
        return len(self._waiters)

    async def wait(self, task_id: str, domain: str, timeout: float | None) -> TaskResult:
        """Wait for the terminal outcome of ``task_id``.

        Raises:
            WaitTimeoutError: ``timeout`` seconds passed first.
            TaskNotFoundError: The server knows no such task.
            AzollaConnectionError: The stream could not be kept up.
            ClientClosedError: The client was closed.
        """
        if self._closed:
            raise ClientClosedError("the client is closed")
        future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        self._add(task_id, domain, future)
        try:
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise WaitTimeoutError(
                f"task {task_id} did not finish within {timeout:g} s (it goes on running)",
                task_id=task_id,
                timeout=timeout,
            ) from None
        finally:
            self._remove(task_id, future)

    def _add(self, task_id: str, domain: str, future: asyncio.Future[TaskResult]) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            waiters.append(future)
            return
        self._waiters[task_id] = [future]
        self._domain_of[task_id] = domain
        if self._unsupported:
            self._start_poller(task_id)
            return
        self._unsent[task_id] = None
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        elif self._wake is not None:
            self._wake.set()

    def _remove(self, task_id: str, future: asyncio.Future[TaskResult]) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is None:
            return
        with contextlib.suppress(ValueError):
            waiters.remove(future)
        if not waiters:
            self._forget(task_id)

    def _forget(self, task_id: str) -> list[asyncio.Future[TaskResult]]:
        self._domain_of.pop(task_id, None)
        self._unsent.pop(task_id, None)
        poller = self._pollers.pop(task_id, None)
        if poller is not None and poller is not asyncio.current_task():
            poller.cancel()
        return self._waiters.pop(task_id, [])

    def _resolve(self, task_id: str, outcome: TaskResult | AzollaError) -> None:
        for future in self._forget(task_id):
            if future.done():
                continue
            if isinstance(outcome, AzollaError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _deliver(self, outcome: orchestrator_pb2.TaskOutcome) -> None:
        task_id = outcome.task_id
        if task_id not in self._waiters:
            return
        if outcome.status_code == _COMPLETED:
            self._resolve(task_id, decode_result(task_id, outcome, outcome.state))
        elif outcome.status_code == _NOT_FOUND:
            self._resolve(task_id, _not_found(task_id, self._domain_of.get(task_id, "")))
        else:
            name = orchestrator_pb2.WaitForTaskStatus.Name(outcome.status_code)
            self._resolve(task_id, ServerError(f"waiting for task {task_id} failed: {name}"))

    def _fail_all(self, error: AzollaError) -> None:
        for task_id in list(self._waiters):
            self._resolve(task_id, error)

    # -- the stream -------------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        bound = min(self._backoff_max, self._backoff_initial * 2.0 ** max(failures - 1, 0))
        return bound / 2 + random.uniform(0, bound / 2)  # jitter, not cryptography

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        failures = 0
        while self._waiters and not self._closed and not self._unsupported:
            opened_at = loop.time()
            try:
                got_answer = await self._run_stream()
                if not self._waiters:
                    return  # the server ended the stream and nobody waits: stop until needed
                error: grpc.RpcError | None = None
            except _StreamBroken as broken:
                got_answer = False
                error = broken.error
            except grpc.RpcError as exc:  # could not even open it
                got_answer, error = False, exc
            except ClientClosedError:
                return
            except Exception as exc:  # a bug or misuse: fail the waiters rather than hang them
                _log.exception("WatchTasks pump failed")
                failure = exc if isinstance(exc, AzollaError) else AzollaError(str(exc))
                self._fail_all(failure)
                return
            if error is not None and isinstance(error, grpc.aio.AioRpcError):
                code = error.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    _log.info("server has no WatchTasks; falling back to WaitForTask long polls")
                    self._unsupported = True
                    for task_id in list(self._waiters):
                        self._start_poller(task_id)
                    return
                if code in _FATAL_CODES:
                    self._fail_all(translate_rpc_error(error, "watch tasks"))
                    return
            healthy = got_answer or loop.time() - opened_at >= _HEALTHY_STREAM_SECONDS
            failures = 1 if healthy else failures + 1
            if failures > self._max_reconnects:
                reason = (
                    translate_rpc_error(error, "waiting for tasks", endpoint=self._endpoint)
                    if error is not None
                    else AzollaConnectionError(
                        f"waiting for tasks failed: the server kept closing the stream "
                        f"[orchestrator {self._endpoint}]",
                        code="UNAVAILABLE",
                    )
                )
                if not isinstance(reason, AzollaConnectionError):
                    reason = AzollaConnectionError(reason.message, code=reason.code)
                self._fail_all(reason)
                return
            await asyncio.sleep(self._backoff(failures))

    @property
    def _endpoint(self) -> str:
        return self._transport.endpoint.url

    async def _run_stream(self) -> bool:
        """Run one stream until it ends; return whether any answer came.

        Raises:
            _StreamBroken: The stream failed or ended while tasks were still awaited.
        """
        stub = self._transport.stub()
        # Not wait_for_ready: while the server is down the call fails fast, and the pump's own
        # bounded backoff decides how long to keep trying.
        call = stub.WatchTasks(metadata=self._transport.metadata)
        self._transport.calls["WatchTasks"] += 1
        self.streams_opened += 1
        assert self._wake is not None
        self._unsent = dict.fromkeys(self._waiters)
        self._wake.set()
        write_failed: list[BaseException] = []
        writer = asyncio.get_running_loop().create_task(self._write(call, write_failed))
        got_answer = False
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if write_failed and current is not None and not current.cancelling():
                        raise _StreamBroken() from write_failed[0]
                    raise
                except grpc.RpcError as exc:
                    raise _StreamBroken(exc) from exc
                if not isinstance(response, orchestrator_pb2.WatchTasksResponse):  # EOF
                    if self._waiters:
                        raise _StreamBroken()
                    return got_answer
                got_answer = True
                for outcome in response.outcomes:
                    self._deliver(outcome)
        finally:
            writer.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[
            orchestrator_pb2.WatchTasksRequest, orchestrator_pb2.WatchTasksResponse
        ],
        failed: list[BaseException],
    ) -> None:
        assert self._wake is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._unsent:
                    continue
                ids, self._unsent = list(self._unsent), {}
                by_domain: dict[str, list[str]] = {}
                for task_id in ids:
                    domain = self._domain_of.get(task_id)
                    if domain is not None:
                        by_domain.setdefault(domain, []).append(task_id)
                for domain, task_ids in by_domain.items():
                    for start in range(0, len(task_ids), MAX_IDS_PER_MESSAGE):
                        chunk = task_ids[start : start + MAX_IDS_PER_MESSAGE]
                        await call.write(
                            orchestrator_pb2.WatchTasksRequest(domain=domain, task_ids=chunk)
                        )
                        self.messages_sent += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broken stream: make the reader reconnect
            failed.append(exc)
            call.cancel()

    # -- fallback: WaitForTask long polls ----------------------------------------------------

    def _start_poller(self, task_id: str) -> None:
        if task_id not in self._pollers:
            task = asyncio.get_running_loop().create_task(self._poll(task_id))
            self._pollers[task_id] = task

    async def _poll(self, task_id: str) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while task_id in self._waiters and not self._closed:
            domain = self._domain_of.get(task_id, "")
            request = orchestrator_pb2.WaitForTaskRequest(
                task_id=task_id, domain=domain, timeout_ms=_POLL_WAIT_MS
            )
            started = loop.time()
            try:
                stub = self._transport.stub()
                self._transport.calls["WaitForTask"] += 1
                response = await stub.WaitForTask(
                    request,
                    timeout=_POLL_WAIT_MS / 1000 + self._transport.timeout,
                    metadata=self._transport.metadata,
                    wait_for_ready=True,
                )
            except ClientClosedError:
                return
            except grpc.RpcError as exc:
                healthy = loop.time() - started >= _HEALTHY_STREAM_SECONDS
                failures = 1 if healthy else failures + 1
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                if failures > self._max_reconnects or code in _FATAL_CODES:
                    self._resolve(
                        task_id,
                        translate_rpc_error(
                            exc, f"wait for task {task_id}", endpoint=self._endpoint
                        ),
                    )
                    return
                await asyncio.sleep(self._backoff(failures))
                continue
            failures = 0
            status = response.status_code
            if status == _COMPLETED:
                self._resolve(task_id, decode_result(task_id, response, response.state))
                return
            if status == _NOT_FOUND:
                self._resolve(task_id, _not_found(task_id, domain))
                return
            if status != _TIMEOUT:
                name = orchestrator_pb2.WaitForTaskStatus.Name(status)
                self._resolve(task_id, ServerError(f"waiting for task {task_id} failed: {name}"))
                return

    async def close(self) -> None:
        """Stop the stream and fail every waiter with :class:`ClientClosedError`."""
        self._closed = True
        self._fail_all(ClientClosedError("the client was closed while waiting"))
        tasks = [t for t in (self._pump, *self._pollers.values()) if t is not None]
        self._pollers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _not_found(task_id: str, domain: str) -> TaskNotFoundError:
    return TaskNotFoundError(f"task {task_id} does not exist in domain {domain!r}", task_id=task_id)
