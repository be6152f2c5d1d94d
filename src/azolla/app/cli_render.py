"""Output of the ``azolla`` command line: rich tables for people, JSON for scripts.

Data goes to standard output; progress bars, spinners and notes go to standard error, so
``azolla --json ... | jq`` always reads clean JSON. Times are shown in UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2
    from azolla.client import TaskFailure, TaskResult, TaskStatus, TaskUpdate

__all__ = [
    "Output",
    "event_json",
    "failure_json",
    "ms_to_iso",
    "result_json",
    "shepherd_json",
    "status_json",
    "summary_json",
    "update_json",
]

_STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "assigned": "cyan",
    "retry_wait": "magenta",
    "queued": "blue",
    "lost": "red",
    "timed_out": "red",
}


def ms_to_datetime(ms: int) -> dt.datetime | None:
    """Return the UTC datetime of epoch milliseconds (None for 0)."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC) if ms else None


def _iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_to_iso(ms: int) -> str | None:
    """Return ISO 8601 UTC text of epoch milliseconds (None for 0)."""
    return _iso(ms_to_datetime(ms))


def _when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = max((dt.datetime.now(dt.UTC) - moment).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- JSON shapes -------------------------------------------------------------------------------


def failure_json(failure: TaskFailure | None) -> dict[str, Any] | None:
    """Return the JSON form of a task failure."""
    if failure is None:
        return None
    return {"type": failure.type, "message": failure.message, "data": failure.data,
            "retriable": failure.retriable}


def _error_proto_json(error: common_pb2.ErrorResult) -> dict[str, Any] | None:
    if not (error.type or error.message):
        return None
    try:
        data = json.loads(error.data) if error.data else {}
    except ValueError:
        data = {"raw": error.data}
    return {"type": error.type, "message": error.message, "data": data,
            "retriable": error.retriable}


def result_json(result: TaskResult) -> dict[str, Any]:
    """Return the JSON form of a terminal outcome."""
    return {"task_id": result.task_id, "state": result.state, "success": result.success,
            "value": result.value, "error": failure_json(result.error)}


def status_json(status: TaskStatus) -> dict[str, Any]:
    """Return the JSON form of a task's status and attempt history."""
    return {
        "task_id": status.task_id,
        "name": status.name,
        "domain": status.domain,
        "state": status.state,
        "terminal": status.terminal,
        "shepherd_group": status.shepherd_group,
        "created_at": _iso(status.created_at),
        "next_attempt_at": _iso(status.next_attempt_at),
        "args": status.args,
        "kwargs": status.kwargs,
        "attempts": [
            {"number": a.number, "state": a.state, "shepherd_id": a.shepherd_id,
             "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at),
             "error": failure_json(a.error)}
            for a in status.attempts
        ],
        "result": result_json(status.result) if status.result is not None else None,
    }


def update_json(update: TaskUpdate) -> dict[str, Any]:
    """Return the JSON form of one ``watch`` update."""
    return {"task_id": update.task_id, "state": update.state,
            "attempt": update.attempt_number, "terminal": update.terminal,
            "result": result_json(update.result) if update.result is not None else None}


def summary_json(task: orchestrator_pb2.TaskSummary) -> dict[str, Any]:
    """Return the JSON form of one row of ``tasks list``."""
    return {"task_id": task.task_id, "name": task.name, "domain": task.domain,
            "state": task.state, "attempts": task.attempts,
            "shepherd_group": task.shepherd_group,
            "submitted_at": ms_to_iso(task.submitted_at_ms),
            "ended_at": ms_to_iso(task.ended_at_ms),
            "error": _error_proto_json(task.error)}


def shepherd_json(info: orchestrator_pb2.ShepherdInfo) -> dict[str, Any]:
    """Return the JSON form of one connected shepherd."""
    return {"shepherd_id": info.shepherd_id, "domain": info.domain,
            "shepherd_group": info.shepherd_group, "capacity": info.capacity,
            "running": info.running, "version": info.version,
            "connected_at": ms_to_iso(info.connected_at_ms),
            "last_seen": ms_to_iso(info.last_seen_ms)}


def event_json(event: orchestrator_pb2.EventRecord) -> dict[str, Any]:
    """Return the JSON form of one event (its payload decoded)."""
    try:
        payload: Any = json.loads(event.payload) if event.payload else None
    except ValueError:
        payload = event.payload
    return {"position": event.position, "recorded_at": ms_to_iso(event.recorded_at_ms),
            "domain": event.domain, "stream_id": event.stream_id, "version": event.version,
            "type": event.type, "payload": payload}


# -- the output object ---------------------------------------------------------------------------


class Output:
    """Where a command prints: JSON or rich text on stdout, notes and progress on stderr.

    Args:
        json_mode: Print JSON documents instead of tables.
    """

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
        self.out = Console(highlight=False, width=width, soft_wrap=width is not None)
        self.err = Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """True when standard error is a terminal (spinners and progress bars are shown)."""
        return self.err.is_terminal

    def json(self, document: Any) -> None:
        """Print one JSON document on one line."""
        sys.stdout.write(json.dumps(document, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()

    def line(self, text: str | Text) -> None:
        """Print a line of (rich) text on stdout."""
        self.out.print(text)

    def note(self, text: str) -> None:
        """Print a note on stderr (not data)."""
        self.err.print(text)

    # -- tasks ------------------------------------------------------------------------------

    def submitted(self, task_id: str, name: str, domain: str, deduplicated: bool,
                  verb: str = "Submitted") -> None:
        """Report a created task."""
        if self.json_mode:
            return
        extra = " (an earlier task with the same key; nothing new was created)" \
            if deduplicated else ""
        self.out.print(f"{verb} task [bold]{task_id}[/] ({escape(name)}, domain "
                       f"{escape(domain)}){extra}")

    def result(self, result: TaskResult) -> None:
        """Print a terminal outcome (human form)."""
        if result.success:
            value = json.dumps(result.value, ensure_ascii=False, default=str)
            self.out.print(Text.assemble(("succeeded", "green"), f": {value}"))
        else:
            label = result.state or "failed"
            self.out.print(Text.assemble((label, _STATE_STYLE.get(label, "red")),
                                         f": {result.error}"))

    def status(self, status: TaskStatus) -> None:
        """Print a task's status and attempt history."""
        if self.json_mode:
            self.json(status_json(status))
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("task", status.task_id)
        grid.add_row("name", escape(status.name))
        grid.add_row("domain", escape(status.domain))
        grid.add_row("group", escape(status.shepherd_group))
        grid.add_row("state", _state(status.state))
        grid.add_row("submitted", _when(status.created_at))
        if status.next_attempt_at is not None and not status.terminal:
            grid.add_row("next attempt", _when(status.next_attempt_at))
        grid.add_row("args", escape(_short(json.dumps(status.args, default=str), 100)))
        grid.add_row("kwargs", escape(_short(json.dumps(status.kwargs, default=str), 100)))
        if status.result is not None:
            if status.result.success:
                grid.add_row("result", escape(_short(json.dumps(status.result.value,
                                                                default=str), 100)))
            else:
                grid.add_row("error", escape(str(status.result.error)))
        self.out.print(grid)
        if not status.attempts:
            self.out.print("no attempts yet")
            return
        table = Table(title="attempts", title_justify="left", expand=False)
        for column in ("#", "state", "shepherd", "started", "ended", "duration", "error"):
            table.add_column(column, overflow="fold")
        for attempt in status.attempts:
            duration = "-"
            if attempt.started_at and attempt.ended_at:
                duration = f"{(attempt.ended_at - attempt.started_at).total_seconds():.3f}s"
            table.add_row(str(attempt.number), _state(attempt.state),
                          escape(attempt.shepherd_id or "-"), _when(attempt.started_at),
                          _when(attempt.ended_at), duration,
                          escape(str(attempt.error)) if attempt.error else "")
        self.out.print(table)

    def update(self, update: TaskUpdate) -> None:
        """Print one ``watch`` update."""
        if self.json_mode:
            self.json(update_json(update))
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
        attempt = f"  attempt {update.attempt_number}" if update.attempt_number else ""
        self.out.print(Text.assemble(f"{stamp}  ", _state(update.state), attempt))
        if update.result is not None:
            self.result(update.result)

    def task_table(self, tasks: Iterable[orchestrator_pb2.TaskSummary], *,
                   errors: bool = False) -> Table:
        """Build the table of ``tasks list`` / ``dead-letters list``."""
        table = Table(expand=False)
        table.add_column("task", no_wrap=True)
        table.add_column("name", overflow="fold")
        table.add_column("state")
        table.add_column("attempts", justify="right")
        table.add_column("submitted", no_wrap=True)
        table.add_column("ended" if not errors else "failed", no_wrap=True)
        if errors:
            table.add_column("error", overflow="fold")
        for task in tasks:
            row: list[str | Text] = [
                task.task_id, escape(task.name), _state(task.state), str(task.attempts),
                _when(ms_to_datetime(task.submitted_at_ms)),
                _when(ms_to_datetime(task.ended_at_ms))]
            if errors:
                error = _error_proto_json(task.error)
                row.append(escape(_short(f"{error['type']}: {error['message']}"))
                           if error else "")
            table.add_row(*row)
        return table

    def shepherds(self, shepherds: list[orchestrator_pb2.ShepherdInfo]) -> None:
        """Print the connected shepherds."""
        if self.json_mode:
            self.json({"shepherds": [shepherd_json(s) for s in shepherds]})
            return
        if not shepherds:
            self.out.print("no shepherds connected")
            return
        table = Table(expand=False)
        for column in ("shepherd", "domain", "group", "busy/slots", "version", "connected",
                       "last seen"):
            table.add_column(column, overflow="fold")
        for s in shepherds:
            table.add_row(escape(s.shepherd_id), escape(s.domain), escape(s.shepherd_group),
                          f"{s.running}/{s.capacity}", escape(s.version),
                          _ago(ms_to_datetime(s.connected_at_ms)),
                          _ago(ms_to_datetime(s.last_seen_ms)))
        self.out.print(table)

    def event(self, event: orchestrator_pb2.EventRecord) -> None:
        """Print one event of ``events tail``."""
        if self.json_mode:
            self.json(event_json(event))
            return
        self.out.print(Text.assemble(
            (f"{event.position:>8}", "bold"), "  ",
            _when(ms_to_datetime(event.recorded_at_ms)), "  ",
            (f"{event.type:<28}", "cyan"), f" {event.domain}  {event.stream_id}"
            f" v{event.version}  ", _short(event.payload, 120)))

    def mapping(self, title: str, rows: Mapping[str, str]) -> None:
        """Print a two-column table."""
        table = Table(title=title, title_justify="left", expand=False, show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in rows.items():
            table.add_row(escape(key), escape(value))
        self.out.print(table)
