"""The Azolla client: connect, submit, wait."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2
from azolla.client._coalescer import Coalescer, Pending
from azolla.client._handle import TaskHandle
from azolla.client._results import TaskResult, TaskStatus, TaskUpdate, decode_status, decode_update
from azolla.client._submission import (
    UNSET,
    SubmitOptions,
    TaskSubmission,
    check_call,
    encode_arguments,
    map_args,
    task_name_of,
    task_retry_policy,
)
from azolla.client._submit_stream import StreamUnsupported, SubmitStream
from azolla.client._transport import (
    ChannelOption,
    Transport,
    parse_endpoint,
    translate_rpc_error,
)
from azolla.client._watch import WatchMux
from azolla.errors import (
    AzollaConnectionError,
    AzollaError,
    ClientClosedError,
    ServerError,
    ValidationError,
    WaitTimeoutError,
)
from azolla.retry import RetryPolicy

__all__ = ["Client", "ClientStats"]

DEFAULT_ENDPOINT: Final = "http://localhost:52710"

_Pending = Pending[orchestrator_pb2.CreateTaskRequest, orchestrator_pb2.CreateTaskResponse]
_Container = orchestrator_pb2.SubmitTasksRequest | orchestrator_pb2.CreateTasksRequest
_T = TypeVar("_T")
_SC = grpc.StatusCode


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters of one client, for benchmarks and tuning.

    Attributes:
        rpc_calls: RPCs started, by method name (streams count once per opening).
        tasks_submitted: Tasks handed to the submit coalescer.
        submit_batches: Batches the coalescer sent (each one ``SubmitTasks`` message, or one
            ``CreateTask`` / ``CreateTasks`` call against a server without that stream).
        largest_submit_batch: The most tasks in one coalesced batch.
        watch_streams_opened: WatchTasks streams opened (1 + reconnects).
        watch_messages_sent: WatchTasksRequest messages sent.
        submit_streams_opened: SubmitTasks streams opened (1 + reopenings after a break).
        submit_messages_sent: SubmitTasksRequest messages (batches) sent.
    """

    rpc_calls: dict[str, int] = field(default_factory=dict)
    tasks_submitted: int = 0
    submit_batches: int = 0
    largest_submit_batch: int = 0
    watch_streams_opened: int = 0
    watch_messages_sent: int = 0
    submit_streams_opened: int = 0
    submit_messages_sent: int = 0


