"""``azolla-worker``: run one Python task under the worker command-line contract.

Usage (the upstream contract, any shepherd)::

    azolla-worker --tasks myapp.tasks --task-id <id> --name <task> \\
        --args '<JSON array>' --kwargs '<JSON object>' \\
        --shepherd-endpoint http://127.0.0.1:<port>

Preferred (argv is visible to other local users and bounded in size): leave out ``--args`` and
``--kwargs`` and send the task on stdin as one JSON object::

    {"task_id": "...", "attempt": 1, "name": "...", "args": "[...]", "kwargs": "{...}",
     "domain": "default", "report_token": "..."}

``args``/``kwargs`` may be JSON text or already-decoded values; fields given on the command line
win over stdin. The task modules come from ``--tasks`` (repeatable, or comma-separated) or the
``AZOLLA_TASKS`` environment variable. The worker imports them, runs the task once, reports the
result with ``azolla.shepherd.Worker/ReportResult`` (with the ``report_token`` from stdin, if
any, in the ``azolla-report-token`` metadata) and exits. Without ``--shepherd-endpoint`` it
prints the result as JSON on stdout instead (handy for trying a task out).

Exit codes:

* 0 — the task ran and its result (success *or* task error) was reported (or printed);
* 1 — no endpoint given and the task failed (result printed);
* 2 — bad usage: missing or malformed options or stdin;
* 3 — the task modules could not be imported (reported as ``WorkerStartFailed`` when possible);
* 4 — the result could not be delivered to the shepherd;
* 5 — the shepherd refused the result (e.g. not the running attempt, bad token).

A task that kills the interpreter (``os._exit``, a segfault) exits with whatever that gives; the
shepherd then records ``WorkerCrashed``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "EXIT_BAD_USAGE",
    "EXIT_DELIVERY_FAILED",
    "EXIT_IMPORT_FAILED",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_TASK_FAILED",
    "main",
]

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_BAD_USAGE = 2
EXIT_IMPORT_FAILED = 3
EXIT_DELIVERY_FAILED = 4
EXIT_REJECTED = 5


class _UsageError(Exception):
    pass


@dataclass(slots=True)
class _Job:
    task_id: str
    attempt: int
    name: str
    args: str
    kwargs: str
    domain: str
    endpoint: str | None
    report_token: str | None
    modules: list[str]
    report_timeout: float


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azolla-worker",
        description="Run one Azolla task and report its result to a shepherd.",
    )
    parser.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE",
        help="module that defines tasks (repeatable; default: $AZOLLA_TASKS)",
    )
    parser.add_argument("--task-id", help="the task id")
    parser.add_argument("--name", help="the task name")
    parser.add_argument("--args", help="positional arguments, a JSON array")
    parser.add_argument("--kwargs", help="keyword arguments, a JSON object")
    parser.add_argument("--attempt", type=int, help="the attempt number (default: unknown, 0)")
    parser.add_argument("--domain", help="the task's domain (default 'default')")
    parser.add_argument("--shepherd-endpoint", help="http://127.0.0.1:<port> of the shepherd")
    parser.add_argument(
        "--stdin",
        action="store_true",
        help="read the task from stdin (implied when --args/--kwargs are absent "
        "and stdin is not a terminal)",
    )
    parser.add_argument(
        "--report-timeout",
        type=float,
        default=30.0,
        help="seconds to keep trying to deliver the result (default 30)",
    )
    return parser


def _as_json_text(value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _read_job(options: argparse.Namespace) -> _Job:
    from_stdin: dict[str, Any] = {}
    use_stdin = options.stdin or (
        options.args is None and options.kwargs is None and not sys.stdin.isatty()
    )
    if use_stdin:
        raw = sys.stdin.buffer.read()
        if raw.strip():
            try:
                decoded = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise _UsageError(f"stdin is not valid JSON: {exc}") from None
            if not isinstance(decoded, dict):
                raise _UsageError("stdin must hold a JSON object")
            from_stdin = decoded
        elif options.stdin:
            raise _UsageError("--stdin given but stdin is empty")

    def pick(name: str, cli: Any) -> Any:
        return cli if cli is not None else from_stdin.get(name)

    task_id = pick("task_id", options.task_id)
    name = pick("name", options.name)
    if not task_id or not name:
        raise _UsageError("the task id and the task name are required")
    modules = [m.strip() for entry in options.tasks for m in entry.split(",") if m.strip()]
    if not modules:
        modules = [
            m.strip()
            for m in os.environ.get("AZOLLA_TASKS", "").replace(",", " ").split()
            if m.strip()
        ]
    if not modules:
        raise _UsageError("no task modules: use --tasks MODULE or set AZOLLA_TASKS")
    attempt = pick("attempt", options.attempt)
    try:
        # 0: not told (the upstream contract has no attempt option); the shepherd then matches
        # the report to the running attempt.
        attempt_number = int(attempt) if attempt is not None else 0
    except (TypeError, ValueError):
        raise _UsageError(f"invalid attempt number {attempt!r}") from None
    return _Job(
        task_id=str(task_id),
        attempt=attempt_number,
        name=str(name),
        args=_as_json_text(pick("args", options.args), "[]"),
        kwargs=_as_json_text(pick("kwargs", options.kwargs), "{}"),
        domain=str(pick("domain", options.domain) or "default"),
        endpoint=options.shepherd_endpoint,
        report_token=from_stdin.get("report_token"),
        modules=modules,
        report_timeout=options.report_timeout,
    )


def _target(endpoint: str) -> str:
    for prefix in ("http://", "https://", "grpc://"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix) :].rstrip("/")
    return endpoint


def _report(job: _Job, result: Any) -> int:
    import grpc

    from azolla.adapters.grpc.pb import shepherd_pb2, shepherd_pb2_grpc
    from azolla.adapters.subprocess.wire import REPORT_TOKEN_METADATA

    assert job.endpoint is not None
    metadata: tuple[tuple[str, str | bytes], ...] | None = (
        ((REPORT_TOKEN_METADATA, job.report_token),) if job.report_token else None
    )
    request = shepherd_pb2.ReportResultRequest(task_id=job.task_id, result=result)
    deadline = time.monotonic() + job.report_timeout
    delay = 0.05
    with grpc.insecure_channel(_target(job.endpoint)) as channel:
        stub = shepherd_pb2_grpc.WorkerStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = stub.ReportResult(
                    request, timeout=max(0.1, remaining), metadata=metadata, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                retriable = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retriable or time.monotonic() + delay >= deadline:
                    print(f"azolla-worker: cannot report the result: {exc}", file=sys.stderr)
                    return EXIT_DELIVERY_FAILED
                time.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            if not response.success:
                print(f"azolla-worker: result refused: {response.message}", file=sys.stderr)
                return EXIT_REJECTED
            return EXIT_OK


def _run(job: _Job) -> int:
    from azolla.adapters.subprocess import wire
    from azolla.tasks import TaskContext, TaskModuleImportError, execute_sync, load_modules

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like ``python -m``: task modules next to the caller
    try:
        registry = load_modules(job.modules)
    except TaskModuleImportError as exc:
        print(f"azolla-worker: {exc}", file=sys.stderr)
        if job.endpoint:
            _report(
                job,
                wire.error_result(
                    job.task_id,
                    job.attempt,
                    "WorkerStartFailed",
                    str(exc),
                    {"modules": job.modules},
                    True,
                ),
            )
        return EXIT_IMPORT_FAILED
    context = TaskContext(
        task_id=job.task_id, attempt=job.attempt, name=job.name, domain=job.domain
    )
    outcome = execute_sync(registry, job.name, job.args, job.kwargs, context)
    sys.stdout.flush()
    if outcome.ok:
        result = wire.success_result(job.task_id, job.attempt, outcome.value_json)
    else:
        error = outcome.error
        assert error is not None
        error_type, message, data = error.type, error.message, error.data
        if error_type == "MemoryError":
            error_type, message = "MemoryLimitExceeded", "the task ran out of memory (MemoryError)"
        result = wire.error_result(
            job.task_id, job.attempt, error_type, message, data, error.retriable
        )
    if not job.endpoint:
        printable: dict[str, Any] = {
            "task_id": job.task_id,
            "attempt": job.attempt,
            "ok": outcome.ok,
        }
        if outcome.ok:
            printable["value"] = orjson.loads(outcome.value_json)
        else:
            printable["error"] = {
                "type": result.error.type,
                "message": result.error.message,
                "data": orjson.loads(result.error.data),
                "retriable": result.error.retriable,
            }
        sys.stdout.write(orjson.dumps(printable).decode() + "\n")
        return EXIT_OK if outcome.ok else EXIT_TASK_FAILED
    return _report(job, result)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``azolla-worker``; exits the process with the codes in the module docs."""
    # A crash in native code (the task's or gRPC's) leaves its Python traceback on stderr,
    # which the shepherd keeps in the attempt's WorkerCrashed error.
    faulthandler.enable()
    options = _parser().parse_args(argv)
    try:
        job = _read_job(options)
    except _UsageError as exc:
        print(f"azolla-worker: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_USAGE)
    sys.exit(_run(job))


if __name__ == "__main__":
    main()
