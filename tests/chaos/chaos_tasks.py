"""The task the fault-injection suite runs: it appends one ledger line per real execution."""

from __future__ import annotations

import os
import time

from azolla.tasks import azolla_task, current_task


@azolla_task
def record(ledger: str, key: str, sleep_ms: int = 0) -> str:
    """Append ``task_id attempt pid key start`` to ``ledger``, then sleep ``sleep_ms``."""
    ctx = current_task()
    line = f"{ctx.task_id} {ctx.attempt} {os.getpid()} {key} {time.time():.6f}\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: atomic
    finally:
        os.close(fd)
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    return key
