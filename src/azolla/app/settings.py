"""Settings of ``azolla-server``: command-line flags > environment > TOML file > defaults.

:func:`load_settings` builds a validated :class:`Settings`. Environment variables are named
``AZOLLA_<SETTING>`` (``AZOLLA_PORT``, ``AZOLLA_HOST``, ``AZOLLA_STORE``, ...), except the
database URL, which is read from ``DATABASE_URL`` (as the original orchestrator does) or
``AZOLLA_DATABASE_URL``. The TOML file (``--config`` or ``AZOLLA_CONFIG``) uses the setting names
as keys, at the top level or in a ``[server]`` table (whose keys win); a ``[shepherd]`` table is
left to ``azolla-shepherd``, so one file can configure both. Every problem is reported as one
:class:`SettingsError` with a readable one-line message. The page ``docs/configuration.md``
documents each setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from azolla.domain.values import SpecLimits

__all__ = [
    "DEFAULT_PORT",
    "AuthSettings",
    "Settings",
    "SettingsError",
    "TokenSettings",
    "default_data_dir",
    "load_settings",
    "redact_url",
]

#: The orchestrator's port (the original Azolla's).
DEFAULT_PORT = 52710
_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("azolla_file_values", default=None)
#: Tables of a shared TOML file that belong to other programs (``azolla-shepherd`` reads
#: ``[shepherd]``), ignored by the server.
_OTHER_TABLES = ("shepherd",)


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range (the message is one line)."""


