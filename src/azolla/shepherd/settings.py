"""Shepherd settings: command-line flags, ``AZOLLA_*`` environment variables and a TOML file.

Precedence, highest first: explicit values (command-line flags, ``Worker(...)`` arguments),
environment variables, the TOML file, built-in defaults. The TOML file holds the keys below
either at the top level or in a ``[shepherd]`` table (so one file can configure a server and
its shepherds); unknown keys are errors, so a typo does not silently fall back to a default.

| setting | environment variable | default |
|---|---|---|
| ``orchestrator`` | ``AZOLLA_ORCHESTRATOR`` | ``http://127.0.0.1:52710`` |
| ``tasks`` | ``AZOLLA_TASKS`` (comma separated) | none |
| ``domain`` | ``AZOLLA_DOMAIN`` | ``default`` |
| ``group`` | ``AZOLLA_GROUP`` | ``default`` |
| ``concurrency`` | ``AZOLLA_CONCURRENCY`` | number of CPUs |
| ``mode`` | ``AZOLLA_MODE`` | ``process`` |
| ``worker_command`` | ``AZOLLA_WORKER_COMMAND`` | none |
| ``ca_file`` | ``AZOLLA_CA_FILE`` | none (system roots) |
| ``token`` / ``token_file`` | ``AZOLLA_TOKEN`` / ``AZOLLA_TOKEN_FILE`` | none |
| ``drain_timeout`` | ``AZOLLA_DRAIN_TIMEOUT`` | 30 s |
| ``task_timeout`` | ``AZOLLA_TASK_TIMEOUT`` | none |
| ``memory_limit`` | ``AZOLLA_MEMORY_LIMIT`` (``512M``, ``2G``) | none |

See ``docs/shepherd.md`` for every setting.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from azolla.shepherd.connection import DEFAULT_ORCHESTRATOR_URL, parse_orchestrator_url

__all__ = [
    "ExecutionMode",
    "SettingsError",
    "ShepherdSettings",
    "default_concurrency",
    "load_settings",
    "parse_size",
]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class ExecutionMode(StrEnum):
    """How a shepherd runs attempts.

    Attributes:
        PROCESS: A fresh child process per attempt (the default: the strongest isolation).
        POOL: Long-lived worker processes that each run one attempt at a time and are
            replaced when they die (for throughput).
    """

    PROCESS = "process"
    POOL = "pool"


class SettingsError(ValueError):
    """A setting is invalid; the message is one line naming the setting and the problem."""


def default_concurrency() -> int:
    """Return the default number of attempts a shepherd runs at once: the CPU count."""
    return max(os.cpu_count() or 1, 1)


class ShepherdSettings(BaseSettings):
    """Everything a shepherd needs to know to serve an orchestrator.

    Attributes:
        orchestrator: Orchestrator URL: ``http://host:port`` (plaintext) or
            ``https://host:port`` (TLS); a bare ``host:port`` means ``http``.
        tasks: Modules to import; every ``@azolla_task`` they define is registered.
        domain: The domain whose tasks this shepherd runs.
        group: The shepherd group whose tasks this shepherd runs.
        concurrency: Attempts run at once (``max_concurrency`` in the Hello).
        mode: ``process`` or ``pool``.
        worker_command: Run every attempt with this executable instead (the upstream worker
            command-line contract); split like a shell would, but never run by a shell. With
            ``tasks`` too, the command gets them in ``AZOLLA_TASKS`` (as ``azolla-worker``
            expects).
        worker_stdin: Send the task to the worker command on stdin instead of ``--args`` and
            ``--kwargs`` (the worker must support it). None: only for ``azolla-worker``.
        ca_file: PEM file of the certificate authorities trusted for ``https``.
        cert_file: PEM client certificate (chain) for orchestrators that require mutual TLS.
        key_file: PEM private key of ``cert_file``.
        token: Bearer token sent in the ``authorization`` metadata of the stream.
        token_file: File holding the bearer token (preferred over ``token``: not visible in
            the environment of other processes).
        drain_timeout: On SIGTERM/Ctrl-C, how long running attempts may take to finish
            before they are stopped (seconds).
        reconnect_max_delay: Cap of the exponential reconnection backoff (seconds).
        ack_delay: Attempts still running this long after they started are acknowledged to
            the orchestrator (seconds); shorter attempts only report their outcome.
        max_buffered_results: Most outcomes kept for delivery while disconnected.
        task_timeout: Per-attempt timeout (seconds) for tasks submitted without one.
        memory_limit: Address-space limit of each worker process in bytes (suffixes ``K``,
            ``M``, ``G`` accepted: ``"512M"``); a task's own memory limit can only lower it.
        cpu_limit: CPU seconds each attempt may use.
        open_files: Open-file limit of each worker process.
        kill_grace: Seconds between SIGTERM and SIGKILL when an attempt is stopped.
        max_attempts_per_worker: In pool mode, replace a worker after this many attempts.
        prefetch: In pool mode, attempts queued in a busy worker's pipe behind the one it runs,
            so that it goes on without waiting; the shepherd then offers the orchestrator
            ``concurrency * (1 + prefetch)`` slots while running ``concurrency`` attempts at
            once (0, the default: one attempt per worker; see docs/shepherd.md for when 1
            pays).
        allow_env: Environment variables passed to workers although the clean-environment
            rule would drop them (comma separated in ``AZOLLA_ALLOW_ENV``).
        log_format: ``console``, ``json``, or ``auto`` (console on a terminal, else JSON).
        log_level: Logging level name.
    """

    model_config = SettingsConfigDict(
        env_prefix="AZOLLA_",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    orchestrator: str = DEFAULT_ORCHESTRATOR_URL
    tasks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    domain: str = Field(default="default", pattern=_NAME_PATTERN)
    group: str = Field(default="default", pattern=_NAME_PATTERN)
    concurrency: int = Field(default_factory=default_concurrency, ge=1, le=100_000)
    mode: ExecutionMode = ExecutionMode.PROCESS
    worker_command: str | None = None
    worker_stdin: bool | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    drain_timeout: float = Field(default=30.0, ge=0.0, le=86_400.0)
    reconnect_max_delay: float = Field(default=5.0, gt=0.0, le=3600.0)
    ack_delay: float = Field(default=0.05, ge=0.0, le=60.0)
    max_buffered_results: int = Field(default=100_000, ge=1)
    task_timeout: float | None = Field(default=None, gt=0.0)
    memory_limit: int | None = Field(default=None, gt=0)
    cpu_limit: int | None = Field(default=None, ge=1)
    open_files: int | None = Field(default=1024, ge=16)
    kill_grace: float = Field(default=2.0, ge=0.0, le=600.0)
    max_attempts_per_worker: int | None = Field(default=None, ge=1)
    prefetch: int = Field(default=0, ge=0, le=16)
    allow_env: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: str = "INFO"

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_size(value)
        return value

    @field_validator("tasks", "allow_env", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            out: list[str] = []
            for item in value:
                if not isinstance(item, str):
                    return value  # let pydantic report the type error
                out.extend(part.strip() for part in item.split(",") if part.strip())
            return out
        return value

    @field_validator("orchestrator")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parse_orchestrator_url(value)
        return value

    @field_validator("worker_command")
    @classmethod
    def _check_command(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not parts:
            return None
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _check_files(self) -> ShepherdSettings:
        for name in ("ca_file", "cert_file", "key_file", "token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def worker_argv(self) -> list[str] | None:
        """The worker command split into an argument vector, or None."""
        return shlex.split(self.worker_command) if self.worker_command else None

    @property
    def task_via_stdin(self) -> bool:
        """Whether the worker command gets the task on stdin (see ``worker_stdin``)."""
        if self.worker_stdin is not None:
            return self.worker_stdin
        argv = self.worker_argv
        return argv is not None and Path(argv[0]).name == "azolla-worker"

    def bearer_token(self) -> str | None:
        """Return the bearer token (read from ``token_file`` when given), or None."""
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        if self.token is not None:
            return self.token.get_secret_value() or None
        return None

    def root_certificates(self) -> bytes | None:
        """Return the PEM bytes of ``ca_file``, or None for the system roots."""
        return self.ca_file.read_bytes() if self.ca_file is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values, then the environment, then the TOML file (no dotenv, no secrets dir)."""
        file_values, use_environment = _LOAD_CONTEXT.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if use_environment:
            sources.append(env_settings)
        if file_values:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=file_values))
        return tuple(sources)


