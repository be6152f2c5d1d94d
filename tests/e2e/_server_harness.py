"""Helpers for the server end-to-end tests: a real server in-process, raw stubs, raw shepherds.

The server is the full assembly (:class:`azolla.app.containers.Container`) listening on
127.0.0.1 port 0, with the memory store or a PostgresEventStore on a fresh database. Tests talk
to it only through the generated gRPC stubs, as a foreign client or shepherd would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from azolla.adapters.grpc.pb import common_pb2 as pbc
from azolla.adapters.grpc.pb import orchestrator_pb2 as pbo
from azolla.adapters.grpc.pb import orchestrator_pb2_grpc
from azolla.adapters.grpc.server import GrpcServer
from azolla.app.containers import Container, resolve, shutdown
from azolla.app.orchestrator import Orchestrator
from azolla.app.settings import Settings

#: Seconds any single expected message may take to arrive.
STEP = 5.0


def store_settings(request: pytest.FixtureRequest, store: str, **extra: Any) -> Settings:
    """Settings for a test server on ``store`` ("memory", or "postgres" on a fresh database)."""
    if store == "postgres":
        url = request.getfixturevalue("fresh_database_url")
        return Settings(store="postgres", database_url=url, port=0, **extra)
    return Settings(store="memory", port=0, **extra)


@dataclass
class RunningServer:
    """A started server and stubs connected to it."""

    container: Container
    server: GrpcServer
    orchestrator: Orchestrator
    channel: grpc.aio.Channel
    client: orchestrator_pb2_grpc.ClientServiceAsyncStub
    cluster: orchestrator_pb2_grpc.ClusterServiceAsyncStub
    shepherds: list[RawShepherd] = field(default_factory=list)

    async def shepherd(self, shepherd_id: str = "shepherd-1", *, capacity: int = 8,
                       batches: bool = True, domain: str = "", group: str = "",
                       running: tuple[tuple[str, int], ...] = ()) -> RawShepherd:
        """Open a ClusterService stream, say Hello and read the HelloAck."""
        shepherd = RawShepherd(self.cluster)
        self.shepherds.append(shepherd)
        await shepherd.hello(shepherd_id, capacity=capacity, batches=batches, domain=domain,
                             group=group, running=running)
        return shepherd

    async def close(self) -> None:
        """Close the shepherds, the channel and the server (full shutdown)."""
        for shepherd in self.shepherds:
            shepherd.cancel()
        await self.channel.close()
        await shutdown(self.container)


async def start_server(settings: Settings, container: Container | None = None) -> RunningServer:
    """Start the full assembly for ``settings`` and connect raw stubs to it."""
    container = container or Container(settings=settings)
    try:
        server = await resolve(container.grpc_server)
        orchestrator = await resolve(container.orchestrator)
    except BaseException:
        await shutdown(container)
        raise
    channel = grpc.aio.insecure_channel(server.address)
    return RunningServer(
        container=container, server=server, orchestrator=orchestrator, channel=channel,
        client=orchestrator_pb2_grpc.ClientServiceStub(channel),
        cluster=orchestrator_pb2_grpc.ClusterServiceStub(channel))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[RunningServer]:
    """``async with running(settings) as srv``: a server for the block."""
    srv = await start_server(settings)
    try:
        yield srv
    finally:
        await srv.close()


class RawShepherd:
    """A ClusterService stream driven message by message, as a foreign shepherd would."""

    def __init__(self, stub: orchestrator_pb2_grpc.ClusterServiceAsyncStub) -> None:
        self._outgoing: asyncio.Queue[pbo.ClientMsg | None] = asyncio.Queue()
        self.call = stub.Stream(self._requests())
        self.hello_ack: pbo.HelloAck | None = None
        self.pings = 0
        # A pump reads the stream into a queue: timing out a read must not cancel the RPC.
        self._incoming: asyncio.Queue[pbo.ServerMsg | BaseException | None] = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._read_all())

    async def _read_all(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self._incoming.put_nowait(None)
                    return
                assert isinstance(message, pbo.ServerMsg)
                self._incoming.put_nowait(message)
        except asyncio.CancelledError:
            self._incoming.put_nowait(None)
        except BaseException as exc:
            self._incoming.put_nowait(exc)

    async def _requests(self) -> AsyncIterator[pbo.ClientMsg]:
        while True:
            message = await self._outgoing.get()
            if message is None:
                return
            yield message

    def send(self, message: pbo.ClientMsg) -> None:
        """Queue a message to the server."""
        self._outgoing.put_nowait(message)

    async def hello(self, shepherd_id: str, *, capacity: int = 8, batches: bool = True,
                    domain: str = "", group: str = "",
                    running: tuple[tuple[str, int], ...] = ()) -> pbo.HelloAck:
        """Say Hello and return the HelloAck."""
        self.send(pbo.ClientMsg(hello=pbo.Hello(
            shepherd_uuid=shepherd_id, max_concurrency=capacity, domain=domain,
            shepherd_group=group, accepts_batches=batches, version="test",
            running=[pbo.RunningAttempt(task_id=t, attempt_number=n) for t, n in running])))
        message = await self.recv()
        assert message.WhichOneof("kind") == "hello_ack", message
        self.hello_ack = message.hello_ack
        return message.hello_ack

    async def recv(self, timeout: float = STEP, *, skip_pings: bool = True) -> pbo.ServerMsg:
        """Return the next server message (pings are counted and skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self._incoming.get()
                if message is None:
                    self._incoming.put_nowait(None)
                    raise EOFError("the server ended the stream")
                if isinstance(message, BaseException):
                    self._incoming.put_nowait(message)
                    raise message
                if skip_pings and message.WhichOneof("kind") == "ping":
                    self.pings += 1
                    continue
                return message

    async def tasks(self, count: int, timeout: float = STEP) -> list[pbc.Task]:
        """Receive ``count`` pushed tasks (from ``task`` or ``tasks`` messages)."""
        got: list[pbc.Task] = []
        while len(got) < count:
            message = await self.recv(timeout)
            kind = message.WhichOneof("kind")
            if kind == "task":
                got.append(message.task)
            elif kind == "tasks":
                got.extend(message.tasks.tasks)
            else:
                raise AssertionError(f"expected tasks, got {message}")
        return got

    def succeed(self, task: pbc.Task, value: pbc.AnyValue | None = None, *,
                attempt: int | None = None) -> None:
        """Report a success for ``task``."""
        self.send(pbo.ClientMsg(task_result=pbc.TaskResult(
            task_id=task.task_id,
            attempt_number=task.attempt_number if attempt is None else attempt,
            success=pbc.SuccessResult(result=value or pbc.AnyValue(json_value="null")))))

    def fail(self, task: pbc.Task, error_type: str = "ValueError", *, retriable: bool = True,
             attempt: int | None = None) -> None:
        """Report a failure for ``task``."""
        self.send(pbo.ClientMsg(task_result=pbc.TaskResult(
            task_id=task.task_id,
            attempt_number=task.attempt_number if attempt is None else attempt,
            error=pbc.ErrorResult(type=error_type, message="boom", data="{}",
                                retriable=retriable))))

    def half_close(self) -> None:
        """End the request stream (the shepherd leaves cleanly)."""
        self._outgoing.put_nowait(None)

    def cancel(self) -> None:
        """Drop the stream (as a crashed shepherd would)."""
        self.call.cancel()
        self._pump.cancel()

    async def ended(self, timeout: float = STEP) -> None:
        """Wait until the server ends the stream (dropping the messages before the end)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self._incoming.get()
                if message is None or isinstance(message, BaseException):
                    self._incoming.put_nowait(message)
                    return


async def wait_state(client: orchestrator_pb2_grpc.ClientServiceAsyncStub, task_id: str,
                     state: str, timeout: float = STEP, domain: str = "") -> pbo.TaskUpdate:
    """Wait until the task is in ``state``, following its WatchTask stream (no polling).

    Raises:
        AssertionError: The task ended in another state first.
    """
    async with asyncio.timeout(timeout):
        async for update in client.WatchTask(pbo.WatchTaskRequest(task_id=task_id, domain=domain)):
            if update.state == state:
                return update
            assert not update.terminal, f"task ended {update.state}, expected {state}"
    raise AssertionError(f"the WatchTask stream ended before the task was {state}")
