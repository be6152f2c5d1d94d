"""The orchestrator side of transactional enqueue: turn outbox rows into tasks.

:func:`azolla.enqueue_in_transaction` writes a row to ``azolla_task_submissions`` inside the
caller's transaction and sends a NOTIFY at commit. :class:`SubmissionIntake` listens for it
(with a bounded fallback poll, in case a notification is missed while reconnecting), submits
the rows to the orchestrator with their own task ids, and deletes them once the tasks are
committed. Submitting a recorded id again is answered as a duplicate, so a crash between the
commit and the delete only costs a second look.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any
from uuid import UUID

import asyncpg

from azolla.adapters.grpc.convert import submit_request_from_proto
from azolla.adapters.grpc.pb import orchestrator_pb2
from azolla.app.model import SubmitRequest
from azolla.app.orchestrator import Orchestrator
from azolla.domain.errors import AzollaDomainError, InvalidRetryPolicy, InvalidTaskSpec

__all__ = ["SubmissionIntake"]

log = logging.getLogger("azolla.intake")

CHANNEL = "azolla_submissions"
_FETCH = ("SELECT task_id, request FROM azolla_task_submissions "
          "ORDER BY created_at LIMIT $1")
_DELETE = "DELETE FROM azolla_task_submissions WHERE task_id = ANY($1::uuid[])"


class SubmissionIntake:
    """Moves transactionally enqueued tasks from the outbox table into the orchestrator.

    Args:
        dsn: The database holding ``azolla_task_submissions``.
        orchestrator: Where to submit.
        batch: Rows taken per pass.
        poll_interval: Fallback poll period (seconds) when no notification arrives.
    """

    def __init__(self, dsn: str, orchestrator: Orchestrator, *, batch: int = 500,
                 poll_interval: float = 1.0) -> None:
        self.dsn = dsn
        self.orchestrator = orchestrator
        self.batch = batch
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self.moved = 0

    async def start(self) -> None:
        """Start listening and moving rows."""
        self._task = asyncio.create_task(self._run(), name="azolla-intake")

    async def stop(self) -> None:
        """Stop (rows not yet moved stay in the table for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    def _notified(self, *_args: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.dsn)
                    await self._conn.add_listener(CHANNEL, self._notified)
                    backoff = 0.1
                while await self._pass():
                    pass
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, AzollaDomainError) as exc:
                log.warning("intake pass failed (%s); retrying in %.1f s", exc, backoff)
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _pass(self) -> bool:
        """Move one batch; True when the batch was full (more may be waiting)."""
        rows = await self._conn.fetch(_FETCH, self.batch)
        if not rows:
            return False
        requests: list[SubmitRequest] = []
        done: list[UUID] = []
        for row in rows:
            task_id: UUID = row["task_id"]
            try:
                message = orchestrator_pb2.CreateTaskRequest.FromString(row["request"])
                request = dataclasses.replace(submit_request_from_proto(message),
                                              task_id=task_id)
                request = self.orchestrator.validate(request)
            except (InvalidTaskSpec, InvalidRetryPolicy, ValueError) as exc:
                log.error("dropping enqueued task %s: %s", task_id, exc)
                done.append(task_id)
                continue
            if await self.orchestrator.known(task_id):
                done.append(task_id)
            else:
                requests.append(request)
        if requests:
            await self.orchestrator.submit(requests)
            done.extend(r.task_id for r in requests if r.task_id is not None)
            self.moved += len(requests)
        await self._conn.execute(_DELETE, done)
        return len(rows) == self.batch
