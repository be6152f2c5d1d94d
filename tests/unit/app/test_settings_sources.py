"""The settings' sources read as pydantic-settings read them (it is kept off the start path).

``Settings`` reads the environment and the TOML file itself; these tests compare it with a
pydantic-settings ``BaseSettings`` declared with the same fields and the configuration the
settings had when they were one: same precedence, same variable names in any case, the same
JSON values and the same merged tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import create_model
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from azolla.app import settings as settings_module
from azolla.app.server_main import main
from azolla.app.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.timeout(60)


class _ReferenceBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AZOLLA_", case_sensitive=False,
                                      extra="forbid", populate_by_name=True,
                                      validate_default=True)
    file_values: ClassVar[dict[str, Any] | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if cls.file_values is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, InitSettingsSource(settings_cls, cls.file_values))


_FIELDS: dict[str, Any] = {name: (info.annotation, info)
                           for name, info in Settings.model_fields.items()}
#: The same fields (validators aside) in a pydantic-settings BaseSettings.
Reference: Any = create_model("Reference", __base__=_ReferenceBase, **_FIELDS)

TOKEN = {"name": "env", "token": "a-long-development-token", "domains": ["*"]}

SCENARIOS: list[tuple[dict[str, str], str, dict[str, Any]]] = [
    # environment beats the file; variable names in any case
    ({"AZOLLA_PORT": "2222", "azolla_host": "::1"}, 'port = 1111\nhost = "10.0.0.1"\n', {}),
    # flags beat both
    ({"AZOLLA_PORT": "2222"}, "port = 1111\n", {"port": 3333}),
    # DATABASE_URL before AZOLLA_DATABASE_URL, both before the file
    ({"DATABASE_URL": "postgresql://h/env1", "AZOLLA_DATABASE_URL": "postgresql://h/env2"},
     'database_url = "postgresql://h/file"\n', {}),
    ({"AZOLLA_DATABASE_URL": "postgresql://h/env2"}, 'DATABASE_URL = "postgresql://h/file"\n',
     {}),
    ({"database_url": "postgresql://h/lower"}, "", {}),
    ({"AZOLLA_DATABASE_URL": "postgresql://h/env"}, 'AZOLLA_DATABASE_URL = "postgresql://h/f"\n',
     {"database_url": "postgresql://h/flag"}),
    # tables: JSON in the environment, merged key by key with the file's
    ({"AZOLLA_DOMAIN_CONCURRENCY": '{"b": 2, "c": 3}'}, "[domain_concurrency]\na = 1\nb = 5\n",
     {}),
    ({"AZOLLA_AUTH": '{"TOKENS": [' + json.dumps(TOKEN) + "]}"},
     '[[auth.tokens]]\nname = "file"\nsha256 = "' + "ab" * 32 + '"\ndomains = ["x"]\n', {}),
    # scalars of every kind from the environment
    ({"AZOLLA_ALLOW_UNSAFE_DB": "1", "AZOLLA_METRICS_PORT": "9464", "AZOLLA_DATA_DIR": "/tmp/x",
      "AZOLLA_LEASE_GRACE_SECONDS": "2.5", "AZOLLA_TLS_REQUIRE_CLIENT_AUTH": "false",
      "AZOLLA_PG_BIN": "/not/a/setting"}, "", {"metrics_port": 9000}),
    ({}, "", {}),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("AZOLLA_") or name.upper() == "DATABASE_URL":
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("env", "toml", "flags"), SCENARIOS)
def test_the_same_settings_as_pydantic_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                env: dict[str, str], toml: str,
                                                flags: dict[str, Any]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "azolla.toml"
    path.write_text(toml)
    ours = load_settings(flags, config_file=path).model_dump()
    monkeypatch.setattr(_ReferenceBase, "file_values",
                        settings_module._server_values(tomllib.loads(toml)))
    expected = Reference(**flags).model_dump()
    assert ours == expected


def test_building_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_PORT", "6001")
    monkeypatch.setenv("AZOLLA_STORE", "memory")
    settings = Settings(port=6002)
    assert (settings.port, settings.store) == (6002, "memory")
    assert Settings.model_validate({"port": 6003}).store == "memory"  # as BaseSettings does
    assert Reference.model_validate({"port": 6003}).store == "memory"


def test_a_table_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AZOLLA_DOMAIN_CONCURRENCY", "a=1")
    with pytest.raises(SettingsError, match="AZOLLA_DOMAIN_CONCURRENCY must be JSON"):
        load_settings()
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", "memory"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("azolla-server: error: invalid settings: domain_concurrency:")
    assert err.count("\n") == 1
    monkeypatch.delenv("AZOLLA_DOMAIN_CONCURRENCY")
    monkeypatch.setenv("AZOLLA_AUTH", '{"tokens": [{"token": "a-secret-development-token"')
    with pytest.raises(SettingsError, match="AZOLLA_AUTH must be JSON") as info:
        load_settings()
    assert "a-secret-development-token" not in str(info.value)


def test_errors_from_the_environment_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZOLLA_METRICS_PORT", "")
    monkeypatch.setenv("AZOLLA_AUTH", '{"tokens": [{"name": "x"}], "other": 1}')
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert "metrics_port" in message
    assert "auth.other: unknown setting" in message


def test_the_server_start_path_does_not_import_pydantic_settings() -> None:
    code = ("import sys\n"
            "from azolla.app.settings import load_settings\n"
            "load_settings({'store': 'memory'})\n"
            "import azolla.app.containers\n"
            "print('pydantic_settings' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split() == ["False"]
