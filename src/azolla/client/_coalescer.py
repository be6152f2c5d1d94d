"""Adaptive coalescing of concurrent calls into batch RPCs (the submit path).

Rules, in the spirit of a Kafka producer whose linger drops to zero when idle:

* **Idle** (no batch RPC in flight): a request is sent at the end of the current event-loop
  iteration. A lone call pays no added delay; calls made in the same iteration (e.g. by
  ``asyncio.gather``) leave together in one batch.
* **Busy** (a batch in flight, fewer than ``max_in_flight``): requests wait up to ``linger``
  seconds, or until a batch returns, whichever comes first, then leave together.
* **Saturated** (``max_in_flight`` batches in flight): requests wait until a batch returns.
* A batch never exceeds ``max_batch`` requests or ``max_batch_bytes`` bytes; a full batch
  leaves at once if a slot is free.

So under load, batch size adapts to the round-trip time: the slower the server answers, the
more requests share the next RPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from azolla.errors import AzollaError

__all__ = ["Coalescer", "CoalescerStats", "Pending"]

_log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(slots=True)
class Pending(Generic[Req, Resp]):
    """One queued call: the request, its size in bytes and the future of its answer."""

    request: Req
    future: asyncio.Future[Resp]
    size: int


@dataclass(slots=True)
class CoalescerStats:
    """Counters of a :class:`Coalescer`.

    Attributes:
        requests: Requests accepted.
        batches: Batches sent.
        largest_batch: The most requests sent in one batch.
    """

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class Coalescer(Generic[Req, Resp]):
    """Gathers concurrent requests into batches handed to ``send``.

    Args:
        send: Sends one batch and resolves every pending future in it. If it returns with
            futures unresolved, or raises, those futures fail.
        linger: Seconds a request may wait for company while another batch is in flight.
        max_batch: Most requests per batch.
        max_batch_bytes: Most bytes (sum of the requests' sizes) per batch.
        max_in_flight: Most batches in flight at once.
    """

    def __init__(
        self,
        send: Callable[[list[Pending[Req, Resp]]], Awaitable[None]],
        *,
        linger: float,
        max_batch: int,
        max_batch_bytes: int,
        max_in_flight: int,
    ) -> None:
        if linger < 0 or max_batch < 1 or max_batch_bytes < 1 or max_in_flight < 1:
            raise ValueError("invalid coalescer settings")
        self._send = send
        self._linger = linger
        self._max_batch = max_batch
        self._max_bytes = max_batch_bytes
        self._max_in_flight = max_in_flight
        self._queue: deque[Pending[Req, Resp]] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._flush_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self.stats = CoalescerStats()

    @property
    def in_flight(self) -> int:
        """Batches being sent right now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def submit(self, request: Req, size: int) -> asyncio.Future[Resp]:
        """Queue ``request`` and return the future of its answer.

        Cancelling the future before its batch leaves drops the request from the batch.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Resp] = loop.create_future()
        self._queue.append(Pending(request, future, size))
        self._queued_bytes += size
        self.stats.requests += 1
        self._schedule(loop)
        return future

    async def call(self, request: Req, size: int) -> Resp:
        """Queue ``request`` and wait for its answer (the same rules as :meth:`submit`).

        A call made while the coalescer is idle leads: it lets the rest of the current loop
        iteration queue behind it, and if nobody did, it sends its one-request batch from the
        caller's own task (no task, no future wake-up: the cheap path of a lone submit).
        Cancelling the caller then cancels that RPC, as for a direct call.
        """
        if self._in_flight or self._queue or self._flush_soon:
            return await self.submit(request, size)
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        item = Pending(request, future, size)
        self._queue.append(item)
        self._queued_bytes += size
        self.stats.requests += 1
        self._flush_soon = True  # later calls of this iteration queue without scheduling
        try:
            await asyncio.sleep(0)  # one loop iteration, like the flush that submit schedules
        except asyncio.CancelledError:
            future.cancel()
            if self._flush_soon:
                self._flush()  # the others still leave (a cancelled request is skipped)
            raise
        if self._flush_soon and len(self._queue) == 1 and self._queue[0] is item:
            self._flush_soon = False
            self._queue.popleft()
            self._queued_bytes -= size
            self._in_flight += 1
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, 1)
            await self._run([item])  # answers the future, also on failure
            return future.result()
        if self._flush_soon:
            self._flush()
        return await future

    def _batch_full(self) -> bool:
        return len(self._queue) >= self._max_batch or self._queued_bytes >= self._max_bytes

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._in_flight >= self._max_in_flight or self._flush_soon:
            return  # a returning batch (or the pending flush) will take the queue
        if self._in_flight == 0 or self._batch_full() or self._linger == 0:
            self._flush_soon = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self._linger, self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._in_flight < self._max_in_flight:
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if self._queue and not self._batch_full():
                break  # a partial remainder waits for company (linger or a returning batch)
        if self._queue and self._in_flight < self._max_in_flight:
            self._schedule(asyncio.get_running_loop())
        self._note_idle()

    def _note_idle(self) -> None:
        if not self._queue and self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _take(self) -> list[Pending[Req, Resp]]:
        batch: list[Pending[Req, Resp]] = []
        size = 0
        while self._queue and len(batch) < self._max_batch:
            item = self._queue[0]
            if batch and size + item.size > self._max_bytes:
                break
            self._queue.popleft()
            self._queued_bytes -= item.size
            if item.future.done():  # cancelled by its caller while queued
                continue
            batch.append(item)
            size += item.size
        return batch

    async def _run(self, batch: list[Pending[Req, Resp]]) -> None:
        try:
            await self._send(batch)
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.cancel()
            raise
        except Exception as exc:  # handed to every caller of the batch
            error = exc if isinstance(exc, AzollaError) else AzollaError(f"submit failed: {exc}")
            if error is not exc:
                error.__cause__ = exc
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(AzollaError("the server sent no answer"))
        finally:
            self._in_flight -= 1
            if self._queue:
                # "Until the current batch returns": whatever queued meanwhile leaves now.
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
            self._note_idle()

    async def drain(self) -> None:
        """Wait until every queued request has been sent and answered."""
        while self._queue or self._in_flight:
            self._idle = asyncio.Event()
            if not self._queue and self._in_flight == 0:
                break
            await self._idle.wait()
        self._idle = None

    def fail_queued(self, error: BaseException) -> None:
        """Fail every request that has not left yet."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(error)
        self._queued_bytes = 0

    async def abort(self) -> None:
        """Cancel the batches in flight and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
