"""The ``azolla`` commands that talk to the orchestrator over gRPC.

Task commands go through the client SDK (:class:`azolla.client.Client`); operator commands
through ``AdminService``. Both carry the same bearer token, so the server applies the same rules
(domains, roles, validation) to the CLI as to any other caller: nothing here touches the
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from azolla.adapters.grpc.pb import orchestrator_pb2, orchestrator_pb2_grpc
from azolla.app.cli_render import Output, result_json, summary_json
from azolla.app.cli_support import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    CliOptions,
)
from azolla.client import Client, TaskHandle, TaskResult
from azolla.client._transport import parse_endpoint, translate_rpc_error
from azolla.errors import AzollaConnectionError
from azolla.retry import RetryPolicy

__all__ = [
    "DeadLetterFilter",
    "Session",
    "SubmitSpec",
    "TaskFilter",
    "cancel",
    "list_shepherds",
    "list_tasks",
    "requeue_dead_letters",
    "retry",
    "status",
    "submit",
    "tail_events",
    "watch",
]

T = TypeVar("T")

#: Page size of ``tasks list --all`` and of the dead-letter scan.
FULL_PAGE = 1000
#: Dead letters requeued per RequeueDeadLetters call (the progress bar's step).
REQUEUE_CHUNK = 200


class Session:
    """A connection to one orchestrator: the SDK client plus an ``AdminService`` stub.

    Args:
        options: The global options (server, token, TLS, timeout).
        domain: The domain the SDK client works in.
    """

    def __init__(self, options: CliOptions, domain: str) -> None:
        self.options = options
        self.endpoint = parse_endpoint(options.server)
        self.client = Client(options.server, domain=domain, token=options.token,
                             timeout=options.timeout, ca_file=options.ca_file)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {options.token}"),) if options.token else ())
        if self.endpoint.tls:
            root = _read_ca(options.ca_file)
            channel = grpc.aio.secure_channel(
                self.endpoint.target, grpc.ssl_channel_credentials(root_certificates=root))
        else:
            channel = grpc.aio.insecure_channel(self.endpoint.target)
        self.channel = channel
        self.admin = orchestrator_pb2_grpc.AdminServiceStub(channel)

    async def close(self) -> None:
        """Close the SDK client and the admin channel."""
        with contextlib.suppress(Exception):
            await self.client.close()
        await self.channel.close()

    async def ensure_reachable(self) -> None:
        """Connect, failing fast when the server refuses connections.

        Raises:
            AzollaConnectionError: No connection (refused, unknown host, TLS failure) or not
                within the timeout.
        """
        url = self.endpoint.url
        hint = "is azolla-server running there? Set --server or AZOLLA_SERVER"
        state = self.channel.get_state(try_to_connect=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.timeout
        Connectivity = grpc.ChannelConnectivity
        while state is not Connectivity.READY:
            if state is Connectivity.TRANSIENT_FAILURE:
                raise AzollaConnectionError(f"cannot connect to the orchestrator at {url} "
                                            f"({hint})", code="UNAVAILABLE")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AzollaConnectionError(
                    f"no connection to the orchestrator at {url} within "
                    f"{self.options.timeout:g} s ({hint})", code="UNAVAILABLE")
            try:
                async with asyncio.timeout(remaining):
                    await self.channel.wait_for_state_change(state)
            except TimeoutError:
                pass
            state = self.channel.get_state(try_to_connect=True)

    async def call(self, operation: str, method: Callable[..., Awaitable[T]], request: Any,
                   *, timeout: float | None = -1.0, task_id: str | None = None) -> T:
        """Make one unary ``AdminService`` call, translating errors like the SDK does.

        Args:
            operation: What is being done, for messages (``"list tasks"``).
            method: The stub method.
            request: The request message.
            timeout: The call's deadline in seconds; -1 uses ``--timeout``; None none.
            task_id: The task concerned, if any.

        Raises:
            AzollaError: The call failed (subclass per status).
        """
        deadline = self.options.timeout if timeout == -1.0 else timeout
        try:
            return await method(request, timeout=deadline, metadata=self.metadata,
                                wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, operation, endpoint=self.endpoint.url,
                                      task_id=task_id) from None


def _read_ca(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the CA file {path!r}: {exc.strerror or exc}",
                       EXIT_USAGE) from None


@contextlib.asynccontextmanager
async def session(options: CliOptions, domain: str) -> AsyncIterator[Session]:
    """Open a :class:`Session` that has reached the server; close it after the block."""
    opened = Session(options, domain)
    try:
        await opened.ensure_reachable()
        yield opened
    finally:
        await opened.close()


# -- task commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitSpec:
    """What ``azolla submit`` was asked to submit.

    Attributes:
        name: The task name.
        args: Positional arguments.
        kwargs: Keyword arguments.
        group: Shepherd group, or None for the default.
        idempotency_key: Idempotency key, or None.
        priority: Priority (higher first).
        delay: Seconds before the task may start, or None.
        task_timeout: Per-attempt timeout in seconds, or None.
        max_attempts: Retry policy's attempt limit, or None for the server default.
    """

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    group: str | None = None
    idempotency_key: str | None = None
    priority: int = 0
    delay: float | None = None
    task_timeout: float | None = None
    max_attempts: int | None = None


def split_arguments(args: Any, kwargs: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
    """Map ``--args``/``--kwargs`` values to positional and keyword arguments.

    Like the SDK's ``submit_task(name, args)``: a JSON array is the positional arguments, an
    object is the keyword arguments, any other value is one positional argument.

    Raises:
        CliError: Keyword arguments given both as an ``--args`` object and ``--kwargs``.
    """
    positional: list[Any] = []
    keywords: dict[str, Any] = dict(kwargs or {})
    if isinstance(args, list):
        positional = args
    elif isinstance(args, dict):
        if kwargs is not None:
            raise CliError("--args is a JSON object (keyword arguments) and --kwargs is given "
                           "too: give keyword arguments once", EXIT_USAGE)
        keywords = args
    elif args is not None:
        positional = [args]
    return positional, keywords


async def _wait_for(out: Output, handle: TaskHandle, timeout: float | None) -> TaskResult:
    if out.interactive and not out.json_mode:
        with out.err.status(f"waiting for task {handle.task_id} …"):
            return await handle.wait(timeout)
    return await handle.wait(timeout)


def _exit_for(result: TaskResult) -> int:
    return EXIT_OK if result.success else EXIT_FAILED


async def submit(options: CliOptions, out: Output, domain: str, spec: SubmitSpec, *,
                 wait: bool, wait_timeout: float | None) -> int:
    """``azolla submit``: create a task; with ``wait``, wait for its outcome.

    Returns:
        The exit code: 0, or 1 when the awaited task failed or was cancelled.
    """
    async with session(options, domain) as s:
        submission = s.client.submit_task(spec.name).args(*spec.args).kwargs(spec.kwargs)
        if spec.group:
            submission.shepherd_group(spec.group)
        if spec.idempotency_key:
            submission.idempotency_key(spec.idempotency_key)
        if spec.priority:
            submission.priority(spec.priority)
        if spec.delay is not None:
            submission.delay(spec.delay)
        if spec.task_timeout is not None:
            submission.timeout(spec.task_timeout)
        if spec.max_attempts is not None:
            submission.retry_policy(RetryPolicy(max_attempts=spec.max_attempts))
        handle = await submission.submit()
        out.submitted(handle.task_id, spec.name, domain, handle.deduplicated)
        document: dict[str, Any] = {"task_id": handle.task_id, "domain": domain,
                                    "deduplicated": handle.deduplicated}
        if not wait:
            if out.json_mode:
                out.json(document)
            return EXIT_OK
        result = await _wait_for(out, handle, wait_timeout)
        if out.json_mode:
            out.json({**document, **result_json(result)})
        else:
            out.result(result)
        return _exit_for(result)


async def status(options: CliOptions, out: Output, domain: str, task_id: str) -> int:
    """``azolla status``: print a task's state and attempt history."""
    async with session(options, domain) as s:
        out.status(await s.client.handle(task_id).status())
    return EXIT_OK


