"""Turning task sources into modules for the worker processes; CLI usage errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from azolla.app.shepherd_main import UsageError, configure, main
from azolla.shepherd.assembly import resolve_task_sources, runtime_config, shepherd_version
from azolla.shepherd.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AZOLLA_"):
            monkeypatch.delenv(name)


def test_module_names_pass_through_and_cwd_leads_the_path(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sources = resolve_task_sources(["myapp.tasks", "other", "myapp.tasks"])
    assert sources.modules == ("myapp.tasks", "other")
    assert sources.sys_path[0] == str(tmp_path)


def test_a_py_file_becomes_a_module_with_its_folder_on_the_path(tmp_path: Path) -> None:
    file = tmp_path / "jobs.py"
    file.write_text("from azolla.tasks import azolla_task\n\n@azolla_task\ndef f() -> int:\n"
                    "    return 1\n\nif __name__ == '__main__':\n    print(f())\n")
    sources = resolve_task_sources([str(file)], base_path=["/x"])
    assert sources.modules == ("jobs",)
    assert sources.sys_path == (str(tmp_path), "/x")


def test_a_script_whose_top_level_runs_code_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "quick.py"
    file.write_text("import asyncio\nasync def main():\n    pass\nasyncio.run(main())\n")
    with pytest.raises(ValueError, match=r"quick.py:4.*asyncio.run\(main\(\)\).*__main__"):
        resolve_task_sources([file])


def test_task_functions_name_their_module() -> None:
    def fn() -> None: ...

    fn.__module__ = "pkg.mod"
    task = types.SimpleNamespace(module="pkg.tasks", name="t")
    assert resolve_task_sources([fn, task, sys.modules[__name__]], base_path=[]).modules == (
        "pkg.mod", "pkg.tasks", __name__)


@pytest.mark.parametrize("bad", ["", "not a module", "1abc"])
def test_bad_module_names(bad: str) -> None:
    with pytest.raises(ValueError, match="module"):
        resolve_task_sources([bad])


def test_runtime_config_from_settings() -> None:
    settings = load_settings({"concurrency": 3, "domain": "d", "group": "g",
                              "drain_timeout": 7}, use_environment=False)
    config = runtime_config(settings)
    assert (config.concurrency, config.domain, config.group, config.drain_timeout) == (
        3, "d", "g", 7.0)
    assert config.version == shepherd_version()
    assert config.version.startswith("azolla-shepherd/")


def test_pool_mode_offers_slots_for_the_attempts_queued_in_workers_pipes() -> None:
    pool = load_settings({"concurrency": 4, "mode": "pool"}, use_environment=False)
    assert pool.prefetch == 0  # off by default: a queued attempt's lease runs while it waits
    assert runtime_config(pool).concurrency == 4
    prefetch = load_settings({"concurrency": 4, "mode": "pool", "prefetch": 1},
                             use_environment=False)
    assert runtime_config(prefetch).concurrency == 8
    deeper = load_settings({"concurrency": 4, "mode": "pool", "prefetch": 2},
                           use_environment=False)
    assert runtime_config(deeper).concurrency == 12
    process = load_settings({"concurrency": 4, "mode": "process"}, use_environment=False)
    assert runtime_config(process).concurrency == 4
    command = load_settings({"concurrency": 4, "mode": "pool", "worker_command": "w"},
                            use_environment=False)
    assert runtime_config(command).concurrency == 4


def test_the_cli_needs_something_to_run() -> None:
    with pytest.raises(UsageError, match="--tasks"):
        configure([])
    settings, sources = configure(["--tasks", "a.b", "--tasks", "c", "--mode", "pool"])
    assert sources.modules == ("a.b", "c")
    assert settings.mode.value == "pool"
    assert settings.prefetch == 0
    settings, _ = configure(["--tasks", "a", "--mode", "pool", "--prefetch", "1"])
    assert settings.prefetch == 1
    assert runtime_config(settings).concurrency == 2 * settings.concurrency
    settings, sources = configure(["--tasks", "a", "--worker-command", "azolla-worker -v"])
    assert settings.worker_argv == ["azolla-worker", "-v"]
    assert settings.task_via_stdin  # azolla-worker reads the task from stdin
    assert sources.modules == ("a",)
    settings, _ = configure(["--worker-command", "/opt/bin/worker", "--worker-stdin"])
    assert settings.task_via_stdin
    settings, _ = configure(["--worker-command", "/opt/bin/worker"])
    assert not settings.task_via_stdin


def test_the_cli_reads_tasks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_TASKS", "x.y")
    monkeypatch.setenv("AZOLLA_CONCURRENCY", "5")
    settings, sources = configure([])
    assert sources.modules == ("x.y",)
    assert settings.concurrency == 5


@pytest.mark.parametrize("argv", [[], ["--concurrency", "0", "--tasks", "m"], ["--bogus"],
                                  ["--mode", "threads", "--tasks", "m"]])
def test_cli_errors_are_one_line_with_exit_code_2(argv: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("azolla-shepherd: error: ")
    assert err.count("\n") == 1
