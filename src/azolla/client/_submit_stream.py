"""Submits over one long-lived ``SubmitTasks`` stream.

A unary call costs the client and the server about twice what a message on an open stream
does, so the client sends its submit batches as messages of one bidirectional stream, each
under a fresh ``batch_id``; the server answers each with its own status once its tasks are
committed (in commit order). The stream opens on first use; when it breaks, the batches
waiting on it fail with the stream's status (the caller decides what may be retried, exactly
as for a unary call that failed the same way) and the next batch opens a new one.

Each batch has its own deadline (the transport's ``timeout``): past it, the batch fails with
``DEADLINE_EXCEEDED`` while the stream stays open, and a late answer is dropped. Against a
server without ``SubmitTasks`` (``UNIMPLEMENTED``, e.g. the original orchestrator),
:meth:`SubmitStream.create` raises :class:`StreamUnsupported` from then on and the client uses
the unary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2
from azolla.client._transport import Transport

__all__ = ["StreamUnsupported", "SubmitStream", "status_error"]

_Call = grpc.aio.StreamStreamCall[
    orchestrator_pb2.SubmitTasksRequest, orchestrator_pb2.SubmitTasksResponse
]
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class StreamUnsupported(Exception):
    """The server has no ``SubmitTasks``: submit with the unary calls."""


def status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An ``AioRpcError`` carrying ``code`` and ``details``, as a failed unary call raises."""
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, empty, empty, details)


class _Stream:
    """One open ``SubmitTasks`` call and the batches waiting for its answers."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.waiting: dict[int, asyncio.Future[orchestrator_pb2.SubmitTasksResponse]] = {}
        self.broken: BaseException | None = None
        self.write_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        #: Resolves once the server answered the call's start (initial metadata or status).
        self.connection: asyncio.Future[None] | None = None

    async def read(self) -> None:
        """Hand each answer to its batch; when the stream ends, fail whatever still waits."""
        error: BaseException
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    error = status_error(
                        grpc.StatusCode.UNAVAILABLE, "the server ended the submit stream"
                    )
                    break
                assert isinstance(response, orchestrator_pb2.SubmitTasksResponse)
                future = self.waiting.pop(response.batch_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                error = StreamUnsupported(exc.details() or "SubmitTasks is not implemented")
        except asyncio.CancelledError:
            error = status_error(grpc.StatusCode.CANCELLED, "the submit stream was closed")
            raise
        except Exception as exc:  # a bug or a malformed answer: fail the batches, not hang them
            error = status_error(grpc.StatusCode.INTERNAL, f"submit stream failed: {exc!r}")
        finally:
            self.fail(error)

    def fail(self, error: BaseException) -> None:
        """Mark the stream broken and fail every batch waiting on it with ``error``."""
        if self.broken is None:
            self.broken = error
        waiting, self.waiting = self.waiting, {}
        connection = self.connection
        if connection is not None and connection.done() and not connection.cancelled():
            connection.exception()  # retrieved: its failure is reported through the batches
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)


class SubmitStream:
    """The client's end of its ``SubmitTasks`` stream (opened on first use, reopened on break).

    Args:
        transport: The client's transport (stub, metadata, per-batch deadline).
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        #: True once the server answered UNIMPLEMENTED.
        self.unsupported = False
        #: Streams opened.
        self.streams_opened = 0
        #: Batches sent.
        self.messages_sent = 0

    def _open(self) -> _Stream:
        stub = self._transport.stub()  # raises if closed or used from another event loop
        stream = self._stream
        if stream is not None and stream.broken is None:
            return stream
        # wait_for_ready: like the unary submits, a batch waits (up to its deadline) for the
        # server to become reachable rather than failing at once.
        call = stub.SubmitTasks(
            metadata=self._transport.metadata, wait_for_ready=True
        )
        self._transport.calls["SubmitTasks"] += 1
        self.streams_opened += 1
        stream = _Stream(call)
        stream.reader = asyncio.get_running_loop().create_task(
            stream.read(), name="azolla-submit-stream"
        )
        self._stream = stream
        return stream

    async def create(
        self, request: orchestrator_pb2.SubmitTasksRequest
    ) -> Sequence[orchestrator_pb2.CreateTaskResponse]:
        """Send one batch (``request.tasks``) and return the server's answer for each task.

        Raises:
            StreamUnsupported: The server has no ``SubmitTasks``; nothing was created.
            grpc.aio.AioRpcError: The batch failed: its own status (e.g. ``INVALID_ARGUMENT``,
                nothing was created), or the stream's when it broke, or ``DEADLINE_EXCEEDED``
                (in these two cases the batch may or may not have been created).
        """
        if self.unsupported:
            raise StreamUnsupported("SubmitTasks is not implemented by the server")
        stream = self._open()
        batch_id = next(self._ids)
        request.batch_id = batch_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[orchestrator_pb2.SubmitTasksResponse] = loop.create_future()
        stream.waiting[batch_id] = future
        timer = loop.call_later(self._transport.timeout, _expire, stream, batch_id, future)
        try:
            try:
                async with stream.write_lock:
                    if stream.connection is None:
                        stream.connection = asyncio.ensure_future(_accepted(stream.call))
                    if not stream.connection.done():
                        # Write only once the server has accepted the call: a server without
                        # SubmitTasks then reports UNIMPLEMENTED (after writes to a call it
                        # already ended, gRPC would report INTERNAL instead).
                        async with asyncio.timeout(self._transport.timeout):
                            await asyncio.shield(stream.connection)
                    if stream.broken is None and not stream.call.done():
                        await stream.call.write(request)
                        self.messages_sent += 1
            except Exception:  # the call has ended: its reader fails the batch with its status
                if not stream.call.done():
                    stream.call.cancel()
            response = await future
        except StreamUnsupported:
            self.unsupported = True
            raise
        finally:
            timer.cancel()
            stream.waiting.pop(batch_id, None)
        if response.code:
            code = _CODES.get(response.code, grpc.StatusCode.UNKNOWN)
            raise status_error(code, response.message)
        if len(response.tasks) != len(request.tasks):
            raise status_error(
                grpc.StatusCode.INTERNAL,
                f"the server answered {len(response.tasks)} task ids for "
                f"{len(request.tasks)} tasks",
            )
        return response.tasks

    async def close(self, timeout: float) -> None:
        """Half-close the stream, let answers in flight arrive (up to ``timeout`` s), then stop."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if stream.broken is None:
            with contextlib.suppress(Exception):
                async with stream.write_lock:
                    await stream.call.done_writing()
        reader = stream.reader
        if reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(reader)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        stream.call.cancel()


async def _accepted(call: _Call) -> None:
    """Return once the server sent its initial metadata (or ended the call at once)."""
    await call.initial_metadata()


def _expire(stream: _Stream, batch_id: int, future: asyncio.Future[Any]) -> None:
    if stream.waiting.pop(batch_id, None) is not None and not future.done():
        future.set_exception(
            status_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        )