class Client:
    """A connection to an Azolla orchestrator, for submitting tasks and waiting for them.

    The gRPC channel is created lazily, on the running event loop, at the first call; a client
    belongs to that loop. Use ``await Client.connect(url)`` (or ``async with
    Client.connect(url) as client:``) to also check that the orchestrator is reachable.

    Concurrent submits are coalesced into batch RPCs and all waits share one stream, so many
    coroutines can use one client at high rates; a lone call is sent at once. A client is not
    thread-safe: use it from its event loop only.

    Args:
        orchestrator_endpoint: ``http://host:port`` (plaintext), ``https://host:port`` (TLS),
            or ``host:port`` (plaintext). Default ``http://localhost:52710``.
        domain: The domain tasks are submitted to and looked up in.
        timeout: Deadline of each request in seconds (not of waits, which have their own).
        token: Bearer token, sent as ``authorization: Bearer <token>`` on every call.
        ca_file: PEM root certificates to verify an ``https`` server (default: system roots).
        cert_file: PEM client certificate chain for mutual TLS.
        key_file: PEM private key of ``cert_file``.
        tls_server_name: Name to verify in the server certificate instead of the host.
        submit_linger: Seconds a submit may wait for company while another batch is in flight
            (never when the client is idle).
        max_batch_size: Most tasks per batch RPC.
        max_in_flight_batches: Most submit batch RPCs in flight at once.
        submit_retries: Retries of a batch the server refused as overloaded, or (for tasks with
            an idempotency key) lost to a connection failure.
        max_reconnects: Consecutive failed reconnections of the wait stream before waits fail
            (with backoff from 50 ms doubling to 3 s: the default rides out about 15 s of
            server downtime).
        channel_options: Extra gRPC channel options, e.g. keepalive settings.

    Raises:
        ValidationError: A malformed endpoint or option, or an unreadable TLS file.
    """

    def __init__(
        self,
        orchestrator_endpoint: str = DEFAULT_ENDPOINT,
        *,
        domain: str = "default",
        timeout: float = 30.0,
        token: str | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        tls_server_name: str | None = None,
        submit_linger: float = 0.001,
        max_batch_size: int = 1000,
        max_in_flight_batches: int = 2,
        submit_retries: int = 3,
        max_reconnects: int = 10,
        channel_options: Sequence[ChannelOption] = (),
    ) -> None:
        if not isinstance(domain, str) or not domain.strip():
            raise ValidationError(f"domain must be a non-empty string, not {domain!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValidationError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        if not isinstance(submit_linger, int | float) or not 0 <= submit_linger <= 1:
            raise ValidationError("submit_linger must be between 0 and 1 second")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValidationError("max_batch_size must be an int >= 1")
        if not isinstance(max_in_flight_batches, int) or max_in_flight_batches < 1:
            raise ValidationError("max_in_flight_batches must be an int >= 1")
        if not isinstance(submit_retries, int) or submit_retries < 0:
            raise ValidationError("submit_retries must be an int >= 0")
        if not isinstance(max_reconnects, int) or max_reconnects < 0:
            raise ValidationError("max_reconnects must be an int >= 0")
        self._domain = domain
        self._transport = Transport(
            parse_endpoint(orchestrator_endpoint),
            token=token,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            tls_server_name=tls_server_name,
            timeout=float(timeout),
            channel_options=channel_options,
        )
        self._max_batch_size = max_batch_size
        self._submit_retries = submit_retries
        self._coalescer: Coalescer[
            orchestrator_pb2.CreateTaskRequest, orchestrator_pb2.CreateTaskResponse
        ] = Coalescer(
            self._send_batch,
            linger=float(submit_linger),
            max_batch=max_batch_size,
            max_batch_bytes=4 * 1024 * 1024,
            max_in_flight=max_in_flight_batches,
        )
        self._watch_mux = WatchMux(self._transport, max_reconnects=max_reconnects)
        self._submit_stream = SubmitStream(self._transport)
        self._batch_rpc = True  # False once the server answered CreateTasks with UNIMPLEMENTED
        self._closing = False

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def connect(cls, url: str = DEFAULT_ENDPOINT, **options: Any) -> _Connecting:
        """Create a client and check that the orchestrator is reachable.

        Use it either way::

            client = await Client.connect("http://localhost:52710")
            async with Client.connect("http://localhost:52710") as client:
                ...

        Args:
            url: The orchestrator endpoint (see :class:`Client`).
            **options: Any keyword argument of :class:`Client`.

        Returns:
            An awaitable that is also an async context manager (which closes the client).

        Raises:
            AzollaConnectionError: (when awaited) no connection within ``timeout`` seconds.
        """
        return _Connecting(cls(url, **options))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Finish the submits already started, then close the connection.

        Waits still pending fail with :class:`~azolla.errors.ClientClosedError`. Closing twice
        is harmless.
        """
        if self._closing:
            if not self._transport.closed:
                await self._transport.close()
            return
        self._closing = True
        try:
            async with asyncio.timeout(self._transport.timeout):
                await self._coalescer.drain()
        except TimeoutError:
            pass
        self._coalescer.fail_queued(ClientClosedError("the client was closed"))
        await self._coalescer.abort()
        await self._submit_stream.close(self._transport.timeout)
        await self._watch_mux.close()
        await self._transport.close()

    @property
    def domain(self) -> str:
        """The domain this client submits to."""
        return self._domain

    @property
    def endpoint(self) -> str:
        """The orchestrator endpoint, as given."""
        return self._transport.endpoint.url

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closing

    def stats(self) -> ClientStats:
        """Return a snapshot of the client's counters."""
        coalescer = self._coalescer.stats
        return ClientStats(
            rpc_calls=dict(self._transport.calls),
            tasks_submitted=coalescer.requests,
            submit_batches=coalescer.batches,
            largest_submit_batch=coalescer.largest_batch,
            watch_streams_opened=self._watch_mux.streams_opened,
            watch_messages_sent=self._watch_mux.messages_sent,
            submit_streams_opened=self._submit_stream.streams_opened,
            submit_messages_sent=self._submit_stream.messages_sent,
        )

    def __repr__(self) -> str:
        return f"<Client {self.endpoint} domain={self._domain!r}>"

    # -- submitting ---------------------------------------------------------------------------

    def submit_task(self, task: Any, args: Any = UNSET) -> TaskSubmission:
        """Start a submission of ``task``; configure it, then ``await .submit()``.

        How ``args`` maps to the task's parameters:

        * a dict: keyword arguments (``{"name": "Alice"}`` calls ``task(name="Alice")``);
        * a list or tuple: positional arguments;
        * any other value: one positional argument;
        * omitted or None: no arguments (set them with ``.args()`` / ``.kwargs()``).

        Args:
            task: A task name, an ``@azolla_task`` (its name is used), or a function (its
                ``__name__``). Given a callable, the arguments are checked against its
                signature before sending.
            args: The arguments, mapped as above.

        Returns:
            The submission builder.

        Raises:
            ValidationError: The task has no usable name, or a dict has non-string keys.
        """
        return TaskSubmission(self, task, args)

    def handle(self, task_id: str) -> TaskHandle:
        """Return a handle to an existing task of this client's domain.

        Args:
            task_id: The task's id (UUID text in any accepted spelling).

        Raises:
            ValidationError: ``task_id`` is empty.
        """
        if not isinstance(task_id, str) or not task_id.strip():
            raise ValidationError(f"task_id must be a non-empty string, not {task_id!r}")
        with contextlib.suppress(ValueError):  # not a UUID: the server will say it is unknown
            task_id = str(uuid.UUID(task_id))  # the server answers with canonical UUID text
        return TaskHandle(self, task_id, self._domain)

    async def _submit_one(self, submission: TaskSubmission) -> TaskHandle:
        if self._closing:
            raise ClientClosedError("the client is closed")
        request = submission.to_request(self._domain)
        response = await self._coalescer.call(request, request.ByteSize())
        return TaskHandle(self, response.task_id, self._domain, deduplicated=response.deduplicated)

    async def submit_many(
        self,
        task: Any,
        args_list: Iterable[Any],
        *,
        retry_policy: RetryPolicy | None = None,
        shepherd_group: str | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: datetime | None = None,
        timeout: float | None = None,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[TaskHandle]:
        """Submit many runs of one task in one round trip (one ``SubmitTasks`` batch).

        Each element of ``args_list`` is mapped like the ``args`` of :meth:`submit_task`
        (dict: keyword arguments; list or tuple: positional; other: one argument). All tasks
        are validated first; the server accepts or rejects a batch as a whole. More than
        ``max_batch_size`` tasks go in several concurrent batches, each all-or-nothing.

        Args:
            task: A task name, an ``@azolla_task`` or a function.
            args_list: One arguments value per task.
            retry_policy: Retry policy of every task (None: the task's own default policy if
                it is an ``@azolla_task`` that declares one, else the server's default).
            shepherd_group: Shepherd group of every task.
            priority: Priority of every task.
            delay: Start no sooner than this many seconds after submission.
            not_before: Start no sooner than this (timezone-aware) time.
            timeout: Per-attempt timeout in seconds.
            idempotency_keys: One key per task (same length as ``args_list``), or None.

        Returns:
            One handle per task, in the order of ``args_list``.

        Raises:
            ValidationError: Bad arguments or options (nothing was sent), or the server
                rejected the batch (nothing was created).
            AzollaConnectionError: The orchestrator could not be reached.
        """
        if self._closing:
            raise ClientClosedError("the client is closed")
        name = task_name_of(task)
        options = SubmitOptions.build(
            retry_policy=retry_policy if retry_policy is not None else task_retry_policy(task),
            shepherd_group=shepherd_group,
            priority=priority,
            delay=delay,
            not_before=not_before,
            timeout=timeout,
        )
        items = list(args_list)
        keys: list[str | None] = [None] * len(items)
        if idempotency_keys is not None:
            if isinstance(idempotency_keys, str) or len(idempotency_keys) != len(items):
                raise ValidationError("idempotency_keys must hold one key per task")
            for key in idempotency_keys:
                if not isinstance(key, str) or not key.strip():
                    raise ValidationError(f"idempotency keys must be non-empty, not {key!r}")
            keys = list(idempotency_keys)
        if not items:
            return []
        loop = asyncio.get_running_loop()
        fields = options.wire_fields(time.time())  # shared by every task of the call
        domain = self._domain
        size = self._max_batch_size
        # Each chunk's requests are built inside the message that carries them.
        kind: type[_Container] = (
            orchestrator_pb2.CreateTasksRequest
            if self._submit_stream.unsupported
            else orchestrator_pb2.SubmitTasksRequest
        )
        containers = [kind() for _ in range(0, len(items), size)]
        pending: list[_Pending] = []
        for index, value in enumerate(items):
            args, kwargs = map_args(value)
            check_call(task, name, args, kwargs)
            try:
                args_json, kwargs_json = encode_arguments(name, args, kwargs)
            except ValidationError as exc:
                raise ValidationError(f"task {index} of submit_many: {exc.message}") from None
            task_key = keys[index]
            new_request = containers[index // size].tasks.add
            request: orchestrator_pb2.CreateTaskRequest
            if task_key is None:
                request = new_request(
                    name=name, domain=domain, args=args_json, kwargs=kwargs_json, **fields
                )
            else:
                request = new_request(
                    name=name,
                    domain=domain,
                    args=args_json,
                    kwargs=kwargs_json,
                    idempotency_key=task_key,
                    **fields,
                )
            # Sizes only matter to the coalescer, which these items bypass.
            pending.append(Pending(request, loop.create_future(), 0))
        await asyncio.gather(
            *(
                self._send_items(
                    pending[i * size : (i + 1) * size],
                    self._submit_retries,
                    split_invalid=False,
                    container=container,
                )
                for i, container in enumerate(containers)
            )
        )
        handles: list[TaskHandle] = []
        failure: BaseException | None = None
        for item in pending:  # every future is retrieved, then the first failure raised
            future = item.future
            if not future.done():  # cannot happen: _send_items answers every item
                future.set_exception(AzollaError("the server sent no answer"))
            error = future.exception()
            if error is not None:
                failure = failure or error
                continue
            if failure is None:
                response = future.result()
                handles.append(
                    TaskHandle(self, response.task_id, domain, deduplicated=response.deduplicated)
                )
        if failure is not None:
            raise failure
        return handles

    async def _send_batch(self, batch: list[_Pending]) -> None:
        await self._send_items(batch, self._submit_retries, split_invalid=True)

    def _call_kwargs(self) -> dict[str, Any]:
        return {
            "timeout": self._transport.timeout,
            "metadata": self._transport.metadata,
            "wait_for_ready": True,
        }

    async def _create(
        self, items: list[_Pending], container: _Container | None = None
    ) -> Sequence[orchestrator_pb2.CreateTaskResponse]:
        if not self._submit_stream.unsupported:
            message = container
            if not isinstance(message, orchestrator_pb2.SubmitTasksRequest):
                message = orchestrator_pb2.SubmitTasksRequest(tasks=[i.request for i in items])
            with contextlib.suppress(StreamUnsupported):  # an older server: unary from now on
                return await self._submit_stream.create(message)
        stub = self._transport.stub()
        if len(items) == 1:
            self._transport.calls["CreateTask"] += 1
            return [await stub.CreateTask(items[0].request, **self._call_kwargs())]
        self._transport.calls["CreateTasks"] += 1
        if isinstance(container, orchestrator_pb2.CreateTasksRequest):
            request = container
        else:
            request = orchestrator_pb2.CreateTasksRequest(tasks=[i.request for i in items])
        response = await stub.CreateTasks(request, **self._call_kwargs())
        if len(response.tasks) != len(items):
            raise ServerError(
                f"the server answered {len(response.tasks)} task ids for {len(items)} tasks"
            )
        return response.tasks

    async def _send_items(
        self,
        items: list[_Pending],
        retries: int,
        *,
        split_invalid: bool,
        container: _Container | None = None,
    ) -> None:
        """Send ``items`` in one RPC and resolve their futures, recovering where it is safe.

        ``container``, if given, is a ``SubmitTasksRequest`` or ``CreateTasksRequest`` holding
        exactly the items' requests, in order: it is sent as it is while no item has been
        dropped.
        """
        live = [item for item in items if not item.future.done()]
        if len(live) != len(items):
            container = None
        items = live
        if not items:
            return
        if len(items) > 1 and not self._batch_rpc:
            await asyncio.gather(
                *(self._send_items([item], retries, split_invalid=split_invalid) for item in items)
            )
            return
        try:
            responses = await self._create(items, container)
        except grpc.aio.AioRpcError as exc:
            await self._recover(items, retries, exc, split_invalid=split_invalid)
            return
        except AzollaError as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, response in zip(items, responses, strict=True):
            if not item.future.done():
                item.future.set_result(response)

    async def _recover(
        self,
        items: list[_Pending],
        retries: int,
        exc: grpc.aio.AioRpcError,
        *,
        split_invalid: bool,
    ) -> None:
        code = exc.code()
        if code == _SC.UNIMPLEMENTED and len(items) > 1 and self._batch_rpc:
            self._batch_rpc = False  # an older server: one CreateTask per task from now on
            await self._send_items(items, retries, split_invalid=split_invalid)
            return
        if code in (_SC.INVALID_ARGUMENT, _SC.OUT_OF_RANGE) and split_invalid and len(items) > 1:
            # One bad task fails a whole batch; find it without failing its neighbours.
            middle = len(items) // 2
            await asyncio.gather(
                self._send_items(items[:middle], retries, split_invalid=True),
                self._send_items(items[middle:], retries, split_invalid=True),
            )
            return
        if code == _SC.RESOURCE_EXHAUSTED and retries > 0:
            await asyncio.sleep(_retry_delay(self._submit_retries - retries))
            await self._send_items(items, retries - 1, split_invalid=split_invalid)
            return
        operation = (
            f"submit task {items[0].request.name!r}"
            if len(items) == 1
            else f"submit {len(items)} tasks"
        )
        error = translate_rpc_error(exc, operation, endpoint=self.endpoint)
        if code in (_SC.UNAVAILABLE, _SC.DEADLINE_EXCEEDED, _SC.CANCELLED):
            keyed = [i for i in items if i.request.HasField("idempotency_key")]
            unkeyed = [i for i in items if not i.request.HasField("idempotency_key")]
            ambiguous = AzollaConnectionError(
                f"{error.message}; the task may or may not have been created (set an "
                "idempotency key to make submits safe to retry)",
                code=error.code,
                details=error.details,
            )
            for item in unkeyed:
                if not item.future.done():
                    item.future.set_exception(ambiguous)
            if keyed and retries > 0 and code == _SC.UNAVAILABLE and not self._closing:
                await asyncio.sleep(_retry_delay(self._submit_retries - retries))
                await self._send_items(keyed, retries - 1, split_invalid=split_invalid)
                return
            items = keyed
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    # -- waiting and inspecting -----------------------------------------------------------------

    async def _wait(self, task_id: str, domain: str, timeout: float | None) -> TaskResult:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ValidationError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        return await self._watch_mux.wait(task_id, domain, timeout)

    async def wait_many(
        self, tasks: Iterable[TaskHandle | str], timeout: float | None = None
    ) -> list[TaskResult]:
        """Wait for many tasks at once, over the client's one watch stream.

        Args:
            tasks: Handles or task ids (of this client's domain).
            timeout: Seconds to wait for all of them at most; None waits as long as it takes.

        Returns:
            The outcomes, in the order of ``tasks``.

        Raises:
            WaitTimeoutError: Not all tasks finished in time (they go on running).
            TaskNotFoundError: A task does not exist.
        """
        handles = [t if isinstance(t, TaskHandle) else self.handle(t) for t in tasks]
        waits = [asyncio.ensure_future(h.wait()) for h in handles]
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*waits))
        except TimeoutError:
            unfinished = sum(1 for handle in handles if handle._result is None)
            raise WaitTimeoutError(
                f"{unfinished} of {len(handles)} tasks did not finish within {timeout:g} s",
                timeout=timeout,
            ) from None
        finally:
            for wait in waits:  # after a failure or the timeout, stop the other waits too
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _unary(self, operation: str, task_id: str, call: Any, request: Any) -> Any:
        try:
            return await call(request, **self._call_kwargs())
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(
                exc, operation, endpoint=self.endpoint, task_id=task_id
            ) from None

    async def _status(self, task_id: str, domain: str) -> TaskStatus:
        stub = self._transport.stub()
        self._transport.calls["GetTaskStatus"] += 1
        request = orchestrator_pb2.GetTaskStatusRequest(task_id=task_id, domain=domain)
        response = await self._unary(
            f"get the status of task {task_id}", task_id, stub.GetTaskStatus, request
        )
        return decode_status(response)

    async def _cancel(self, task_id: str, domain: str, reason: str) -> bool:
        stub = self._transport.stub()
        self._transport.calls["CancelTask"] += 1
        request = orchestrator_pb2.CancelTaskRequest(task_id=task_id, domain=domain, reason=reason)
        response = await self._unary(f"cancel task {task_id}", task_id, stub.CancelTask, request)
        return bool(response.cancelled)

    async def _watch(self, task_id: str, domain: str) -> AsyncIterator[TaskUpdate]:
        stub = self._transport.stub()
        self._transport.calls["WatchTask"] += 1
        call = stub.WatchTask(
            orchestrator_pb2.WatchTaskRequest(task_id=task_id, domain=domain),
            metadata=self._transport.metadata,
            wait_for_ready=True,
        )
        try:
            async for message in call:
                update = decode_update(message)
                yield update
                if update.terminal:
                    return
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(
                exc, f"watch task {task_id}", endpoint=self.endpoint, task_id=task_id
            ) from None
        finally:
            call.cancel()


def _retry_delay(attempt: int) -> float:
    bound = min(2.0, 0.1 * 2.0**attempt)
    return bound / 2 + random.uniform(0, bound / 2)  # jitter, not cryptography


class _Connecting:
    """What :meth:`Client.connect` returns: awaitable, and an async context manager."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    async def _connect(self) -> Client:
        client = self._client
        try:
            await client._transport.wait_ready(client._transport.timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close()
            raise
        return client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()
