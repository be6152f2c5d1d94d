"""The decision loop's wake-up flag (azolla.app.orchestrator._Wakeup)."""

from __future__ import annotations

import asyncio
import time

import pytest

from azolla.app.orchestrator import _Wakeup

pytestmark = pytest.mark.timeout(10)


async def test_a_raised_flag_returns_at_once() -> None:
    wake = _Wakeup()
    wake.set()
    assert wake.is_set()
    assert await wake.wait(None) is True
    wake.clear()
    assert not wake.is_set()


async def test_a_deadline_ends_the_sleep_with_false() -> None:
    wake = _Wakeup()
    started = time.monotonic()
    assert await wake.wait(0.05) is False
    assert time.monotonic() - started >= 0.04
    assert await wake.wait(0) is False


async def test_set_wakes_the_sleeper_before_its_deadline() -> None:
    wake = _Wakeup()
    sleeper = asyncio.ensure_future(wake.wait(5.0))
    await asyncio.sleep(0.01)
    assert not sleeper.done()
    wake.set()
    assert await asyncio.wait_for(sleeper, 1.0) is True


async def test_a_cancelled_sleep_leaves_the_flag_usable() -> None:
    wake = _Wakeup()
    sleeper = asyncio.ensure_future(wake.wait(None))
    await asyncio.sleep(0.01)
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    wake.set()  # no sleeper left: must not fail
    assert await wake.wait(None) is True
