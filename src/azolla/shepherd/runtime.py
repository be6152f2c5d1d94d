"""The shepherd runtime: one connection to an orchestrator, many attempts in child processes.

:class:`ShepherdRuntime` keeps a ``ClusterService.Stream`` open to the orchestrator, runs every
attempt pushed to it through an :class:`~azolla.domain.ports.AttemptExecutor` (never more than
``concurrency`` at once) and reports the outcomes. The rules it follows:

**Hello.** Every connection starts with a ``Hello`` carrying the shepherd's id (fresh per boot,
the same across reconnects of one boot), its capacity, domain, group, version,
``accepts_batches=True`` and ``running``: every attempt it still holds, i.e. attempts that
are still executing *and* attempts whose outcome it has not delivered yet. The orchestrator's
``HelloAck`` gives the heartbeat interval and a ``cancel`` list: held attempts the
orchestrator no longer counts as this shepherd's (it recorded them as lost while the shepherd
was away, or they already have an outcome). Those are stopped and their outcomes dropped
without a report; every other held outcome is delivered. An orchestrator that sends no
``HelloAck`` within ``hello_ack_timeout`` (the original Rust orchestrator) is spoken to in the
original protocol: one ``task_result`` and one ``ack`` message each, no batches.

**Results are batched.** Outcomes go into an outbox; one writer task drains it and sends
everything waiting as one ``TaskResultBatch`` message (split at ``max_message_bytes``).
Outcomes that finish while a write is in flight therefore travel together in the next
message: there is no per-task stream message on the hot path. Under load, result messages
are written at most every ``result_interval`` (2 ms): the first outcome after a quiet spell
goes out at once, later ones wait at most that long and share a message (each stream write
costs the shepherd, and the orchestrator's reader, far more than a result in it).

**No task per attempt when the executor can avoid it.** An executor with a
``submit(request, done)`` method (the pool) is given each attempt with an outcome callback;
others are awaited in one task per attempt.

**Acks are lazy.** An attempt still running ``ack_delay`` (50 ms) after it started is
acknowledged, in one ``AckBatch`` with every other attempt that crossed the mark; attempts
that finish sooner are only reported. The ack moves the attempt from *assigned* to
*running* in the event log, so short attempts cost one event less.

**Heartbeats.** A ``Status`` (current load, free slots) every heartbeat interval.

**Cancel.** ``CancelAttempt`` stops the attempt through ``executor.cancel``; the executor's
``Cancelled`` outcome is reported (the orchestrator has already recorded the cancellation, so
the report is recorded as a confirmation, never applied as a result).

**Disconnects.** When the stream breaks, attempts keep running and their outcomes stay in the
outbox (bounded by ``max_buffered_results``; in practice by the attempts the shepherd held,
since no new work arrives while disconnected). Outcomes written during the last
``redeliver_window`` seconds of the broken stream are put back too: the write may not have
reached the orchestrator, and the Hello/HelloAck exchange tells which ones it still wants.
Reconnection: when a stream that had been up for a while (``stable_after``) breaks, the
shepherd tries again at once (a dropped connection to a live server costs nothing more). When
that fails it backs off exponentially with jitter, capped at ``reconnect_max_delay``, forever
until :meth:`ShepherdRuntime.stop`; while the orchestrator is merely unreachable
(``UNAVAILABLE``: nothing listens, as during a restart) each delay is also kept below a tenth
(``reconnect_proportion``) of the outage so far, so a restarted orchestrator is found within
about 10 % of its down time instead of up to 60 %. A refused connection costs the server
nothing; a server that answers with an error still gets the plain exponential backoff.

**Drain.** :meth:`ShepherdRuntime.stop` sends a ``Status`` with no free capacity at once and
waits up to ``drain_timeout`` for the attempts it holds to end. The wire contract has no way
yet to tell the orchestrator "no more work" (``Status`` is liveness only; the orchestrator
counts slots itself), so the shepherd protects its tasks in two ways: outcomes are *held*
until the last attempt ends and then sent in one final batch before the half-close
(reporting earlier would free slots that the orchestrator would refill with work the
shepherd is leaving), and attempts the orchestrator still assigns during the drain (into
slots that were free when it began) are run rather than refused (a refused attempt would be
recorded as lost and cost the task one of its attempts). Attempts still running at the drain
timeout are stopped and *not* reported: closing the stream makes the orchestrator record
them as lost and retry them (``InfrastructureError``). When the wire contract gains
``Status.draining``, the shepherd sets it and reports outcomes as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from azolla.adapters.grpc.pb import common_pb2 as cpb
from azolla.adapters.grpc.pb import orchestrator_pb2 as opb
from azolla.domain.ports import AttemptExecutor, ExecutionOutcome, ExecutionRequest
from azolla.shepherd._wire import request_from_task, result_from_outcome
from azolla.shepherd.connection import ConnectionLost, Connector, Link

__all__ = [
    "AttemptKey",
    "Backoff",
    "RuntimeConfig",
    "RuntimeState",
    "ShepherdRuntime",
]

log = logging.getLogger("azolla.shepherd")

#: ``(task_id, attempt_number)``.
AttemptKey = tuple[str, int]

#: Error type reported when the executor itself fails (not the task).
SHEPHERD_ERROR = "ShepherdError"
#: Error type reported instead of a result too large to send.
RESULT_TOO_LARGE = "ResultTooLarge"

# A ``Status`` field by which a shepherd tells the orchestrator it takes no more work. The wire
# contract does not have it yet; when it does, draining shepherds use it (see ``_stop``).
_DRAIN_FIELD = "draining"
_WIRE_HAS_DRAIN_SIGNAL = _DRAIN_FIELD in opb.Status.DESCRIPTOR.fields_by_name


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Tunables of a :class:`ShepherdRuntime`.

    Attributes:
        domain: Domain served.
        group: Shepherd group served.
        concurrency: Attempts run at once (``max_concurrency`` in the Hello).
        version: Software version announced in the Hello.
        ack_delay: Attempts still running this long after their start are acknowledged.
        drain_timeout: Default time running attempts get to finish on :meth:`stop`.
        reconnect_initial_delay: First reconnection delay (grows 1.6-fold up to the cap).
        reconnect_max_delay: Cap of the reconnection delay.
        reconnect_proportion: While the orchestrator is unreachable, no delay exceeds this
            share of the outage so far (nor goes below ``reconnect_initial_delay``); 0 turns
            it off.
        stable_after: A stream that ran this long before it broke is retried at once.
        max_buffered_results: Most undelivered outcomes kept; beyond it the oldest are dropped
            (the orchestrator then retries those attempts).
        hello_ack_timeout: How long to wait for a ``HelloAck`` before speaking the original
            (unbatched) protocol.
        default_heartbeat_interval: Status interval until the orchestrator says otherwise.
        redeliver_window: Outcomes sent this recently are offered again after a broken stream
            (at most ``max_buffered_results`` of them). It covers the time an orchestrator may
            hold a result before committing it (it retries a failing store for 30 s).
        max_message_bytes: Largest stream message written (batches are split below it).
        result_interval: Least time between two result messages (0: write whenever the
            writer is free); outcomes finishing in between travel in one message.
        max_result_bytes: A single result larger than this is replaced by a
            ``ResultTooLarge`` error (a larger message would be refused by the orchestrator
            and break the stream on every retry).
        delivery_timeout: After a drain, how long to keep trying to deliver held outcomes.
        kill_grace: After the drain timeout, how long stopped attempts get to end.
        close_timeout: After the final half-close, how long to wait for the orchestrator to
            end the stream.
        server_silence_timeout: Once the orchestrator has shown that it pings (every 5 s by
            default), a stream on which nothing arrives for this long is considered dead
            (a half-open TCP connection after a partition) and replaced.
    """

    domain: str = "default"
    group: str = "default"
    concurrency: int = 1
    version: str = ""
    ack_delay: float = 0.05
    drain_timeout: float = 30.0
    reconnect_initial_delay: float = 0.05
    reconnect_max_delay: float = 5.0
    reconnect_proportion: float = 0.1
    stable_after: float = 1.0
    max_buffered_results: int = 100_000
    hello_ack_timeout: float = 5.0
    default_heartbeat_interval: float = 2.0
    redeliver_window: float = 30.0
    max_message_bytes: int = 1024 * 1024
    result_interval: float = 0.002
    max_result_bytes: int = 3 * 1024 * 1024
    delivery_timeout: float = 15.0
    kill_grace: float = 10.0
    close_timeout: float = 5.0
    server_silence_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.reconnect_max_delay <= 0 or self.reconnect_initial_delay <= 0:
            raise ValueError("reconnect delays must be positive")
        if self.reconnect_proportion < 0:
            raise ValueError("reconnect_proportion must not be negative")
        if self.result_interval < 0:
            raise ValueError("result_interval must not be negative")
        if self.max_buffered_results < 1:
            raise ValueError("max_buffered_results must be at least 1")


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set.

    Uses :func:`asyncio.timeout` rather than :func:`asyncio.wait_for`, which on Python 3.11
    can swallow a cancellation that arrives as the awaited event fires.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def _wait_any(events: Iterable[asyncio.Event], timeout: float | None) -> None:
    """Wait until any of ``events`` is set, at most ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Backoff:
    """Exponential backoff with "equal jitter": each delay is uniform in [d/2, d].

    ``d`` starts at ``initial`` and grows by ``multiplier`` on every call up to ``cap``. The
    default growth (1.6, as gRPC's own reconnect backoff) reaches the cap after about 15 s.
    With ``proportion`` > 0 and the length of the outage so far passed to :meth:`next`, ``d``
    is also kept at most ``proportion`` of the outage (but not below ``initial``): the wait
    after the server comes back is then bounded by that share of its down time.

    Args:
        initial: First nominal delay (seconds).
        cap: Largest nominal delay (seconds).
        multiplier: Growth per failure.
        rng: Source of randomness.
        proportion: Largest delay as a share of the outage (0: no such bound).
    """

    def __init__(self, initial: float, cap: float, multiplier: float = 1.6,
                 rng: random.Random | None = None, proportion: float = 0.0) -> None:
        self.initial = initial
        self.cap = cap
        self.multiplier = multiplier
        self.proportion = proportion
        self._rng = rng or random.Random()
        self._failures = 0

    def next(self, outage: float | None = None) -> float:
        """Return the next delay.

        Args:
            outage: Seconds since the server was last reachable, when it is unreachable now
                (None: it answered with an error, or is not known to have been up).
        """
        nominal = min(self.cap, self.initial * (self.multiplier ** min(self._failures, 100)))
        if outage is not None and self.proportion > 0:
            nominal = min(nominal, max(self.initial, self.proportion * outage))
        self._failures += 1
        return self._rng.uniform(nominal / 2, nominal)

    def reset(self) -> None:
        """Start again from ``initial`` (after a healthy connection)."""
        self._failures = 0


def _batch_message(results: list[cpb.TaskResult]) -> opb.ClientMsg:
    message = opb.ClientMsg()
    message.task_results.results.extend(results)
    return message


class RuntimeState(StrEnum):
    """Where a runtime is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    DRAINING = "draining"
    STOPPED = "stopped"


class _Attempt:
    __slots__ = ("acked", "discard", "key", "request", "started", "task")

    def __init__(self, request: ExecutionRequest, started: float) -> None:
        self.request = request
        self.key: AttemptKey = (request.task_id, request.attempt)
        self.started = started
        self.acked = False
        self.discard = False
        self.task: asyncio.Task[None] | None = None


class ShepherdRuntime:
    """Serves one orchestrator: runs pushed attempts, reports outcomes, survives disconnects.

    The runtime owns ``executor``: :meth:`stop` closes it.

    Args:
        executor: Runs attempts.
        connector: Opens streams to the orchestrator.
        config: Tunables.
        shepherd_id: The id announced in every Hello (a fresh UUID by default: one per boot).
    """

    def __init__(
        self,
        executor: AttemptExecutor,
        connector: Connector,
        config: RuntimeConfig | None = None,
        *,
        shepherd_id: str | None = None,
    ) -> None:
        self.executor = executor
        self.connector = connector
        self.config = config or RuntimeConfig()
        self.shepherd_id = shepherd_id or str(uuid.uuid4())
        self.state = RuntimeState.NEW
        self.stats: dict[str, int] = dict.fromkeys(
            ("connections", "connect_failures", "messages_sent", "result_messages",
             "results_sent", "ack_messages", "acks_sent", "status_sent", "tasks_received",
             "task_messages", "cancels_received", "results_dropped", "results_discarded",
             "results_redelivered", "attempts_started", "attempts_queued",
             "immediate_reconnects"), 0)
        self.connected = asyncio.Event()
        self._running: dict[AttemptKey, _Attempt] = {}
        self._queued: OrderedDict[AttemptKey, ExecutionRequest] = OrderedDict()
        self._outbox: OrderedDict[AttemptKey, cpb.TaskResult] = OrderedDict()
        self._sent: deque[tuple[float, AttemptKey, cpb.TaskResult]] = deque()
        self._ack_queue: deque[tuple[float, AttemptKey]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hello_acked = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._modern: bool | None = None
        self._heartbeat_interval = self.config.default_heartbeat_interval
        self._last_received = 0.0
        self._failures_in_row = 0
        self._connected_at: float | None = None
        self._last_failure = ""
        self._server_pings = False
        self._draining = False
        self._final = False
        self._status_now = False
        self._drain_signal = _WIRE_HAS_DRAIN_SIGNAL
        self._main: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._stopper: asyncio.Task[None] | None = None
        self._drain_deadline: float | None = None
        self._deadline_changed = asyncio.Event()
        # An executor that can start an attempt with an outcome callback (the pool) saves a
        # task per attempt; others are awaited in a task each.
        submit = getattr(executor, "submit", None)
        self._submit: Callable[[ExecutionRequest, Callable[[ExecutionOutcome], None]],
                               None] | None = submit if callable(submit) else None

    # -- public API ---------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Attempts executing now."""
        return len(self._running)

    @property
    def held(self) -> list[AttemptKey]:
        """Attempts this shepherd holds: executing, waiting for a slot, or not yet reported."""
        keys: dict[AttemptKey, None] = dict.fromkeys(self._running)
        keys.update(dict.fromkeys(self._queued))
        keys.update(dict.fromkeys(self._outbox))
        return list(keys)

    @property
    def draining(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._draining

    async def start(self) -> None:
        """Start connecting and serving in the background (returns at once)."""
        if self._main is not None:
            return
        self.state = RuntimeState.CONNECTING
        self._main = asyncio.create_task(self._run(), name=f"azolla-shepherd-{self.shepherd_id}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the orchestrator accepted the Hello.

        Raises:
            TimeoutError: Not connected within ``timeout`` seconds.
        """
        if not await _wait_event(self.connected, timeout):
            raise TimeoutError(f"not connected to {self.connector.description} within "
                               f"{timeout} s")

    async def wait_stopped(self) -> None:
        """Wait until the runtime has stopped (after :meth:`stop`)."""
        await self._stopped.wait()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Drain and stop: take no more work, let running attempts finish, report, disconnect.

        Calling it again while a drain is in progress waits for the same drain; a shorter
        ``drain_timeout`` in the later call cuts the wait (e.g. ``stop(0)`` on a second
        Ctrl-C).

        Args:
            drain_timeout: Seconds running attempts may still take (default: the config's).
                Attempts still running then are stopped and not reported; the orchestrator
                records them as lost and retries them.
        """
        timeout = self.config.drain_timeout if drain_timeout is None else max(drain_timeout, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
            self._deadline_changed.set()
        if self._stopper is None:
            self._stopper = asyncio.create_task(self._stop(), name="azolla-shepherd-stop")
        await asyncio.shield(self._stopper)

    async def _stop(self) -> None:
        self._draining = True
        self._status_now = True
        self.state = RuntimeState.DRAINING
        log.info("draining: %d attempts running, %d waiting for a slot", len(self._running),
                 len(self._queued))
        self._wake.set()
        loop = asyncio.get_running_loop()
        while not self._idle.is_set():
            assert self._drain_deadline is not None
            remaining = self._drain_deadline - loop.time()
            if remaining <= 0:
                break
            self._deadline_changed.clear()
            await _wait_any((self._idle, self._deadline_changed), remaining)
        if self._queued:
            log.warning("drain timeout: %d attempts never started (the orchestrator will retry "
                        "them)", len(self._queued))
            self._queued.clear()
        if self._running:
            log.warning("drain timeout: stopping %d attempts still running (the orchestrator "
                        "will retry them)", len(self._running))
            for attempt in list(self._running.values()):
                attempt.discard = True
                self._spawn(self._cancel_in_executor(attempt.key))
            await _wait_event(self._idle, self.config.kill_grace)
            for attempt in list(self._running.values()):
                if attempt.task is not None:
                    attempt.task.cancel()
                else:  # submitted: forget it (its outcome, if it ever comes, is dropped)
                    del self._running[attempt.key]
            if not self._running:
                self._idle.set()
        self._final = True
        self._wake.set()
        self._retry_now.set()
        main = self._main
        if main is not None:
            done, _ = await asyncio.wait({main}, timeout=self.config.delivery_timeout)
            if not done:
                if self._outbox:
                    log.warning("could not deliver %d outcomes before stopping; the "
                                "orchestrator will retry those attempts", len(self._outbox))
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
        await self._shutdown()

    # -- the connection loop ------------------------------------------------------------------

    def _finished(self) -> bool:
        return self._final and not self._outbox and not self._running

    async def _run(self) -> None:
        config = self.config
        backoff = Backoff(config.reconnect_initial_delay, config.reconnect_max_delay,
                          proportion=config.reconnect_proportion)
        outage_since: float | None = None
        try:
            while not self._finished():
                self.state = RuntimeState.CONNECTING
                healthy = False
                link: Link | None = None
                self._connected_at = None
                self._last_failure = ""
                try:
                    link = await self.connector.open()
                    healthy = await self._session(link)
                except ConnectionLost as exc:
                    self._log_lost(exc)
                except Exception:  # a bug: log it and keep serving
                    self._last_failure = "ERROR"
                    log.exception("shepherd connection failed")
                finally:
                    if link is not None:
                        with contextlib.suppress(Exception):
                            await link.close()
                    self._on_link_closed()
                if self._finished():
                    break
                self.state = RuntimeState.DRAINING if self._draining else (
                    RuntimeState.DISCONNECTED)
                now = time.monotonic()
                connected_at = self._connected_at
                if healthy:
                    backoff.reset()
                    outage_since = now
                elif outage_since is None:
                    outage_since = now
                if healthy and connected_at is not None \
                        and now - connected_at >= config.stable_after:
                    # A stream that was fine broke: the server may still be there (a dropped
                    # connection) or be restarting. One try costs nothing: make it now.
                    self.stats["immediate_reconnects"] += 1
                    continue
                unreachable = self._last_failure == "UNAVAILABLE"
                delay = backoff.next(now - outage_since if unreachable else None)
                self._retry_now.clear()
                await _wait_event(self._retry_now, delay)
        finally:
            self.connected.clear()

    def _log_lost(self, exc: ConnectionLost) -> None:
        self._last_failure = exc.code
        self.stats["connect_failures"] += 1
        self._failures_in_row += 1
        if self._failures_in_row <= 3 or self._failures_in_row % 20 == 0:
            log.warning("orchestrator %s unreachable or stream lost (%s); retrying",
                        self.connector.description, exc)
        else:
            log.debug("orchestrator %s: %s", self.connector.description, exc)

    async def _session(self, link: Link) -> bool:
        """Run one stream until it ends. Returns True if the Hello was answered."""
        self._modern = None
        self._hello_acked.clear()
        self._last_received = time.monotonic()
        self._server_pings = False
        hello = opb.Hello(
            shepherd_uuid=self.shepherd_id, max_concurrency=self.config.concurrency,
            domain=self.config.domain, shepherd_group=self.config.group,
            version=self.config.version, accepts_batches=True,
            running=[opb.RunningAttempt(task_id=t, attempt_number=n) for t, n in self.held])
        await link.send(opb.ClientMsg(hello=hello))
        self.stats["connections"] += 1
        reader = asyncio.create_task(self._read_loop(link), name="azolla-shepherd-reader")
        writer = asyncio.create_task(self._write_loop(link), name="azolla-shepherd-writer")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and writer.exception() is None:
                # The writer delivered everything and half-closed. The orchestrator ends the
                # stream once it has read every message: then nothing needs redelivery.
                await asyncio.wait({reader}, timeout=self.config.close_timeout)
                if reader.done() and not reader.cancelled() and reader.exception() is None:
                    self._sent.clear()
        finally:
            for task in (reader, writer):
                task.cancel()
            results = await asyncio.gather(reader, writer, return_exceptions=True)
        for result in results:
            if isinstance(result, ConnectionLost):
                self._log_lost(result)
            elif isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                log.error("shepherd stream task failed", exc_info=result)
        return self._modern is not None

    def _on_link_closed(self) -> None:
        self.connected.clear()
        self._hello_acked.clear()
        self._modern = None
        if self._sent:
            # Outcomes written recently may not have reached the orchestrator: offer them
            # again (the next Hello lists them; the HelloAck says which to drop).
            cutoff = time.monotonic() - self.config.redeliver_window
            again: OrderedDict[AttemptKey, cpb.TaskResult] = OrderedDict()
            for sent_at, key, result in self._sent:
                if sent_at >= cutoff and key not in self._outbox:
                    again[key] = result
            self._sent.clear()
            self.stats["results_redelivered"] += len(again)
            again.update(self._outbox)
            self._outbox = again
            self._trim_outbox()

    # -- reading ------------------------------------------------------------------------------

    async def _read_loop(self, link: Link) -> None:
        while True:
            message = await link.receive()
            if message is None:
                log.info("the orchestrator ended the stream")
                return
            self._last_received = time.monotonic()
            kind = message.WhichOneof("kind")
            if kind == "hello_ack":
                self._on_hello_ack(message.hello_ack)
                continue
            if self._modern is None:
                self._modern = False  # an orchestrator that does not send HelloAck
                self._handshake_done()
            if kind == "tasks":
                self.stats["task_messages"] += 1
                self._admit([request_from_task(t, self.config.domain)
                             for t in message.tasks.tasks])
            elif kind == "task":
                self.stats["task_messages"] += 1
                self._admit([request_from_task(message.task, self.config.domain)])
            elif kind == "ping":
                self._server_pings = True
            elif kind == "cancel":
                self.stats["cancels_received"] += 1
                cancel = message.cancel
                self._cancel((cancel.task_id, cancel.attempt_number), report=True,
                             reason=cancel.reason)

    def _on_hello_ack(self, ack: opb.HelloAck) -> None:
        if ack.heartbeat_interval_ms > 0:
            self._heartbeat_interval = max(ack.heartbeat_interval_ms / 1000.0, 0.05)
        dropped = 0
        for item in ack.cancel:
            key = (item.task_id, item.attempt_number)
            if self._cancel(key, report=False, reason="superseded while disconnected"):
                dropped += 1
        if dropped:
            log.info("the orchestrator no longer counts %d held attempts as ours; dropped",
                     dropped)
        self._modern = True
        self._handshake_done()
        self._failures_in_row = 0

    def _handshake_done(self) -> None:
        self._connected_at = time.monotonic()
        self._hello_acked.set()
        self.connected.set()
        if not self._draining:
            self.state = RuntimeState.CONNECTED
        log.info("connected to %s as shepherd %s (%s protocol, capacity %d)",
                 self.connector.description, self.shepherd_id,
                 "batched" if self._modern else "original", self.config.concurrency)
        self._wake.set()

    # -- attempts -----------------------------------------------------------------------------

    def _admit(self, requests: Iterable[ExecutionRequest]) -> None:
        loop_time = time.monotonic()
        for request in requests:
            self.stats["tasks_received"] += 1
            key = (request.task_id, request.attempt)
            if key in self._running or key in self._queued or key in self._outbox:
                continue  # a duplicate push
            if self._final:
                # Too late: the drain is over. Closing the stream makes the orchestrator
                # record the attempt as lost and retry it.
                log.info("stopping: not starting %s attempt %d", *key)
                continue
            # While draining, attempts the orchestrator still assigns (it fills the slots it
            # believes free) are run too: refusing them would cost the task an attempt.
            if len(self._running) < self.config.concurrency:
                self._start(request, loop_time)
            else:
                self.stats["attempts_queued"] += 1
                self._queued[key] = request

    def _start(self, request: ExecutionRequest, now: float) -> None:
        attempt = _Attempt(request, now)
        self._running[attempt.key] = attempt
        self._idle.clear()
        self.stats["attempts_started"] += 1
        submit = self._submit
        if submit is None:
            attempt.task = asyncio.create_task(self._execute(attempt))
        else:
            try:
                submit(request, lambda outcome: self._completed(attempt, outcome))
            except Exception as exc:
                log.exception("the executor failed on %s attempt %d", *attempt.key)
                asyncio.get_running_loop().call_soon(
                    self._completed, attempt, self._executor_failed(request, exc))
        was_empty = not self._ack_queue
        self._ack_queue.append((now + self.config.ack_delay, attempt.key))
        if was_empty:
            self._wake.set()

    def _start_queued(self) -> None:
        now = time.monotonic()
        while self._queued and len(self._running) < self.config.concurrency \
                and not self._final:
            _, request = self._queued.popitem(last=False)
            self._start(request, now)

    @staticmethod
    def _executor_failed(request: ExecutionRequest, exc: Exception) -> ExecutionOutcome:
        return ExecutionOutcome(
            task_id=request.task_id, attempt=request.attempt, ok=False,
            error_type=SHEPHERD_ERROR, error_message=f"the shepherd's executor failed: "
            f"{type(exc).__name__}: {exc}", retriable=True)

    async def _execute(self, attempt: _Attempt) -> None:
        request = attempt.request
        try:
            try:
                outcome = await self.executor.execute(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("the executor failed on %s attempt %d", *attempt.key)
                outcome = self._executor_failed(request, exc)
        finally:
            self._ended(attempt)
        if attempt.discard:
            self.stats["results_discarded"] += 1
            return
        self._deliver(attempt.key, outcome)

    def _completed(self, attempt: _Attempt, outcome: ExecutionOutcome) -> None:
        """The outcome of an attempt started with the executor's ``submit``."""
        self._ended(attempt)
        if attempt.discard:
            self.stats["results_discarded"] += 1
            return
        self._deliver(attempt.key, outcome)

    def _ended(self, attempt: _Attempt) -> None:
        if self._running.get(attempt.key) is attempt:
            del self._running[attempt.key]
        elif self._submit is not None:
            attempt.discard = True  # given up on (drain timeout): not ours to report
        self._start_queued()
        if not self._running and not self._queued:
            self._idle.set()
            if self._final:
                self._wake.set()  # the writer may now close the stream

    def _deliver(self, key: AttemptKey, outcome: ExecutionOutcome) -> None:
        result = result_from_outcome(outcome)
        if outcome.task_id != key[0] or outcome.attempt != key[1]:
            result.task_id, result.attempt_number = key
        # A UTF-8 character is at most 4 bytes: only a result that might be too large is sized.
        chars = (len(outcome.value_json or "") + len(outcome.error_message or "")
                 + len(outcome.error_data or "") + len(outcome.error_type or "") + len(key[0]))
        if 4 * chars + 64 > self.config.max_result_bytes \
                and result.ByteSize() > self.config.max_result_bytes:
            size = result.ByteSize()
            result = result_from_outcome(ExecutionOutcome(
                task_id=key[0], attempt=key[1], ok=False, error_type=RESULT_TOO_LARGE,
                error_message=f"the attempt's outcome is {size} bytes; the limit is "
                f"{self.config.max_result_bytes}", retriable=False))
        self._outbox[key] = result
        self._trim_outbox()
        self._wake.set()

    def _trim_outbox(self) -> None:
        while len(self._outbox) > self.config.max_buffered_results:
            key, _ = self._outbox.popitem(last=False)
            self.stats["results_dropped"] += 1
            log.warning("outcome buffer full (%d): dropped the outcome of %s attempt %d; the "
                        "orchestrator will retry it", self.config.max_buffered_results, *key)

    def _cancel(self, key: AttemptKey, *, report: bool, reason: str) -> bool:
        """Stop a held attempt. Returns True if it was held."""
        request = self._queued.pop(key, None)
        if request is not None:
            if report:
                self._deliver(key, ExecutionOutcome(
                    task_id=key[0], attempt=key[1], ok=False, error_type="Cancelled",
                    error_message=reason or "cancelled before it started", retriable=False))
            return True
        attempt = self._running.get(key)
        if attempt is not None:
            if not report:
                attempt.discard = True
            self._spawn(self._cancel_in_executor(key))
            return True
        return not report and self._outbox.pop(key, None) is not None

    async def _cancel_in_executor(self, key: AttemptKey) -> None:
        try:
            await self.executor.cancel(key[0], key[1])
        except Exception:
            log.exception("cancelling %s attempt %d failed", *key)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- writing ------------------------------------------------------------------------------

    async def _write_loop(self, link: Link) -> None:
        deadline = time.monotonic() + self.config.hello_ack_timeout
        while not self._hello_acked.is_set():
            if self._final and not self._outbox and not self._running:
                await link.finish()  # nothing to deliver: leave at once
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._modern is None:
                    self._modern = False
                    self._handshake_done()
                break
            self._wake.clear()
            await _wait_any((self._hello_acked, self._wake), remaining)
        last_status = time.monotonic()
        last_results = -1e9
        interval = self.config.result_interval
        while True:
            self._wake.clear()
            now = time.monotonic()
            messages: list[opb.ClientMsg] = []
            hold = 0.0
            if self._status_now or now - last_status >= self._heartbeat_interval:
                # First, so a drain signal reaches the orchestrator before the results that
                # free slots.
                self._status_now = False
                last_status = now
                messages.append(opb.ClientMsg(status=self._status()))
                self.stats["status_sent"] += 1
            if self._outbox and (not self._draining or self._final or self._drain_signal):
                # Holding only pays when the results then share a message (batched protocol).
                hold = 0.0 if self._final or not self._modern else last_results + interval - now
                if hold <= 0:
                    messages.extend(self._result_messages(now))
                    last_results = now
            acks = self._due_acks(now)
            if acks:
                self.stats["acks_sent"] += len(acks)
                if self._modern:
                    self.stats["ack_messages"] += 1
                    messages.append(opb.ClientMsg(acks=opb.AckBatch(acks=acks)))
                else:
                    self.stats["ack_messages"] += len(acks)
                    messages.extend(opb.ClientMsg(ack=ack) for ack in acks)
            for message in messages:
                await link.send(message)
            self.stats["messages_sent"] += len(messages)
            silence = now - self._last_received
            if self._server_pings and silence > self.config.server_silence_timeout:
                raise ConnectionLost(f"nothing received from the orchestrator for "
                                     f"{silence:.0f} s", "DEADLINE_EXCEEDED")
            self._prune_sent(now)
            if self._final and not self._outbox and not self._running:
                await link.finish()
                return
            if hold > 0:
                # Results are waiting, but the last result message is younger than
                # result_interval: let more join them (a wake-up would not change that).
                await asyncio.sleep(hold)
                continue
            if self._wake.is_set():
                continue
            timeout = last_status + self._heartbeat_interval - time.monotonic()
            if self._ack_queue:
                timeout = min(timeout, self._ack_queue[0][0] - time.monotonic())
            if timeout > 0:
                await _wait_event(self._wake, timeout)
                # Let outcomes that complete in the same loop iteration join this batch.
                await asyncio.sleep(0)

    def _result_messages(self, now: float) -> list[opb.ClientMsg]:
        results = list(self._outbox.items())
        self._outbox.clear()
        for key, result in results:
            self._sent.append((now, key, result))
        self.stats["results_sent"] += len(results)
        if not self._modern:
            self.stats["result_messages"] += len(results)
            return [opb.ClientMsg(task_result=result) for _, result in results]
        message = opb.ClientMsg()
        message.task_results.results.extend(result for _, result in results)
        if message.ByteSize() <= self.config.max_message_bytes:
            self.stats["result_messages"] += 1
            return [message]
        messages: list[opb.ClientMsg] = []
        chunk: list[cpb.TaskResult] = []
        size = 0
        for _, result in results:
            item = result.ByteSize() + 8
            if chunk and size + item > self.config.max_message_bytes:
                messages.append(_batch_message(chunk))
                chunk, size = [], 0
            chunk.append(result)
            size += item
        if chunk:
            messages.append(_batch_message(chunk))
        self.stats["result_messages"] += len(messages)
        return messages

    def _due_acks(self, now: float) -> list[opb.Ack]:
        acks: list[opb.Ack] = []
        queue = self._ack_queue
        while queue and queue[0][0] <= now:
            _, key = queue.popleft()
            attempt = self._running.get(key)
            if attempt is None or attempt.acked:
                continue
            attempt.acked = True
            acks.append(opb.Ack(task_id=key[0], attempt_number=key[1]))
        return acks

    def _status(self) -> opb.Status:
        load = len(self._running)
        free = 0 if self._draining else max(self.config.concurrency - load - len(self._queued), 0)
        status = opb.Status(current_load=load, available_capacity=free)
        if self._draining and self._drain_signal:
            setattr(status, _DRAIN_FIELD, True)
        return status

    def _prune_sent(self, now: float) -> None:
        cutoff = now - self.config.redeliver_window
        sent = self._sent
        limit = self.config.max_buffered_results
        while sent and (sent[0][0] < cutoff or len(sent) > limit):
            sent.popleft()

    # -- shutdown -----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        for attempt in list(self._running.values()):
            if attempt.task is not None:
                attempt.task.cancel()
        tasks = [a.task for a in self._running.values() if a.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.executor.close()
        except Exception:
            log.exception("closing the executor failed")
        self.state = RuntimeState.STOPPED
        log.info("shepherd %s counters: %s", self.shepherd_id,
                 " ".join(f"{k}={v}" for k, v in self.stats.items()))
        self._stopped.set()