async def watch(options: CliOptions, out: Output, domain: str, task_id: str) -> int:
    """``azolla watch``: print each state change until the task ends.

    Returns:
        0 when the task succeeded, 1 when it failed or was cancelled.
    """
    async with session(options, domain) as s:
        last: TaskResult | None = None
        async for update in s.client.handle(task_id).watch():
            out.update(update)
            if update.result is not None:
                last = update.result
        if last is None:
            raise CliError(f"the watch of task {task_id} ended before the task did",
                           EXIT_UNAVAILABLE)
        return _exit_for(last)


async def cancel(options: CliOptions, out: Output, domain: str, task_id: str,
                 reason: str) -> int:
    """``azolla cancel``: cancel a task (a running attempt is stopped).

    Returns:
        0 whether this call cancelled the task or it had already ended (the output says which).
    """
    async with session(options, domain) as s:
        handle = s.client.handle(task_id)
        cancelled = await handle.cancel(reason)
        state = "cancelled"
        if not cancelled:
            state = (await handle.status()).state
        if out.json_mode:
            out.json({"task_id": handle.task_id, "cancelled": cancelled, "state": state})
        elif cancelled:
            out.line(f"cancelled task {handle.task_id}")
        else:
            out.line(f"task {handle.task_id} had already ended: {state}")
    return EXIT_OK


