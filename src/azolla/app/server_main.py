"""``azolla-server`` (alias ``azolla-orchestrator``): run the orchestrator.

Usage::

    azolla-server [--host H] [--port P] [--database-url URL] [--store postgres|memory]
                  [--config FILE] [--data-dir DIR] [--allow-unsafe-db] [--metrics-port P]
                  [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]
                  [--log-format auto|console|json] [--log-level LEVEL]

Settings come from the flags, then the environment (``AZOLLA_*``, ``DATABASE_URL``), then the
TOML file (``--config`` or ``AZOLLA_CONFIG``); see ``docs/configuration.md``.

Exit codes: 0 after a clean shutdown (SIGTERM or SIGINT), 1 when the server could not start
(database unreachable or unsafe, port in use, ...), 2 for invalid settings or flags. Errors are
one line on stderr, never a traceback (the log has the details).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # imported in main(), once garbage collection is paused
    from azolla.app.settings import Settings

__all__ = ["build_parser", "main", "run", "serve"]

PROG = "azolla-server"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Report a bad flag in one line (argparse's default prints the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Return the command-line parser of ``azolla-server``."""
    from azolla.app.settings import DEFAULT_PORT

    parser = _Parser(
        prog=prog,
        description="Run the Azolla orchestrator: a gRPC server for clients and shepherds, "
                    "with its event log in PostgreSQL (embedded by default) or in memory.",
        epilog="Flags win over environment variables (AZOLLA_HOST, AZOLLA_PORT, AZOLLA_STORE, "
               "DATABASE_URL, ...), which win over the config file. Docs: "
               "docs/configuration.md.",
    )
    add = parser.add_argument
    add("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    add("--port", type=int, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks a free one)")
    add("--database-url", help="PostgreSQL URL (default: an embedded PostgreSQL in --data-dir)")
    add("--store", choices=("postgres", "memory"),
        help="event store: postgres (default, durable) or memory (lost on exit)")
    add("--config", metavar="FILE", help="TOML file with settings (default $AZOLLA_CONFIG)")
    add("--data-dir", metavar="DIR",
        help="data folder of the embedded PostgreSQL (default ~/.local/share/azolla/pgdata)")
    add("--allow-unsafe-db", action="store_true", default=None,
        help="start even if the database has fsync or synchronous_commit off")
    add("--metrics-port", type=int, metavar="P",
        help="serve Prometheus metrics on http://127.0.0.1:P/metrics (default: off)")
    add("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    add("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    add("--tls-client-ca", metavar="FILE",
        help="PEM CA of client certificates: require mutual TLS")
    add("--log-format", choices=("auto", "console", "json"),
        help="log format (default auto: console on a terminal, else JSON)")
    add("--log-level", choices=("debug", "info", "warning", "error"),
        help="lowest level logged (default info)")
    add("--version", action=_VersionAction)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (reading the installed package's
    metadata costs every start a few milliseconds otherwise)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog} {_version()}", flush=True)  # on stdout, as argparse's own
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("azolla")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _import_structlog(log_format: str) -> None:
    """Import structlog, without rich and colorama when the logs are JSON.

    structlog imports them (~60 modules, ~100 ms here) only to render tracebacks on a
    console; JSON logs never use them, and every restart pays the import before it serves.
    """
    if "structlog" in sys.modules:
        return
    if log_format == "console" or (log_format == "auto" and sys.stderr.isatty()):
        return
    from azolla.app._imports import without

    with without("rich", "colorama"):
        import structlog  # noqa: F401


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


