"""Transactional enqueue: create a task inside your own PostgreSQL transaction.

For Python code that shares Azolla's database::

    async with conn.transaction():
        await conn.execute("INSERT INTO orders ...")
        task_id = await enqueue_in_transaction(conn, send_receipt, {"order": 42})

The task exists if and only if the transaction commits (it is written to an outbox table in
the same transaction); the orchestrator is woken by a NOTIFY sent at commit and creates the task
with the returned id within milliseconds. Wait for it with ``Client.task(task_id).wait()``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from azolla.client._submission import (
    SubmitOptions,
    build_request,
    map_args,
    task_name_of,
    task_retry_policy,
)
from azolla.errors import ValidationError
from azolla.retry import RetryPolicy

__all__ = ["NOTIFY_CHANNEL", "enqueue_in_transaction"]

#: The channel the orchestrator's intake listens on.
NOTIFY_CHANNEL = "azolla_submissions"

_INSERT = "INSERT INTO azolla_task_submissions (task_id, request) VALUES ($1, $2)"
_NOTIFY = "SELECT pg_notify('azolla_submissions', '')"


async def enqueue_in_transaction(
    conn: Any,
    task: Any,
    args: Any = None,
    *,
    kwargs: dict[str, Any] | None = None,
    domain: str = "default",
    retry_policy: RetryPolicy | None = None,
    shepherd_group: str | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    delay: float | None = None,
    not_before: datetime | None = None,
    timeout: float | None = None,
) -> str:
    """Enqueue a task in the caller's open asyncpg transaction; return its task id.

    Args:
        conn: An ``asyncpg`` connection inside a transaction (``conn.transaction()``).
        task: An ``@azolla_task`` function, a plain function, or a task name.
        args: A list/tuple (positional arguments), a dict (keyword arguments) or one value.
        kwargs: Keyword arguments (merged with a dict given as ``args``).
        domain: The task's domain.
        retry_policy: Retry policy (the task's own, or the server default, when None).
        shepherd_group: Shepherd group allowed to run it.
        idempotency_key: Same key in a domain → same task (checked by the orchestrator).
        priority: Higher runs first.
        delay: Seconds before the first attempt may start.
        not_before: Earliest start time (timezone-aware), instead of ``delay``.
        timeout: Per-attempt timeout in seconds.

    Returns:
        The new task's id.

    Raises:
        ValidationError: Not inside a transaction, or invalid arguments/options.
    """
    if not conn.is_in_transaction():
        raise ValidationError("enqueue_in_transaction needs an open transaction: "
                              "use `async with conn.transaction():`")
    name = task_name_of(task)
    positional, keywords = map_args(args) if args is not None else ([], {})
    if kwargs:
        keywords = {**keywords, **kwargs}
    options = SubmitOptions.build(
        retry_policy=retry_policy if retry_policy is not None else task_retry_policy(task),
        shepherd_group=shepherd_group, idempotency_key=idempotency_key, priority=priority,
        delay=delay, not_before=not_before, timeout=timeout)
    request = build_request(name, domain, positional, keywords, options)
    task_id = uuid.uuid4()
    await conn.execute(_INSERT, task_id, request.SerializeToString())
    await conn.execute(_NOTIFY)
    return str(task_id)
