"""``azolla``: the operator's command line.

Submit and inspect tasks, list tasks and shepherds, tail the event log, cancel and retry tasks,
requeue dead letters, migrate the database schema, run retention, and start a development
setup. Every command except ``migrate`` and ``retention run`` talks to the orchestrator over
gRPC (``--server``, default ``http://127.0.0.1:52710``) and so follows the server's rules.

Usage::

    azolla [--server URL] [--token T] [--json] COMMAND [ARGS]...

The reference of every command is ``docs/cli.md``, generated from this module by
``scripts/gen_cli_docs.py``. Exit codes are listed in :mod:`azolla.app.cli_support`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from azolla.app.cli_support import (
    DEFAULT_SERVER,
    EXIT_USAGE,
    CliError,
    CliOptions,
    fail,
    parse_days,
    parse_json,
    parse_time,
    run_async,
)

__all__ = ["app", "main"]

EPILOG = ("Exit codes: 0 ok; 1 task failed, cancelled or not found, or operation refused; "
          "2 usage; 3 server or database unavailable; 4 not authorised; 5 internal error; "
          "124 wait timed out; 130 interrupted.")

# Recent typer versions ship their own copy of click as ``typer._click``; older ones use click.
try:
    _errors: Any = importlib.import_module("typer._click.exceptions")
except ImportError:  # pragma: no cover - typer < 0.20
    _errors = importlib.import_module("click.exceptions")

TASK_STATES = ("queued", "running", "retry_wait", "succeeded", "failed", "cancelled")


class AzollaGroup(TyperGroup):
    """The top-level command group: usage errors are reported in one line (exit code 2)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        """Run the command line (see ``click.Command.main``); one-line usage errors."""
        try:
            result = super().main(args, prog_name or "azolla", complete_var,
                                  standalone_mode=False,
                                  windows_expand_args=windows_expand_args, **extra)
        except _errors.NoArgsIsHelpError as exc:
            exc.show()
            result = exc.exit_code
        except _errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "azolla"
            typer.echo(f"azolla: error: {exc.format_message()} (see '{where} --help')",
                       err=True)
            result = EXIT_USAGE
        except _errors.ClickException as exc:
            typer.echo(f"azolla: error: {exc.format_message()}", err=True)
            result = exc.exit_code
        except CliError as exc:
            typer.echo(f"azolla: error: {exc.message}", err=True)
            result = exc.code
        except typer.Abort:
            typer.echo("azolla: aborted", err=True)
            result = 130
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=AzollaGroup,
    name="azolla",
    help="Operate an Azolla orchestrator: submit and inspect tasks, list tasks and shepherds, "
         "tail events, retry failures, requeue dead letters, migrate and prune the database.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
tasks_app = typer.Typer(help="List tasks.", no_args_is_help=True)
events_app = typer.Typer(help="Read the event log.", no_args_is_help=True)
shepherds_app = typer.Typer(help="Inspect the connected shepherds.", no_args_is_help=True)
dead_letters_app = typer.Typer(help="Failed tasks: list them, run them again.",
                               no_args_is_help=True)