async def retry(options: CliOptions, out: Output, domain: str, task_id: str, *,
                wait: bool, wait_timeout: float | None) -> int:
    """``azolla retry``: run a failed or cancelled task again as a new task (RequeueTask).

    Returns:
        The exit code (with ``wait``: 1 when the new task failed too).
    """
    async with session(options, domain) as s:
        canonical = s.client.handle(task_id).task_id
        response = await s.call(
            f"retry task {canonical}", s.admin.RequeueTask,
            orchestrator_pb2.RequeueTaskRequest(task_id=canonical, domain=domain),
            task_id=canonical)
        document: dict[str, Any] = {"source_task_id": canonical, "task_id": response.task_id,
                                    "domain": domain, "deduplicated": response.deduplicated}
        if not out.json_mode:
            note = (" (it had been retried before; this is that task)"
                    if response.deduplicated else "")
            out.line(f"task {canonical} requeued as [bold]{response.task_id}[/]{note}")
        if not wait:
            if out.json_mode:
                out.json(document)
            return EXIT_OK
        result = await _wait_for(out, s.client.handle(response.task_id), wait_timeout)
        if out.json_mode:
            out.json({**document, **result_json(result)})
        else:
            out.result(result)
        return _exit_for(result)


# -- listing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Filters of ``tasks list`` and the ``dead-letters`` commands.

    Attributes:
        domain: The domain.
        state: One state, or "" for any.
        name: One task name, or "" for any.
        since: Submitted at or after this time, or None.
        until: Submitted before this time, or None.
    """

    domain: str
    state: str = ""
    name: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def request(self, *, cursor: int = 0, limit: int = 100) -> orchestrator_pb2.ListTasksRequest:
        """Return the ``ListTasksRequest`` for one page."""
        return orchestrator_pb2.ListTasksRequest(
            domain=self.domain, state=self.state, name=self.name,
            submitted_after_ms=_ms(self.since), submitted_before_ms=_ms(self.until),
            cursor=cursor, limit=limit)


def _ms(moment: dt.datetime | None) -> int:
    return max(int(moment.timestamp() * 1000), 1) if moment is not None else 0


async def _pages(s: Session, filters: TaskFilter, cursor: int, limit: int, every: bool
                 ) -> AsyncIterator[orchestrator_pb2.ListTasksResponse]:
    while True:
        page = await s.call("list tasks", s.admin.ListTasks,
                            filters.request(cursor=cursor, limit=limit))
        yield page
        cursor = page.next_cursor
        if not every or not cursor:
            return


async def list_tasks(options: CliOptions, out: Output, filters: TaskFilter, *, limit: int,
                     cursor: int, every: bool, errors: bool = False) -> int:
    """``azolla tasks list`` / ``azolla dead-letters list``: one page, or every page.

    The server lists what its in-memory TaskSet holds: unfinished tasks and recent outcomes.
    """
    async with session(options, filters.domain) as s:
        rows: list[orchestrator_pb2.TaskSummary] = []
        next_cursor = 0
        page_size = FULL_PAGE if every else limit
        status_note = (out.err.status("listing tasks …")
                       if every and out.interactive and not out.json_mode
                       else contextlib.nullcontext())
        with status_note:
            async for page in _pages(s, filters, cursor, page_size, every):
                rows.extend(page.tasks)
                next_cursor = page.next_cursor
    if out.json_mode:
        out.json({"tasks": [summary_json(t) for t in rows], "next_cursor": next_cursor or None})
        return EXIT_OK
    if not rows:
        out.line("no tasks match")
        return EXIT_OK
    out.out.print(out.task_table(rows, errors=errors))
    if next_cursor:
        out.note(f"more tasks: add --cursor {next_cursor} for the next page, or --all")
    return EXIT_OK


async def list_shepherds(options: CliOptions, out: Output, domain: str) -> int:
    """``azolla shepherds list``: the connected shepherds."""
    async with session(options, domain or "default") as s:
        response = await s.call("list shepherds", s.admin.ListShepherds,
                                orchestrator_pb2.ListShepherdsRequest(domain=domain))
    out.shepherds(list(response.shepherds))
    return EXIT_OK


async def tail_events(options: CliOptions, out: Output, *, after: int, follow: bool,
                      domain: str, limit: int) -> int:
    """``azolla events tail``: committed events after a position; with ``follow``, new ones."""
    async with session(options, domain or "default") as s:
        request = orchestrator_pb2.TailEventsRequest(after_position=after, follow=follow,
                                                     domain=domain, limit=limit)
        call = s.admin.TailEvents(request, metadata=s.metadata, wait_for_ready=True)
        try:
            async for event in call:
                out.event(event)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, "tail events", endpoint=s.endpoint.url) from None
        finally:
            call.cancel()
    return EXIT_OK


# -- dead letters --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which failed tasks ``dead-letters requeue`` takes.

    Attributes:
        domain: The domain.
        name: One task name, or "" for any.
        since: Submitted at or after this time, or None.
        until: Submitted before this time, or None.
    """

    domain: str
    name: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def tasks(self) -> TaskFilter:
        """The same filter over failed tasks."""
        return TaskFilter(domain=self.domain, state="failed", name=self.name, since=self.since,
                          until=self.until)


