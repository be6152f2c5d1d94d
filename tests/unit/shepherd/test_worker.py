"""The public ``Worker``: construction rules (running ones are in tests/e2e)."""

from __future__ import annotations

import pytest

from azolla.shepherd.settings import ExecutionMode, SettingsError
from azolla.worker import Worker


def test_worker_takes_explicit_settings_and_ignores_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_CONCURRENCY", "99")
    monkeypatch.setenv("AZOLLA_DOMAIN", "elsewhere")
    worker = Worker("http://127.0.0.1:6000", tasks=["pkg.tasks"], concurrency=8, mode="pool",
                    group="gpu", task_timeout=30)
    assert worker.settings.concurrency == 8
    assert worker.settings.domain == "default"
    assert worker.settings.group == "gpu"
    assert worker.settings.mode is ExecutionMode.POOL
    assert worker.settings.task_timeout == 30
    assert worker.sources.modules == ("pkg.tasks",)
    assert worker.shepherd_id is None
    assert not worker.connected
    assert "pool" in repr(worker)


def test_worker_needs_tasks_or_a_command() -> None:
    with pytest.raises(ValueError, match="needs tasks"):
        Worker()
    assert Worker(worker_command="/bin/true").settings.worker_argv == ["/bin/true"]


def test_bad_worker_settings_raise_settings_error() -> None:
    with pytest.raises(SettingsError, match="concurrency"):
        Worker(tasks=["m"], concurrency=0)
    with pytest.raises(SettingsError, match="no_such_option"):
        Worker(tasks=["m"], no_such_option=1)


async def test_stop_before_start_is_harmless() -> None:
    await Worker(tasks=["m"]).stop()