retention_app = typer.Typer(help="Drop old event history (talks to the database).",
                            no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(events_app, name="events")
app.add_typer(shepherds_app, name="shepherds")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(retention_app, name="retention")


# -- shared options ---------------------------------------------------------------------------

DomainOption = Annotated[str, typer.Option(
    "--domain", "-d", envvar="AZOLLA_DOMAIN", show_envvar=True, help="Domain of the task(s).")]
TaskIdArgument = Annotated[str, typer.Argument(help="The task's id.", show_default=False)]
WaitTimeoutOption = Annotated[float | None, typer.Option(
    "--wait-timeout", min=0, help="With --wait: give up waiting after this many seconds "
    "(exit code 124; the task goes on).")]
NameFilter = Annotated[str, typer.Option("--name", help="Only tasks with this name.")]
SinceFilter = Annotated[str | None, typer.Option(
    "--since", help="Only tasks submitted at or after this time: ISO 8601 "
    "(2024-05-01T12:00:00Z, UTC if no zone) or an age such as 30m, 2h, 7d.")]
UntilFilter = Annotated[str | None, typer.Option(
    "--until", help="Only tasks submitted before this time (same forms as --since).")]
LimitOption = Annotated[int, typer.Option(
    "--limit", min=1, max=1000, help="Tasks per page.")]
CursorOption = Annotated[int, typer.Option(
    "--cursor", min=0, help="Start after this cursor (printed under the previous page).")]
AllOption = Annotated[bool, typer.Option("--all", help="Fetch every page.")]
DatabaseUrlOption = Annotated[str | None, typer.Option(
    "--database-url", envvar=["DATABASE_URL", "AZOLLA_DATABASE_URL"], show_envvar=True,
    help="PostgreSQL URL, e.g. postgresql://user:password@host:5432/azolla.")]


def _options(ctx: typer.Context) -> CliOptions:
    options = ctx.find_object(CliOptions)
    return options if options is not None else CliOptions()


def _output(ctx: typer.Context) -> Any:
    from azolla.app.cli_render import Output

    return Output(_options(ctx).json)


def _finish(code: int) -> NoReturn:
    raise typer.Exit(code)


@app.callback()
def _global(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(
        "--server", "-s", envvar="AZOLLA_SERVER", show_envvar=True,
        help="Orchestrator URL: http://host:port, https://host:port (TLS) or host:port.")
    ] = DEFAULT_SERVER,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="AZOLLA_TOKEN", show_envvar=True,
        help="Bearer token sent with every call (prefer the environment variable: command "
             "lines are visible to other users).")] = None,
    ca_file: Annotated[str | None, typer.Option(
        "--ca-file", envvar="AZOLLA_CA_FILE", show_envvar=True,
        help="PEM certificate authorities that sign the server's certificate (https only; "
             "default: the system's).")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, envvar="AZOLLA_TIMEOUT", show_envvar=True,
        help="Seconds to connect and for each request (not for waits).")] = 10.0,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print JSON for scripts (one document, or one per line for streams) "
                       "instead of tables.")] = False,
) -> None:
    """Operate an Azolla orchestrator."""
    ctx.obj = CliOptions(server=server, token=token or None, ca_file=ca_file,
                         timeout=timeout, json=json_output)


# -- tasks -----------------------------------------------------------------------------------


@app.command(epilog=EPILOG)
def submit(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The task name, as registered by its "
                                             "@azolla_task.", show_default=False)],
    args: Annotated[str | None, typer.Option(
        "--args", "-a", help="Arguments as JSON: an array is the positional arguments, an "
        "object the keyword arguments, any other value one argument.")] = None,
    kwargs: Annotated[str | None, typer.Option(
        "--kwargs", "-k", help="Keyword arguments as a JSON object.")] = None,
    domain: DomainOption = "default",
    wait: Annotated[bool, typer.Option(
        "--wait", "-w", help="Wait for the outcome and print it (exit code 1 if the task "
                             "fails).")] = False,
    wait_timeout: WaitTimeoutOption = None,
    group: Annotated[str | None, typer.Option(
        "--group", help="Run on shepherds of this group.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="The same key in the same domain returns the same task.")
    ] = None,
    priority: Annotated[int, typer.Option(
        "--priority", help="Higher runs first among ready tasks.")] = 0,
    delay: Annotated[float | None, typer.Option(
        "--delay", min=0, help="Start no sooner than this many seconds from now.")] = None,
    task_timeout: Annotated[float | None, typer.Option(
        "--task-timeout", min=0.001, help="Per-attempt timeout in seconds.")] = None,
    max_attempts: Annotated[int | None, typer.Option(
        "--max-attempts", min=1, help="Attempts at most, the first included (default: the "
                                      "server's retry policy).")] = None,
) -> None:
    """Submit a task; with --wait, wait for its result."""
    from azolla.app import cli_remote

    positional, keywords = cli_remote.split_arguments(
        parse_json(args, "--args"), parse_json(kwargs, "--kwargs", expect=dict))
    spec = cli_remote.SubmitSpec(name=name, args=positional, kwargs=keywords, group=group,
                                 idempotency_key=idempotency_key, priority=priority,
                                 delay=delay, task_timeout=task_timeout,
                                 max_attempts=max_attempts)
    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.submit(options, out, domain, spec, wait=wait,
                                                wait_timeout=wait_timeout)))


