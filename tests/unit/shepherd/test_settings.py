"""Shepherd settings: precedence, parsing, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from azolla.shepherd.connection import parse_orchestrator_url
from azolla.shepherd.settings import ExecutionMode, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AZOLLA_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.orchestrator == "http://127.0.0.1:52710"
    assert settings.tasks == []
    assert (settings.domain, settings.group) == ("default", "default")
    assert settings.mode is ExecutionMode.PROCESS
    assert settings.concurrency >= 1
    assert settings.drain_timeout == 30.0
    assert settings.bearer_token() is None


def test_flags_beat_environment_beats_file(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "azolla.toml"
    config.write_text('[shepherd]\nconcurrency = 3\ndomain = "file"\ngroup = "file"\n'
                      'tasks = ["a.b", "c"]\n')
    monkeypatch.setenv("AZOLLA_DOMAIN", "env")
    monkeypatch.setenv("AZOLLA_GROUP", "env")
    settings = load_settings({"group": "flag", "mode": None}, config)
    assert settings.concurrency == 3
    assert settings.domain == "env"
    assert settings.group == "flag"
    assert settings.tasks == ["a.b", "c"]


def test_tasks_from_the_environment_are_comma_separated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_TASKS", "myapp.tasks, myapp.reports")
    assert load_settings().tasks == ["myapp.tasks", "myapp.reports"]
    assert load_settings({"tasks": ["x,y", "z"]}).tasks == ["x", "y", "z"]


def test_config_file_from_environment_and_top_level_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "shepherd.toml"
    config.write_text('mode = "pool"\nconcurrency = 2\n')
    monkeypatch.setenv("AZOLLA_CONFIG", str(config))
    settings = load_settings()
    assert settings.mode is ExecutionMode.POOL
    assert settings.concurrency == 2


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"concurrency": 0}, "concurrency"),
    ({"mode": "threads"}, "mode"),
    ({"orchestrator": "ftp://x"}, "orchestrator"),
    ({"domain": "bad domain"}, "domain"),
    ({"drain_timeout": -1}, "drain_timeout"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
    ({"worker_command": "'unclosed"}, "worker_command"),
])
def test_bad_settings_are_one_line_errors(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_file_keys_and_bad_toml_are_errors(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("concurrencyy = 3\n")
    with pytest.raises(SettingsError, match="concurrencyy"):
        load_settings(config_file=typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("concurrency = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config_file=broken)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(config_file=tmp_path / "missing.toml")


def test_token_file_and_worker_command(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    settings = load_settings({"token_file": str(token),
                              "worker_command": "/usr/bin/env my-worker --flag 'a b'"})
    assert settings.bearer_token() == "s3cret"
    assert settings.worker_argv == ["/usr/bin/env", "my-worker", "--flag", "a b"]
    assert "s3cret" not in repr(load_settings({"token": "s3cret"}))


@pytest.mark.parametrize(("url", "target", "secure"), [
    ("http://127.0.0.1:52710", "127.0.0.1:52710", False),
    ("https://orch.example", "orch.example:52710", True),
    ("localhost:6000", "localhost:6000", False),
    ("http://[::1]:7000/", "[::1]:7000", False),
])
def test_orchestrator_urls(url: str, target: str, secure: bool) -> None:
    address = parse_orchestrator_url(url)
    assert (address.target, address.secure) == (target, secure)


@pytest.mark.parametrize("url", ["", "grpc://x:1", "http://x:1/path", "http://:80",
                                 "http://x:notaport"])
def test_bad_orchestrator_urls(url: str) -> None:
    with pytest.raises(ValueError, match="orchestrator URL"):
        parse_orchestrator_url(url)
