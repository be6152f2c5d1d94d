"""Settings of azolla-server: sources, precedence, validation and one-line errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from azolla.app.server_main import main
from azolla.app.settings import (
    DEFAULT_PORT,
    Settings,
    SettingsError,
    default_data_dir,
    load_settings,
    redact_url,
)

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AZOLLA_* or DATABASE_URL from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("AZOLLA_") or name.upper() in ("DATABASE_URL",):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "azolla.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.store) == ("127.0.0.1", DEFAULT_PORT,
                                                              "postgres")
    assert settings.database_url is None
    assert settings.embedded
    assert settings.metrics_port is None
    assert settings.resolved_data_dir == default_data_dir()


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_PORT", "6001")
    monkeypatch.setenv("AZOLLA_HOST", "0.0.0.0")
    monkeypatch.setenv("AZOLLA_STORE", "Memory")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5432/azolla")
    monkeypatch.setenv("AZOLLA_METRICS_PORT", "9464")
    monkeypatch.setenv("AZOLLA_ALLOW_UNSAFE_DB", "true")
    settings = load_settings()
    assert (settings.port, settings.host, settings.store) == (6001, "0.0.0.0", "memory")
    assert settings.database_url == "postgresql://u:p@db:5432/azolla"
    assert settings.metrics_port == 9464
    assert settings.allow_unsafe_db
    assert not settings.embedded


def test_azolla_database_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_DATABASE_URL", "postgres://h/db")
    assert load_settings().database_url == "postgres://h/db"


def test_unrelated_azolla_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_PG_BIN", "/usr/lib/postgresql/16/bin")
    monkeypatch.setenv("AZOLLA_TEST_PG", "local")
    assert load_settings().port == DEFAULT_PORT


def test_flags_beat_environment_beats_file(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'port = 1111\nhost = "10.0.0.1"\nstore = "memory"\n')
    monkeypatch.setenv("AZOLLA_PORT", "2222")
    settings = load_settings({"port": 3333}, config_file=path)
    assert settings.port == 3333
    settings = load_settings({"port": None}, config_file=path)
    assert settings.port == 2222
    assert settings.host == "10.0.0.1"
    assert settings.store == "memory"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "port = 4444\n[domain_concurrency]\nbilling = 3\n")
    monkeypatch.setenv("AZOLLA_CONFIG", str(path))
    settings = load_settings()
    assert settings.port == 4444
    assert settings.domain_concurrency == {"billing": 3}


def test_data_dir_default_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "azolla" / "pgdata"
    assert load_settings({"data_dir": "/srv/pg"}).resolved_data_dir == Path("/srv/pg")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"store": "redis"}, "store"),
        ({"database_url": "mysql://x/y"}, "PostgreSQL URL"),
        ({"host": "  "}, "host"),
        ({"heartbeat_interval_ms": 5000, "heartbeat_timeout_ms": 4000}, "heartbeat_timeout_ms"),
        ({"log_level": "loud"}, "log_level"),
        ({"domain_concurrency": {"a": 0}}, "at least 1"),
        ({"metrics_port": 123456}, "metrics_port"),
    ],
)
def test_invalid_values_give_one_line(flags: dict[str, object], fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(flags)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="prot: unknown setting"):
        load_settings(config_file=write(tmp_path, "prot = 1\n"))


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read the config file"):
        load_settings(config_file=tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config_file=write(tmp_path, "port = \n"))


def test_password_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"database_url": "mysql://user:hunter2@h/db"})
    assert "hunter2" not in str(info.value)
    assert redact_url("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"
    assert redact_url("postgresql://h/d") == "postgresql://h/d"


def test_limits() -> None:
    assert Settings(max_payload_bytes=4096).limits.max_payload_bytes == 4096


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "70000"], "port"),
        (["--port", "abc"], "invalid int value"),
        (["--store", "redis"], "invalid choice"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv: list[str], fragment: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1
    assert err.startswith("azolla-server: error:")


# -- authentication and TLS --------------------------------------------------------------------


def test_tokens_from_the_file(tmp_path: Path) -> None:
    digest = "ab" * 32
    path = write(tmp_path, f"""
[[auth.tokens]]
name = "billing-app"
sha256 = "{digest.upper()}"
domains = ["billing"]
roles = ["client"]

[[auth.tokens]]
name = "dev"
token = "a-long-development-token"
domains = ["*"]
roles = ["client", "shepherd", "admin"]
""")
    tokens = load_settings(config_file=path).auth.tokens
    assert [t.name for t in tokens] == ["billing-app", "dev"]
    assert tokens[0].digest == digest
    assert tokens[1].digest == hashlib.sha256(b"a-long-development-token").hexdigest()
    assert tokens[1].roles == ("client", "shepherd", "admin")
    assert "a-long-development-token" not in repr(tokens[1])


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('name = "x"\ndomains = ["*"]', "exactly one of sha256 or token"),
        ('name = "x"\ndomains = ["*"]\ntoken = "a-long-development-token"\nsha256 = "' + "a" * 64
         + '"', "exactly one of sha256 or token"),
        ('name = "x"\ndomains = ["*"]\nsha256 = "xyz"', "sha256"),
        ('name = "x"\ndomains = ["*"]\ntoken = "short"', "token"),
        ('name = "x"\ndomains = []\ntoken = "a-long-development-token"', "domains"),
        ('name = "x"\ndomains = ["*"]\ntoken = "a-long-development-token"\nroles = ["root"]',
         "roles"),
    ],
)
def test_bad_tokens(tmp_path: Path, table: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(config_file=write(tmp_path, f"[[auth.tokens]]\n{table}\n"))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tokens", ['["supersecrettoken-xyz"]',
                                    '[{"name": "x", "token": "supersecrettoken-xyz"}]',
                                    '[{"name": "x", "domains": ["*"], "token": 12345678901}]'])
def test_auth_errors_never_echo_a_token(tokens: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_AUTH", '{"tokens": ' + tokens + "}")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "supersecrettoken" not in str(info.value)
    assert "12345678901" not in str(info.value)
    assert "\n" not in str(info.value)


def test_the_same_token_twice_is_refused(tmp_path: Path) -> None:
    entry = '[[auth.tokens]]\nname = "{}"\ndomains = ["*"]\ntoken = "a-long-development-token"\n'
    with pytest.raises(SettingsError, match="same token twice"):
        load_settings(config_file=write(tmp_path, entry.format("a") + entry.format("b")))


def test_tls_files_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="go together"):
        load_settings({"tls_cert_file": cert})
    with pytest.raises(SettingsError, match="not a readable file"):
        load_settings({"tls_cert_file": cert, "tls_key_file": tmp_path / "missing.pem"})
    with pytest.raises(SettingsError, match="need"):
        load_settings({"tls_client_ca_file": cert})
    settings = load_settings({"tls_cert_file": cert, "tls_key_file": cert})
    assert settings.tls


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False),
                                                ("example.org", False)])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert load_settings({"host": host}).loopback_only is loopback


def test_a_shared_file_with_shepherd_and_server_tables(tmp_path: Path) -> None:
    path = write(tmp_path, """
port = 5000
store = "memory"

[server]
port = 5001

[shepherd]
orchestrator = "http://127.0.0.1:5001"
concurrency = 4
""")
    settings = load_settings(config_file=path)
    assert (settings.port, settings.store) == (5001, "memory")


def test_server_entry_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"\[server\]"):
        load_settings(config_file=write(tmp_path, 'server = "x"\n'))