def requeue_windows(submitted_ms: list[int], chunk: int, lower: int, upper: int
                    ) -> list[tuple[int, int, int]]:
    """Cut the submission times of the dead letters into windows of about ``chunk`` tasks.

    Windows are contiguous and half-open in milliseconds, ``[start, end)``, from ``lower`` to
    ``upper`` (0 = unbounded), so every task submitted in the range falls in exactly one of
    them, even one that failed after the scan.

    Args:
        submitted_ms: Submission times (epoch ms) of the tasks found.
        chunk: Tasks per window (about: tasks of one millisecond never split).
        lower: ``submitted_after_ms`` of the whole range (0 = none).
        upper: ``submitted_before_ms`` of the whole range (0 = none).

    Returns:
        ``(start, end, expected)`` per window; ``expected`` counts the tasks found in it.
    """
    times = sorted(submitted_ms)
    windows: list[tuple[int, int, int]] = []
    start, count = lower, 0
    for index, moment in enumerate(times):
        if count >= chunk and moment > times[index - 1]:
            windows.append((start, moment, count))
            start, count = moment, 0
        count += 1
    windows.append((start, upper, count))
    return windows


async def requeue_dead_letters(options: CliOptions, out: Output, filters: DeadLetterFilter, *,
                               dry_run: bool) -> int:
    """``azolla dead-letters requeue``: run every matching failed task again as a new task.

    The failed tasks are counted first (``ListTasks``), then requeued window by window of
    submission time with ``RequeueDeadLetters``, so that a progress bar can follow and no call
    runs for long. The range ends at the last dead letter found, so the new tasks this run
    creates are never requeued by it, even if they fail at once. Requeueing is idempotent per
    source task: running the command again after an interruption is safe.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    async with session(options, filters.domain) as s:
        found: list[int] = []
        async for page in _pages(s, filters.tasks(), 0, FULL_PAGE, True):
            found.extend(t.submitted_at_ms for t in page.tasks)
        if dry_run or not found:
            if out.json_mode:
                out.json({"dead_letters": len(found), "requeued": [], "dry_run": dry_run})
            else:
                verb = "would requeue" if dry_run and found else "requeued"
                out.line(f"{len(found)} dead letter(s) in domain {filters.domain}; {verb} "
                         f"{len(found) if dry_run else 0}")
            return EXIT_OK
        base = filters.tasks()
        # Stop at the last dead letter found: the copies this command creates (and tasks
        # submitted after the scan) must not be requeued by the same run.
        upper = max(found) + 1
        if base.until is not None:
            upper = min(upper, _ms(base.until))
        windows = requeue_windows(found, REQUEUE_CHUNK, _ms(base.since), upper)
        requeued: list[orchestrator_pb2.RequeueTaskResponse] = []
        progress = Progress(TextColumn("requeueing dead letters"), BarColumn(),
                            MofNCompleteColumn(), console=out.err,
                            disable=out.json_mode or not out.interactive)
        with progress:
            bar = progress.add_task("requeue", total=len(found))
            for start, end, expected in windows:
                request = base.request(limit=FULL_PAGE)
                request.submitted_after_ms = start
                request.submitted_before_ms = end
                response = await s.call("requeue dead letters", s.admin.RequeueDeadLetters,
                                        request, timeout=max(options.timeout, 60.0))
                requeued.extend(response.requeued)
                done = len(response.requeued)
                if done > expected:  # tasks that failed after the scan
                    progress.update(bar, total=(progress.tasks[0].total or 0) + done - expected)
                progress.advance(bar, done)
    again = sum(1 for r in requeued if r.deduplicated)
    if out.json_mode:
        out.json({"dead_letters": len(found), "dry_run": False,
                  "requeued": [{"task_id": r.task_id, "deduplicated": r.deduplicated}
                               for r in requeued]})
    else:
        out.line(f"requeued {len(requeued) - again} dead letter(s) in domain {filters.domain}"
                 + (f"; {again} had been requeued before (same new task)" if again else ""))
    return EXIT_OK