def default_data_dir() -> Path:
    """Return where the embedded PostgreSQL keeps its data by default.

    ``$XDG_DATA_HOME/azolla/pgdata``, i.e. ``~/.local/share/azolla/pgdata`` on most systems.
    """
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "azolla" / "pgdata"


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (for logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


Role = Literal["client", "shepherd", "admin"]


class TokenSettings(BaseModel):
    """One bearer token the server accepts (``[[auth.tokens]]`` in the TOML file).

    Attributes:
        name: A label for logs.
        sha256: Hex SHA-256 of the token (preferred: the file then holds no secret).
        token: The token in plain text (for development).
        domains: Domains it may use; ``"*"`` grants every domain.
        roles: ``client`` (ClientService), ``shepherd`` (ClusterService), ``admin``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    token: str | None = Field(default=None, min_length=16, repr=False)
    domains: tuple[str, ...] = Field(min_length=1)
    roles: tuple[Role, ...] = Field(default=("client",), min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> TokenSettings:
        if (self.sha256 is None) == (self.token is None):
            raise ValueError(f"token {self.name!r} needs exactly one of sha256 or token")
        return self

    @property
    def digest(self) -> str:
        """The hex SHA-256 the server compares presented tokens with."""
        if self.sha256 is not None:
            return self.sha256.lower()
        import hashlib

        assert self.token is not None
        return hashlib.sha256(self.token.encode()).hexdigest()


class AuthSettings(BaseModel):
    """Authentication: with no tokens, every call is accepted (bind to loopback then).

    Attributes:
        tokens: The accepted bearer tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: tuple[TokenSettings, ...] = ()


class Settings(BaseModel):
    """Validated settings of ``azolla-server``.

    Building one (``Settings(**values)``) reads the environment too, as a pydantic-settings
    ``BaseSettings`` would: ``values`` win over ``AZOLLA_<SETTING>`` variables (names in any
    case; ``DATABASE_URL`` or ``AZOLLA_DATABASE_URL`` for the URL; JSON for ``auth`` and
    ``domain_concurrency``), which win over the TOML file given to :func:`load_settings`
    (tables are merged key by key); so does ``Settings.model_validate``. The sources are read
    here rather than by pydantic-settings (``tests/unit/app/test_settings_sources.py`` checks
    that both read the same) because importing that package costs every start of the server
    tens of milliseconds before it serves.

    Attributes:
        host: Address the gRPC server listens on.
        port: gRPC port (0 picks a free one).
        database_url: PostgreSQL URL; None runs the embedded PostgreSQL (store ``postgres``).
        store: ``postgres`` (durable) or ``memory`` (nothing survives a restart).
        data_dir: Data folder of the embedded PostgreSQL; None means :func:`default_data_dir`.
        allow_unsafe_db: Start even if the database runs with fsync or synchronous_commit off.
        metrics_port: Port of the Prometheus ``/metrics`` endpoint; None turns it off.
        metrics_host: Address the metrics endpoint listens on.
        log_format: ``console``, ``json``, or ``auto`` (console on a terminal, else JSON).
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        heartbeat_interval_ms: How often shepherds must send a Status.
        heartbeat_timeout_ms: Silence after which a shepherd's stream is closed.
        ping_interval_ms: How often the server pings each shepherd stream.
        lease_grace_seconds: Extra time past a task's timeout before the orchestrator times
            the attempt out itself.
        reconnect_grace_seconds: After a restart, how long running attempts wait for their
            shepherd to reconnect before they are declared lost.
        shutdown_grace_seconds: Time RPCs in flight get to finish on shutdown.
        max_message_mb: Largest gRPC message, in MiB.
        max_batch: Most tasks in one CreateTasks request or SubmitTasks message.
        max_payload_bytes: Largest args plus kwargs of one task, in bytes.
        max_concurrent_rpcs: Most RPCs (streams included) served at once; further calls are
            answered RESOURCE_EXHAUSTED.
        hello_timeout_ms: Time a new shepherd stream may take to send its Hello before the
            server ends it.
        queue_limit: Most events waiting to be committed before submissions are refused with
            RESOURCE_EXHAUSTED (backpressure).
        pool_size: Read connections to PostgreSQL.
        outcome_cache: Finished tasks kept in memory for fast waits (older ones are read
            from the database).
        domain_concurrency: Optional per-domain limit on running attempts.
        auth: Bearer tokens (``[[auth.tokens]]``); none means no authentication.
        tls_cert_file: PEM certificate chain; with ``tls_key_file`` the server speaks TLS.
        tls_key_file: PEM private key of ``tls_cert_file``.
        tls_client_ca_file: PEM CA that signs client certificates (mutual TLS).
        tls_require_client_auth: Refuse connections without a client certificate signed by
            ``tls_client_ca_file``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "DATABASE_URL", "AZOLLA_DATABASE_URL"),
    )
    store: Literal["postgres", "memory"] = "postgres"
    data_dir: Path | None = None
    allow_unsafe_db: bool = False
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    heartbeat_interval_ms: int = Field(default=2000, ge=50, le=3_600_000)
    heartbeat_timeout_ms: int = Field(default=10_000, ge=100, le=86_400_000)
    ping_interval_ms: int = Field(default=5000, ge=50, le=3_600_000)
    lease_grace_seconds: float = Field(default=5.0, ge=0, le=86_400)
    reconnect_grace_seconds: float = Field(default=10.0, ge=0, le=86_400)
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=3600)
    max_message_mb: int = Field(default=64, ge=1, le=2047)
    max_batch: int = Field(default=10_000, ge=1, le=1_000_000)
    max_payload_bytes: int = Field(default=1 << 20, ge=1024, le=256 << 20)
    max_concurrent_rpcs: int = Field(default=10_000, ge=1, le=1_000_000)
    hello_timeout_ms: int = Field(default=10_000, ge=100, le=3_600_000)
    queue_limit: int = Field(default=20_000, ge=1, le=10_000_000)
    pool_size: int = Field(default=4, ge=1, le=100)
    outcome_cache: int = Field(default=100_000, ge=0, le=100_000_000)
    domain_concurrency: dict[str, int] = Field(default_factory=dict)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_require_client_auth: bool = False

    @field_validator("host", "metrics_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a host name or IP address")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        scheme = urlsplit(value).scheme
        if scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a PostgreSQL URL such as "
                             "postgresql://user:password@host:5432/azolla")
        return value

    @field_validator("log_format", "log_level", "store", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("domain_concurrency")
    @classmethod
    def _check_limits(cls, value: dict[str, int]) -> dict[str, int]:
        for domain, limit in value.items():
            if limit < 1:
                raise ValueError(f"the limit of domain {domain!r} must be at least 1")
        return value

    @model_validator(mode="after")
    def _check_heartbeats(self) -> Settings:
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"heartbeat_timeout_ms ({self.heartbeat_timeout_ms}) must be larger than "
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms})")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_cert_file is None and (self.tls_client_ca_file is not None
                                           or self.tls_require_client_auth):
            raise ValueError("tls_client_ca_file and tls_require_client_auth need "
                             "tls_cert_file and tls_key_file")
        if self.tls_require_client_auth and self.tls_client_ca_file is None:
            raise ValueError("tls_require_client_auth needs tls_client_ca_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"{name}: {str(path)!r} is not a readable file")
        digests = [t.digest for t in self.auth.tokens]
        if len(set(digests)) != len(digests):
            raise ValueError("auth.tokens holds the same token twice")
        return self

    def __init__(self, **values: Any) -> None:
        """Validate ``values`` over the environment and the TOML file (see the class)."""
        file_values = _FILE_VALUES.get()
        super().__init__(**_merge(_by_field_name(file_values or {}), _environment(),
                                  _by_field_name(values)))

    # -- derived values ------------------------------------------------------------------------

    @property
    def resolved_data_dir(self) -> Path:
        """The embedded PostgreSQL data folder (``data_dir`` or the default)."""
        return (self.data_dir or default_data_dir()).expanduser()

    @property
    def embedded(self) -> bool:
        """True when the server runs its own PostgreSQL (postgres store, no URL)."""
        return self.store == "postgres" and self.database_url is None

    @property
    def tls(self) -> bool:
        """True when the server speaks TLS."""
        return self.tls_cert_file is not None

    @property
    def loopback_only(self) -> bool:
        """True when ``host`` is a loopback address or ``localhost``."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def limits(self) -> SpecLimits:
        """Bounds on submissions."""
        return SpecLimits(max_payload_bytes=self.max_payload_bytes)


#: Prefix of the environment variables of the settings.
_ENV_PREFIX = "AZOLLA_"
#: Settings given as JSON in the environment (a table in the file).
_JSON_SETTINGS = ("domain_concurrency", "auth")


def _aliases(name: str) -> tuple[str, ...]:
    """The names the setting ``name`` may be given by: its validation aliases, else itself."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice) for choice in alias.choices)
    return (name,)


def _env_names(name: str) -> tuple[str, ...]:
    """Lower-case names of the environment variables of setting ``name``, first one wins."""
    if Settings.model_fields[name].validation_alias is not None:
        return tuple(dict.fromkeys(a.lower() for a in _aliases(name)))  # no prefix
    return ((_ENV_PREFIX + name).lower(),)


def _by_field_name(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with aliases (``DATABASE_URL``, ...) renamed to the field name."""
    renamed = dict(values)
    for name in ("database_url",):
        for alias in _aliases(name):
            if alias != name and alias in renamed:
                value = renamed.pop(alias)
                renamed.setdefault(name, value)  # the field name wins, then the first alias
    return renamed


def _environment() -> dict[str, Any]:
    """The settings found in the environment (variable names in any case)."""
    env = {key.lower(): value for key, value in os.environ.items()}
    found: dict[str, Any] = {}
    for name in Settings.model_fields:
        for env_name in _env_names(name):
            if env_name in env:
                break
        else:
            continue
        value: Any = env[env_name]
        if name in _JSON_SETTINGS:
            try:
                value = json.loads(value)
            except ValueError as exc:  # the value is not echoed: it may hold a token
                raise SettingsError(
                    f"invalid settings: {name}: the environment variable {env_name.upper()} "
                    f"must be JSON ({exc})") from None
            if name == "auth" and isinstance(value, dict):  # table keys in any case
                keys = {key.lower(): key for key in AuthSettings.model_fields}
                value = {keys.get(key.lower(), key): item for key, item in value.items()}
        found[name] = value
    return found


def _merge(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``sources``: later ones win; tables (dicts) are merged key by key."""
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = _merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _one_line(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(
                err["input"], dict) and err["loc"][:1] != ("auth",):  # auth may hold tokens
            shown = repr(err["input"])
            if where == "database_url":
                shown = repr(redact_url(str(err["input"])))
            message = f"{message} (got {shown[:80]})"
        problems.append(f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)


def load_settings(overrides: Mapping[str, Any] | None = None, *,
                  config_file: str | Path | None = None) -> Settings:
    """Build the settings from flags (``overrides``), the environment and a TOML file.

    Args:
        overrides: Values given on the command line (None values are ignored).
        config_file: A TOML file; default ``$AZOLLA_CONFIG`` if set, else no file.

    Returns:
        The validated settings.

    Raises:
        SettingsError: A value is invalid, or the file cannot be read or parsed.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config_file is None:
        config_file = os.environ.get("AZOLLA_CONFIG") or None
    values: dict[str, Any] | None = None
    if config_file is not None:
        import tomllib  # only with a file: not on every start

        path = Path(config_file).expanduser()
        try:
            with path.open("rb") as handle:
                values = _server_values(tomllib.load(handle))
        except OSError as exc:
            raise SettingsError(f"cannot read the config file {str(path)!r}: "
                                f"{exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"the config file {str(path)!r} is not valid TOML: {exc}") \
                from None
    token = _FILE_VALUES.set(values)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    finally:
        _FILE_VALUES.reset(token)


def _server_values(document: dict[str, Any]) -> dict[str, Any]:
    """The server's keys of a TOML document: top level, overridden by a ``[server]`` table.

    Tables of other programs (``[shepherd]``) are left out, so one file can configure a server
    and its shepherds.
    """
    values = {k: v for k, v in document.items() if k not in (*_OTHER_TABLES, "server")}
    section = document.get("server")
    if section is not None:
        if not isinstance(section, dict):
            raise SettingsError("the config file's 'server' entry must be a table ([server])")
        values.update(section)
    return values