@app.command(epilog=EPILOG)
def status(ctx: typer.Context, task_id: TaskIdArgument, domain: DomainOption = "default"
           ) -> None:
    """Show a task's state, arguments, result or error, and every attempt."""
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.status(options, out, domain, task_id)))


@app.command(epilog=EPILOG)
def watch(ctx: typer.Context, task_id: TaskIdArgument, domain: DomainOption = "default"
          ) -> None:
    """Print the task's state changes live until it ends (exit code 1 if it fails)."""
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.watch(options, out, domain, task_id)))


@app.command(epilog=EPILOG)
def cancel(
    ctx: typer.Context,
    task_id: TaskIdArgument,
    domain: DomainOption = "default",
    reason: Annotated[str, typer.Option("--reason", help="Recorded with the cancellation.")
                      ] = "cancelled by the azolla CLI",
) -> None:
    """Cancel a task; a running attempt is stopped. A task that already ended is left as is."""
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.cancel(options, out, domain, task_id, reason)))


@app.command(epilog=EPILOG)
def retry(
    ctx: typer.Context,
    task_id: TaskIdArgument,
    domain: DomainOption = "default",
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the new task's outcome.")
                    ] = False,
    wait_timeout: WaitTimeoutOption = None,
) -> None:
    """Run a failed or cancelled task again, as a new task with the same name and arguments.

    Retrying the same task twice returns the same new task.
    """
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.retry(options, out, domain, task_id, wait=wait,
                                               wait_timeout=wait_timeout)))


@tasks_app.command("list", epilog=EPILOG)
def tasks_list(
    ctx: typer.Context,
    domain: DomainOption = "default",
    state: Annotated[str | None, typer.Option(
        "--state", help=f"Only tasks in this state: {', '.join(TASK_STATES)}.")] = None,
    name: NameFilter = "",
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: LimitOption = 50,
    cursor: CursorOption = 0,
    every: AllOption = False,
) -> None:
    """List tasks, oldest first: unfinished ones and recent outcomes the server holds."""
    from azolla.app import cli_remote

    if state is not None and state not in TASK_STATES:
        fail(f"--state must be one of {', '.join(TASK_STATES)}; got {state!r}", EXIT_USAGE)
    filters = _task_filter(domain, state or "", name, since, until)
    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.list_tasks(options, out, filters, limit=limit,
                                                    cursor=cursor, every=every)))


def _task_filter(domain: str, state: str, name: str, since: str | None, until: str | None
                 ) -> Any:
    from azolla.app import cli_remote

    return cli_remote.TaskFilter(domain=domain, state=state, name=name,
                                 since=parse_time(since, "--since"),
                                 until=parse_time(until, "--until"))


# -- events and shepherds ----------------------------------------------------------------------


@events_app.command("tail", epilog=EPILOG)
def events_tail(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new events as they are committed (Ctrl-C "
                               "stops).")] = False,
    after: Annotated[int, typer.Option(
        "--after", min=0, help="Start after this log position (0: from the beginning).")
    ] = 0,
    domain: Annotated[str, typer.Option(
        "--domain", "-d", help="Only events of this domain (default: all).")] = "",
    limit: Annotated[int, typer.Option(
        "--limit", min=0, help="Stop after this many events (0: no limit).")] = 0,
) -> None:
    """Print committed events after a position, oldest first."""
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.tail_events(options, out, after=after, follow=follow,
                                                     domain=domain, limit=limit)))


@shepherds_app.command("list", epilog=EPILOG)
def shepherds_list(
    ctx: typer.Context,
    domain: Annotated[str, typer.Option(
        "--domain", "-d", help="Only shepherds of this domain (default: all).")] = "",
) -> None:
    """List the connected shepherds with their load and capacity."""
    from azolla.app import cli_remote

    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.list_shepherds(options, out, domain)))


# -- dead letters ------------------------------------------------------------------------------


@dead_letters_app.command("list", epilog=EPILOG)
def dead_letters_list(
    ctx: typer.Context,
    domain: DomainOption = "default",
    name: NameFilter = "",
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: LimitOption = 50,
    cursor: CursorOption = 0,
    every: AllOption = False,
) -> None:
    """List failed tasks with their errors."""
    from azolla.app import cli_remote

    filters = _task_filter(domain, "failed", name, since, until)
    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.list_tasks(options, out, filters, limit=limit,
                                                    cursor=cursor, every=every,
                                                    errors=True)))


