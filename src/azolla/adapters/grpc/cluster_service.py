"""``azolla.orchestrator.ClusterService``: the long-lived stream every shepherd holds.

Protocol (see ``docs/wire.md``):

1. The shepherd's first message must be ``Hello`` (else ``FAILED_PRECONDITION``), sent within
   ``hello_timeout`` seconds (else ``DEADLINE_EXCEEDED``). The server
   registers the shepherd with the orchestrator and answers ``HelloAck`` (heartbeat interval and
   timeout, and the reported attempts the shepherd must stop).
2. The server pushes attempts: shepherds whose Hello says ``accepts_batches`` get ``TaskBatch``
   messages (many tasks per message), others one ``task`` per message. It also sends
   ``CancelAttempt`` and, every ``ping_interval`` seconds, ``Ping``.
3. The shepherd sends ``Status`` (its heartbeat), ``Ack``/``AckBatch`` (attempt started) and
   ``task_result``/``task_results``. Every message counts as a sign of life; each message's
   results are recorded with one orchestrator call (so a batch is one decision, one commit).
4. When the stream ends -- the shepherd half-closes, the connection breaks, the RPC is cancelled
   -- the orchestrator is told, and the attempts the shepherd was running are lost and retried.
   A silent stream is closed by the orchestrator after the heartbeat timeout
   (``ShepherdTransport.close``), which ends the response stream. When the *server* shuts down,
   streams are closed without that: the shepherds reconnect to the next server, which
   reconciles the attempts they still run.

If recording a message's results fails (the database is unavailable), the call is retried with
backoff for ``report_retry_seconds``; if it still fails, the stream is closed, so the attempts
are retried rather than left running forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from azolla.adapters.grpc import convert
from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc
from azolla.adapters.grpc.status import abort_for
from azolla.domain.errors import StoreOverloaded, StoreUnavailable
from azolla.domain.ports import ExecutionRequest

if TYPE_CHECKING:
    from azolla.app.model import ReportedOutcome
    from azolla.app.orchestrator import Orchestrator, ShepherdSession

__all__ = ["ClusterService", "GrpcShepherdTransport"]

log = logging.getLogger("azolla.grpc.cluster")

Context = grpc.aio.ServicerContext[Any, Any]

#: Most tasks in one ``TaskBatch`` message.
MAX_TASKS_PER_MESSAGE = 1000
#: Most result/ack calls of one stream waiting for their commit at once.
MAX_IN_FLIGHT = 128


class _Close:
    """Queue marker: end the response stream."""


_CLOSE = _Close()
_Item = orchestrator_pb2.ServerMsg | list[ExecutionRequest] | _Close


class GrpcShepherdTransport:
    """The :class:`~azolla.domain.ports.ShepherdTransport` of one ClusterService stream.

    Outgoing messages wait in an :class:`asyncio.Queue` that the stream's response iterator
    (:meth:`messages`) drains; everything queued together is coalesced, so the attempts of
    several pushes go out in as few ``TaskBatch`` messages as possible.

    Args:
        shepherd_id: The shepherd's id.
        accepts_batches: Whether to send ``TaskBatch`` messages.
        max_tasks_per_message: Most tasks in one ``TaskBatch``.
    """

    def __init__(self, shepherd_id: str, accepts_batches: bool,
                 max_tasks_per_message: int = MAX_TASKS_PER_MESSAGE) -> None:
        self._shepherd_id = shepherd_id
        self.accepts_batches = accepts_batches
        self.max_tasks_per_message = max(1, max_tasks_per_message)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.closed_reason: str | None = None

    @property
    def shepherd_id(self) -> str:
        """The shepherd this transport reaches."""
        return self._shepherd_id

    async def push(self, tasks: Sequence[ExecutionRequest]) -> None:
        """Queue attempts for the shepherd (dropped once closed: the disconnect retries them)."""
        if self.closed_reason is None and tasks:
            self._queue.put_nowait(list(tasks))

    async def cancel(self, task_id: str, attempt: int, reason: str) -> None:
        """Queue a ``CancelAttempt``."""
        self.send(orchestrator_pb2.ServerMsg(cancel=orchestrator_pb2.CancelAttempt(
            task_id=task_id, attempt_number=attempt, reason=reason)))

    async def close(self, reason: str) -> None:
        """End the response stream after what is already queued."""
        self.close_now(reason)

    def close_now(self, reason: str) -> None:
        """Synchronous :meth:`close`."""
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.put_nowait(_CLOSE)

    def send(self, message: orchestrator_pb2.ServerMsg) -> None:
        """Queue any server message (ignored once closed)."""
        if self.closed_reason is None:
            self._queue.put_nowait(message)

    async def messages(self) -> AsyncIterator[orchestrator_pb2.ServerMsg]:
        """Yield the messages to send, until :meth:`close`."""
        queue = self._queue
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            tasks: list[ExecutionRequest] = []
            for item in items:
                if isinstance(item, list):
                    tasks.extend(item)
                    continue
                for message in self._task_messages(tasks):
                    yield message
                tasks = []
                if isinstance(item, _Close):
                    return
                yield item
            for message in self._task_messages(tasks):
                yield message

    def _task_messages(self, tasks: list[ExecutionRequest]) -> list[orchestrator_pb2.ServerMsg]:
        if not tasks:
            return []
        protos = [convert.execution_request_to_proto(t) for t in tasks]
        if not self.accepts_batches:
            return [orchestrator_pb2.ServerMsg(task=t) for t in protos]
        size = self.max_tasks_per_message
        return [orchestrator_pb2.ServerMsg(tasks=orchestrator_pb2.TaskBatch(
            tasks=protos[i:i + size])) for i in range(0, len(protos), size)]


class ClusterService(orchestrator_pb2_grpc.ClusterServiceServicer):
    """Servicer of ``ClusterService.Stream`` over an :class:`~azolla.app.orchestrator.Orchestrator`.

    Args:
        orchestrator: The running orchestrator.
        ping_interval: Seconds between server ``Ping`` messages on each stream.
        report_retry_seconds: How long to keep retrying to record a message's results while
            the store is unavailable, before closing the stream.
        max_tasks_per_message: Most tasks in one ``TaskBatch``.
        hello_timeout: Seconds a new stream may take to send its ``Hello``; a stream that
            stays silent longer is ended with ``DEADLINE_EXCEEDED``.
    """

    def __init__(self, orchestrator: Orchestrator, *, ping_interval: float = 5.0,
                 report_retry_seconds: float = 30.0,
                 max_tasks_per_message: int = MAX_TASKS_PER_MESSAGE,
                 hello_timeout: float = 10.0) -> None:
        self.orchestrator = orchestrator
        self.ping_interval = ping_interval
        self.report_retry_seconds = report_retry_seconds
        self.max_tasks_per_message = max_tasks_per_message
        self.hello_timeout = hello_timeout
        self._transports: set[GrpcShepherdTransport] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._draining = False

    @property
    def stream_count(self) -> int:
        """Open shepherd streams."""
        return len(self._transports)

    def drain(self, reason: str = "the server is shutting down") -> None:
        """Close every stream *without* ending the shepherds' attempts.

        Used at shutdown: the shepherds reconnect to the next server, which reconciles what
        they still run. New streams are refused with ``UNAVAILABLE`` from now on.
        """
        self._draining = True
        for transport in list(self._transports):
            transport.close_now(reason)

    async def Stream(
        self, request_iterator: AsyncIterator[orchestrator_pb2.ClientMsg], context: Context
    ) -> AsyncIterator[orchestrator_pb2.ServerMsg]:
        """Serve one shepherd stream (see the module docstring)."""
        incoming = aiter(request_iterator)
        try:
            async with asyncio.timeout(self.hello_timeout):
                first = await anext(incoming)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Hello within {self.hello_timeout:g} s of opening the "
                                "ClusterService stream")
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message on a ClusterService stream must be Hello, "
                                f"got {first.WhichOneof('kind') or 'an empty message'}")
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        orchestrator = self.orchestrator
        try:
            hello = convert.hello_from_proto(first.hello)
            transport = GrpcShepherdTransport(hello.shepherd_uuid, hello.accepts_batches,
                                              self.max_tasks_per_message)
            session = await orchestrator.connect_shepherd(hello, transport)
        except Exception as exc:
            await abort_for(context, exc, "ClusterService.Stream (Hello)")
        self._transports.add(transport)
        log.info("shepherd %s connected (domain %s, group %s, capacity %d%s)",
                 hello.shepherd_uuid, hello.domain, hello.group, hello.capacity,
                 ", batches" if hello.accepts_batches else "")
        reader = asyncio.create_task(self._read(incoming, session, transport),
                                     name=f"azolla-shepherd-in-{hello.shepherd_uuid}")
        pinger = asyncio.create_task(self._ping(transport),
                                     name=f"azolla-shepherd-ping-{hello.shepherd_uuid}")
        try:
            config = orchestrator.config
            yield orchestrator_pb2.ServerMsg(hello_ack=orchestrator_pb2.HelloAck(
                heartbeat_interval_ms=int(config.heartbeat_interval * 1000),
                heartbeat_timeout_ms=int(config.heartbeat_timeout * 1000),
                cancel=[orchestrator_pb2.RunningAttempt(task_id=t, attempt_number=n)
                        for t, n in session.cancel_on_connect]))
            async for message in transport.messages():
                yield message
        finally:
            reader.cancel()
            pinger.cancel()
            self._transports.discard(transport)
            reason = transport.closed_reason or "the stream ended"
            transport.close_now(reason)
            if not self._draining and not session.closed:
                self._spawn(orchestrator.disconnect_shepherd(session, reason))
            log.info("shepherd %s disconnected: %s", hello.shepherd_uuid, reason)

    # -- incoming ------------------------------------------------------------------------------

    async def _read(self, incoming: AsyncIterator[orchestrator_pb2.ClientMsg],
                    session: ShepherdSession, transport: GrpcShepherdTransport) -> None:
        orchestrator = self.orchestrator
        reason = "the shepherd closed the stream"
        in_flight: set[asyncio.Task[None]] = set()
        draining = False
        try:
            async for message in incoming:
                orchestrator.heartbeat(session)
                kind = message.WhichOneof("kind")
                call: Any = None
                if kind == "task_result":
                    call = self._report(session, transport,
                                        [convert.reported_outcome_from_proto(message.task_result)])
                elif kind == "task_results":
                    call = self._report(session, transport, [
                        convert.reported_outcome_from_proto(r)
                        for r in message.task_results.results])
                elif kind == "ack":
                    call = self._ack(session, [(message.ack.task_id, message.ack.attempt_number)])
                elif kind == "acks":
                    call = self._ack(session, [(a.task_id, a.attempt_number)
                                               for a in message.acks.acks])
                elif kind == "status" and message.status.draining and not draining:
                    draining = True
                    call = orchestrator.drain_shepherd(session)
                elif kind == "hello":
                    reason = "protocol error: a second Hello on one stream"
                    break
                if call is None:
                    continue  # Status (the heartbeat) or an unknown extension
                task = asyncio.ensure_future(call)
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"the stream failed: {exc}"
        transport.close_now(reason)

    async def _report(self, session: ShepherdSession, transport: GrpcShepherdTransport,
                      results: list[ReportedOutcome]) -> None:
        if not results:
            return
        deadline = time.monotonic() + self.report_retry_seconds
        delay = 0.05
        while True:
            try:
                await self.orchestrator.report_results(session, results)
                return
            except (StoreUnavailable, StoreOverloaded) as exc:
                if session.closed or time.monotonic() + delay > deadline:
                    log.warning("could not record %d result(s) of shepherd %s: %s; closing its "
                                "stream so the attempts are retried", len(results),
                                transport.shepherd_id, exc.message)
                    transport.close_now(f"could not record results: {exc.message}")
                    return
            except Exception:
                log.exception("recording results of shepherd %s failed", transport.shepherd_id)
                transport.close_now("could not record results (internal error)")
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _ack(self, session: ShepherdSession, acks: list[tuple[str, int]]) -> None:
        try:
            await self.orchestrator.report_acks(session, acks)
        except Exception as exc:  # an ack only marks an attempt running; losing one is harmless
            log.debug("acks of shepherd %s not recorded: %s", session.shepherd.shepherd_uuid, exc)

    # -- outgoing ------------------------------------------------------------------------------

    async def _ping(self, transport: GrpcShepherdTransport) -> None:
        while transport.closed_reason is None:
            await asyncio.sleep(self.ping_interval)
            transport.send(orchestrator_pb2.ServerMsg(
                ping=orchestrator_pb2.Ping(timestamp=int(time.time() * 1000))))

    def _spawn(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """Wait for pending disconnect notifications (used at shutdown and in tests)."""
        while self._background:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._background, return_exceptions=True)