# The TOML values of the load in progress and whether to read the environment
# (pydantic-settings builds its sources from the class, not the call).
_LOAD_CONTEXT: ContextVar[tuple[dict[str, Any] | None, bool]] = ContextVar(
    "azolla_shepherd_load_context", default=(None, True))


def parse_size(text: str) -> int | None:
    """Parse a byte size: ``"1048576"``, ``"512K"``, ``"512M"``, ``"2G"`` (powers of 1024).

    Args:
        text: The size; empty or ``"none"`` means no limit.

    Returns:
        Bytes, or None.

    Raises:
        ValueError: The text is not a size.
    """
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    if value in ("", "NONE", "0"):
        return None
    factor = 1
    for suffix, size in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if value.endswith(suffix):
            value, factor = value[:-1], size
            break
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 536870912, 512M or 2G)") from None
    if number <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(number * factor)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get("shepherd")
    if isinstance(section, dict):
        return dict(section)
    return data


def _one_line(exc: ValidationError) -> str:
    parts: list[str] = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "settings"
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts).replace("\n", " ")


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    config_file: Path | str | None = None,
    *,
    use_environment: bool = True,
) -> ShepherdSettings:
    """Build the settings from explicit values, the environment and a TOML file.

    Args:
        overrides: Explicit values (e.g. command-line flags); None values are ignored.
        config_file: TOML file; when None (and ``use_environment``), ``AZOLLA_CONFIG`` names
            it if set.
        use_environment: Read ``AZOLLA_*`` variables (False: explicit values and defaults
            only, as :class:`azolla.Worker` does).

    Returns:
        The validated settings.

    Raises:
        SettingsError: A one-line description of every invalid setting.
    """
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config_file is None and use_environment:
        config_file = os.environ.get("AZOLLA_CONFIG") or None
    file_values = _read_toml(Path(config_file)) if config_file is not None else {}
    token = _LOAD_CONTEXT.set((file_values, use_environment))
    try:
        return ShepherdSettings(**values)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    finally:
        _LOAD_CONTEXT.reset(token)