async def serve(settings: Settings, *, stop: asyncio.Event | None = None,
                on_ready: Callable[[Any], None] | None = None) -> int:
    """Run the server until ``stop`` is set (or SIGTERM/SIGINT); return the exit code.

    Args:
        settings: Validated settings.
        stop: Set it to shut down; default: a new event set by SIGTERM and SIGINT.
        on_ready: Called with the :class:`~azolla.adapters.grpc.server.GrpcServer` once it
            serves.

    Returns:
        0 after a clean shutdown, 1 if the server could not start.
    """
    import structlog

    from azolla.app.containers import Container, resolve, shutdown
    from azolla.app.settings import redact_url

    log = structlog.get_logger("azolla.server")
    loop = asyncio.get_running_loop()
    stop_event = stop if stop is not None else asyncio.Event()
    signals: list[int] = []
    received: list[str] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if received:
            log.error("second signal: exiting at once", signal=name)
            os._exit(1)
        received.append(name)
        stop_event.set()

    if stop is None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, on_signal, signum)
                signals.append(signum)
    container = Container(settings=settings)
    try:
        server = await resolve(container.grpc_server)
        await resolve(container.metrics)
    except Exception as exc:
        log.debug("start failed", exc_info=exc)
        message = _first_line(exc)
        if type(exc).__name__ == "UnsafeDatabaseSettings":
            message += " (use --allow-unsafe-db to start anyway, at the risk of losing tasks)"
        print(f"{PROG}: error: could not start: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            await shutdown(container)
        _remove_handlers(loop, signals)
        return 1
    store = settings.store
    where = ("in memory" if store == "memory"
             else f"embedded PostgreSQL in {settings.resolved_data_dir}" if settings.embedded
             else redact_url(settings.database_url or ""))
    if not settings.auth.tokens and not settings.loopback_only:
        log.warning("listening beyond this machine without authentication: anyone who can "
                    "reach the port can submit and run tasks; configure [[auth.tokens]] (and "
                    "TLS)", host=settings.host)
    log.info("azolla-server ready", address=server.address, store=store, database=where,
             tls=settings.tls, auth=bool(settings.auth.tokens))
    if on_ready is not None:
        on_ready(server)
    try:
        await stop_event.wait()
    finally:
        log.info("shutting down", signal=received[0] if received else None)
        try:
            await shutdown(container)
        except Exception as exc:
            print(f"{PROG}: error: shutdown failed: {_first_line(exc)}", file=sys.stderr)
            _remove_handlers(loop, signals)
            return 1
        _remove_handlers(loop, signals)
    log.info("stopped")
    return 0


def _remove_handlers(loop: asyncio.AbstractEventLoop, signals: list[int]) -> None:
    for signum in signals:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signum)


def run(settings: Settings) -> int:
    """Run :func:`serve` on a new event loop (uvloop when installed); return the exit code."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        factory = None
    on_ready = _resume_gc if _gc_paused else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(settings, on_ready=on_ready))


#: True while :func:`main` keeps garbage collection off for the start-up.
_gc_paused = False


def _pause_gc() -> None:
    """Turn garbage collection off for the start-up (see :func:`_resume_gc`).

    Until it serves, the server allocates some 100,000 objects that live as long as it does
    (modules, classes, the task set folded from the log) and frees almost nothing, so every
    collection would traverse them again for no gain: about a tenth of the start-up CPU.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


#: ``gc.set_threshold`` while serving. With Python's default (700, 10, 10), running 20,000
#: tasks through the decision loop took some 800 collections, 30-40 % of the process's CPU,
#: with pauses up to ~0.5 s (full collections over the task set); with these, 5 collections
#: and pauses under ~25 ms (``bench/orchestrator_core.py --gc-threshold default``, loaded
#: 2-core host). Almost all garbage is freed by reference counting; the cyclic rest waits a
#: little longer.
SERVING_GC_THRESHOLD = (50_000, 50, 100)


def _resume_gc(_server: Any = None, *, freeze: bool = True) -> None:
    """Once serving: move the start-up objects out of later collections, collect again,
    less often (:data:`SERVING_GC_THRESHOLD`)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        if freeze:
            gc.freeze()
            gc.set_threshold(*SERVING_GC_THRESHOLD)
        gc.enable()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``azolla-server`` and ``azolla-orchestrator`` commands."""
    # gRPC's C core logs errors (e.g. a failed bind) on stderr itself; the server reports them
    # in its own words. GRPC_VERBOSITY set by the user still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    _pause_gc()
    try:
        _main(argv)
    finally:
        _resume_gc(freeze=False)  # still paused only when it never served (e.g. bad flags)


def _main(argv: Sequence[str] | None) -> NoReturn:
    from azolla.app.settings import SettingsError, load_settings

    prog = os.path.basename(sys.argv[0]) if argv is None and sys.argv else PROG
    if prog not in ("azolla-server", "azolla-orchestrator"):
        prog = PROG
    args = build_parser(prog).parse_args(argv)
    flags = {
        "host": args.host,
        "port": args.port,
        "database_url": args.database_url,
        "store": args.store,
        "data_dir": args.data_dir,
        "allow_unsafe_db": args.allow_unsafe_db,
        "metrics_port": args.metrics_port,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
        "tls_require_client_auth": True if args.tls_client_ca else None,
    }
    try:
        settings = load_settings(flags, config_file=args.config)
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _import_structlog(settings.log_format)
    from azolla.app.logging import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        code = run(settings)
    except KeyboardInterrupt:  # pragma: no cover - a signal before the handlers were set
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