@dead_letters_app.command("requeue", epilog=EPILOG)
def dead_letters_requeue(
    ctx: typer.Context,
    domain: DomainOption = "default",
    name: NameFilter = "",
    since: SinceFilter = None,
    until: UntilFilter = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only count the failed tasks that would be requeued.")] = False,
) -> None:
    """Run every matching failed task again as a new task (with a progress bar).

    Safe to repeat: a task requeued before is not requeued twice.
    """
    from azolla.app import cli_remote

    task_filter = _task_filter(domain, "failed", name, since, until)
    filters = cli_remote.DeadLetterFilter(domain=domain, name=name, since=task_filter.since,
                                          until=task_filter.until)
    out, options = _output(ctx), _options(ctx)
    _finish(run_async(lambda: cli_remote.requeue_dead_letters(options, out, filters,
                                                              dry_run=dry_run)))


# -- database ----------------------------------------------------------------------------------


@app.command(epilog=EPILOG)
def migrate(
    ctx: typer.Context,
    database_url: DatabaseUrlOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only list the pending migrations (exit code 1 if there are "
                          "some).")] = False,
) -> None:
    """Apply the pending database schema migrations (talks to the database directly).

    Safe to run from several machines at once and to repeat; the server also migrates at
    start.
    """
    from azolla.app import cli_db

    out = _output(ctx)
    _finish(run_async(lambda: cli_db.migrate(out, database_url or "", dry_run=dry_run)))


@retention_app.command("run", epilog=EPILOG)
def retention_run(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option(
        "--older-than", help="Drop history older than this: days (30d, or 30) or weeks (4w).",
        show_default=False)],
    database_url: DatabaseUrlOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only report what would be dropped.")] = False,
    archive_dir: Annotated[str | None, typer.Option(
        "--archive-dir", help="Write each partition to DIR/<partition>.csv before dropping "
                              "it.")] = None,
    lock_timeout: Annotated[float, typer.Option(
        "--lock-timeout", min=0.1, help="Seconds to wait for the table lock per partition "
                                        "before skipping it.")] = 2.0,
) -> None:
    """Drop finished task history by weekly partition (talks to the database directly).

    A partition is dropped only when all its days are older than the cutoff and every task in
    it has finished; the others are reported as skipped, with the reason.
    """
    from azolla.app import cli_db

    days = parse_days(older_than, "--older-than")
    out = _output(ctx)
    _finish(run_async(lambda: cli_db.retention(out, database_url or "", older_than_days=days,
                                               dry_run=dry_run, archive_dir=archive_dir,
                                               lock_timeout=lock_timeout)))


# -- development -------------------------------------------------------------------------------


@app.command(epilog=EPILOG)
def dev(
    tasks: Annotated[list[str], typer.Option(
        "--tasks", "-t", help="Task module (or .py file) for the shepherd; repeat for "
                              "several.", show_default=False)],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The server's port.")
                    ] = 52710,
    store: Annotated[str, typer.Option(
        "--store", help="postgres (embedded, kept in --data-dir) or memory (lost on exit).")
    ] = "postgres",
    data_dir: Annotated[str | None, typer.Option(
        "--data-dir", help="Data folder of the embedded PostgreSQL (default "
                           "~/.local/share/azolla/pgdata).")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="Use this PostgreSQL instead of the embedded one "
                               "(DATABASE_URL is ignored here).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", min=1, help="Attempts the shepherd runs at once (default: CPUs).")
    ] = None,
) -> None:
    """Run an orchestrator and one shepherd for local development; Ctrl-C stops both.

    The server runs on the embedded PostgreSQL unless told otherwise; the shepherd starts
    once the server is ready.
    """
    from azolla.app import cli_dev

    if store not in ("postgres", "memory"):
        fail(f"--store must be postgres or memory; got {store!r}", EXIT_USAGE)
    options = cli_dev.DevOptions(tasks=tuple(tasks), port=port, store=store, data_dir=data_dir,
                                 database_url=database_url, concurrency=concurrency)
    _finish(run_async(lambda: cli_dev.dev(options)))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``azolla`` command."""
    command = typer.main.get_command(app)
    command.main(args=argv, prog_name="azolla", standalone_mode=True)
    sys.exit(0)  # pragma: no cover - main() above always exits
