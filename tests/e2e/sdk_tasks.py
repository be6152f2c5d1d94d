"""Tasks for the SDK end-to-end tests (imported by a real shepherd)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from azolla.tasks import TaskError, azolla_task, current_task


@azolla_task
def sdk_echo(*args: object, **kwargs: object) -> dict[str, object]:
    """Return what it was called with, and its context."""
    ctx = current_task()
    return {"args": list(args), "kwargs": kwargs, "attempt": ctx.attempt}


@azolla_task
def sdk_flaky(marker: str, fail_times: int) -> int:
    """Fail ``fail_times`` times (counted in ``marker``), then return the attempt number."""
    path = Path(marker)
    seen = int(path.read_text()) if path.exists() else 0
    path.write_text(str(seen + 1))
    if seen < fail_times:
        raise TaskError(f"failure {seen + 1}", retriable=True, error_type="Flaky")
    return current_task().attempt


@azolla_task
def sdk_sleep(seconds: float) -> int:
    """Sleep, then return the pid."""
    time.sleep(seconds)
    return os.getpid()
