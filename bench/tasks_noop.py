"""The no-op task the system benchmarks run (``azolla-shepherd --tasks bench.tasks_noop``).

``noop`` records the wall clock at the moment task code starts and returns it together with the
submit wall clock the producer put in its arguments, so dispatch latency (submit -> task code
starts) is read back from the recorded results without any side channel:
``result = [submitted_at, started_at]``.
"""

from __future__ import annotations

import time

from azolla import azolla_task


@azolla_task(name="noop")
def noop(submitted_at: float | None = None) -> list[float | None]:
    """Do nothing; return ``[submitted_at, started_at]`` (epoch seconds)."""
    return [submitted_at, time.time()]


@azolla_task(name="sleepy")
def sleepy(seconds: float, submitted_at: float | None = None) -> list[float | int | None]:
    """Sleep ``seconds`` on the first attempt only; return ``[submitted_at, started_at, attempt]``.

    Used by the recovery measurements: a re-dispatched attempt (attempt >= 2) returns at once.
    """
    from azolla.tasks import current_task

    started = time.time()
    attempt = current_task().attempt
    if attempt == 1 and seconds > 0:
        time.sleep(seconds)
    return [submitted_at, started, attempt]
