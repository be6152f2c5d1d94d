"""The ``azolla`` CLI against a real orchestrator over gRPC on loopback.

The server is the full assembly (``Container``, memory store, port 0) running on its own event
loop in a background thread, so that the CLI, driven by ``CliRunner`` on the test's thread,
runs its own ``asyncio.run`` as it does from a shell. A scripted shepherd, connected over
``ClusterService`` like any foreign shepherd, answers the tasks of domain ``default`` by name:
``fail*`` fails (not retriable), ``hold*`` runs until cancelled, anything else succeeds with
its arguments as the result.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from typer.testing import CliRunner

from azolla.adapters.grpc.pb import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from azolla.adapters.postgres.cluster import free_port
from azolla.app import cli_remote
from azolla.app.cli import app
from azolla.app.containers import Container, resolve, shutdown
from azolla.app.settings import AuthSettings, Settings, TokenSettings

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

SHEPHERD_ID = "cli-test-shepherd"
_SCRIPT = Path(sys.executable).parent / "azolla"
AZOLLA = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "from azolla.app.cli import main; main()"]
TOKEN = "cli-test-token-0123456789"
CLI_VARIABLES = ("AZOLLA_SERVER", "AZOLLA_TOKEN", "AZOLLA_CA_FILE", "AZOLLA_TIMEOUT",
                 "AZOLLA_DOMAIN")


# -- the server ----------------------------------------------------------------------------------


async def scripted_shepherd(address: str, stop: asyncio.Event) -> None:
    """Serve domain ``default`` over ClusterService, answering tasks by name."""
    outgoing: asyncio.Queue[orchestrator_pb2.ClientMsg | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[orchestrator_pb2.ClientMsg]:
        yield orchestrator_pb2.ClientMsg(hello=orchestrator_pb2.Hello(
            shepherd_uuid=SHEPHERD_ID, max_concurrency=64, domain="default",
            shepherd_group="default", version="cli-test", accepts_batches=True))
        while (message := await outgoing.get()) is not None:
            yield message

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.5)  # liveness, not synchronisation
            outgoing.put_nowait(orchestrator_pb2.ClientMsg(
                status=orchestrator_pb2.Status(current_load=0, available_capacity=64)))

    def answer(task: common_pb2.Task) -> None:
        if task.name.startswith("hold"):
            return
        result = common_pb2.TaskResult(task_id=task.task_id, attempt_number=task.attempt_number)
        if task.name.startswith("fail"):
            result.error.CopyFrom(common_pb2.ErrorResult(
                type="ValueError", message="boom", data="{}", retriable=False))
        else:
            value = {"args": json.loads(task.args or "[]"),
                     "kwargs": json.loads(task.kwargs or "{}")}
            result.success.result.json_value = json.dumps(value)
        outgoing.put_nowait(orchestrator_pb2.ClientMsg(task_result=result))

    async with grpc.aio.insecure_channel(address) as channel:
        call = orchestrator_pb2_grpc.ClusterServiceStub(channel).Stream(requests())
        beats = asyncio.ensure_future(heartbeat())

        async def serve() -> None:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "task":
                    answer(message.task)
                elif kind == "tasks":
                    for task in message.tasks.tasks:
                        answer(task)

        serving = asyncio.ensure_future(serve())
        try:
            await asyncio.wait([serving, asyncio.ensure_future(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            beats.cancel()
            outgoing.put_nowait(None)
            call.cancel()
            serving.cancel()
            await asyncio.gather(beats, serving, return_exceptions=True)


@dataclass
class BackgroundServer:
    """The orchestrator on its own loop in a thread (plus the scripted shepherd)."""

    settings: Settings
    with_shepherd: bool = True
    url: str = ""
    error: BaseException | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundServer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="cli-test-server", daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the test server did not start in time"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        assert self._thread is not None
        self._thread.join(30)
        assert not self._thread.is_alive(), "the test server did not stop in time"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        container = Container(settings=self.settings)
        try:
            server = await resolve(container.grpc_server)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            await shutdown(container)
            return
        self.url = f"http://{server.address}"
        shepherd = (asyncio.ensure_future(scripted_shepherd(server.address, self._stop))
                    if self.with_shepherd else None)
        orchestrator = await resolve(container.orchestrator)
        if shepherd is not None:
            async with asyncio.timeout(10):
                while not orchestrator.shepherds():
                    await asyncio.sleep(0.01)  # bounded: until the Hello is processed
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if shepherd is not None:
                await shepherd
            await shutdown(container)


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(Settings(store="memory", port=0, log_level="warning")) as running:
        yield running


@dataclass
class Run:
    """What one CLI invocation did."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def azolla(*args: str, server: BackgroundServer | None = None, url: str | None = None,
           env: dict[str, str] | None = None) -> Run:
    """Run ``azolla [--server URL] --timeout 5 ARGS...`` in-process."""
    prefix = ["--timeout", "5"]
    target = url or (server.url if server is not None else None)
    if target:
        prefix = ["--server", target, *prefix]
    # The CLI's own variables from the environment of the test run must not leak in.
    clean: dict[str, str | None] = {name: None for name in CLI_VARIABLES}
    clean.update(env or {})
    started = time.monotonic()
    result = CliRunner().invoke(app, [*prefix, *args], env=clean, catch_exceptions=False)
    assert time.monotonic() - started < 30, f"azolla {args} took too long"
    return Run(result.exit_code, result.stdout, result.stderr)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def one_line_error(run: Run) -> str:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("azolla: error: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def submit_json(server: BackgroundServer, name: str, *args: str) -> dict[str, Any]:
    run = azolla("--json", "submit", name, *args, server=server)
    assert run.code in (0, 1), run
    document: dict[str, Any] = run.json()
    return document


# -- submit, status, watch -------------------------------------------------------------------------


def test_submit_wait_prints_the_result_as_json(server: BackgroundServer) -> None:
    run = azolla("--json", "submit", "echo", "--args", "[1, 2]", "--kwargs", '{"x": "y"}',
                 "--wait", server=server)
    assert run.code == 0, run
    document = run.json()
    assert document["success"] is True
    assert document["state"] == "succeeded"
    assert document["value"] == {"args": [1, 2], "kwargs": {"x": "y"}}
    uuid.UUID(document["task_id"])


def test_an_args_object_is_the_keyword_arguments(server: BackgroundServer) -> None:
    document = submit_json(server, "echo", "--args", '{"name": "Alice"}', "--wait")
    assert document["value"] == {"args": [], "kwargs": {"name": "Alice"}}
    document = submit_json(server, "echo", "--args", "7", "--wait")
    assert document["value"] == {"args": [7], "kwargs": {}}


def test_submit_then_status_shows_the_attempt_history(server: BackgroundServer) -> None:
    run = azolla("submit", "fail_status", "--args", '["x"]', "--wait", server=server)
    assert run.code == 1, run
    assert "Submitted task" in run.stdout
    assert "ValueError: boom" in run.stdout
    task_id = run.stdout.split("Submitted task ", 1)[1].split()[0]

    human = azolla("status", task_id, server=server)
    assert human.code == 0, human
    for text in (task_id, "fail_status", "failed", "attempts", SHEPHERD_ID, "ValueError: boom"):
        assert text in human.stdout

    status = azolla("--json", "status", task_id, server=server)
    assert status.code == 0
    document = status.json()
    assert document["state"] == "failed"
    assert document["terminal"] is True
    assert document["args"] == ["x"]
    [attempt] = document["attempts"]
    assert attempt["number"] == 1
    assert attempt["state"] == "failed"
    assert attempt["shepherd_id"] == SHEPHERD_ID
    assert attempt["error"]["type"] == "ValueError"
    assert document["result"]["error"]["message"] == "boom"


def test_watch_prints_updates_until_terminal(server: BackgroundServer) -> None:
    task_id = submit_json(server, "echo_watch", "--args", "[1]", "--wait")["task_id"]
    run = azolla("--json", "watch", task_id, server=server)
    assert run.code == 0, run
    updates = run.json_lines()
    assert updates[-1]["terminal"] is True
    assert updates[-1]["state"] == "succeeded"
    assert updates[-1]["result"]["value"] == {"args": [1], "kwargs": {}}

    failed = submit_json(server, "fail_watch", "--wait")["task_id"]
    run = azolla("watch", failed, server=server)
    assert run.code == 1, run
    assert "failed" in run.stdout
    assert "ValueError: boom" in run.stdout


def test_watch_of_a_running_task_ends_when_it_is_cancelled(server: BackgroundServer) -> None:
    # A real process, so that the test can read the first update before it cancels.
    task_id = submit_json(server, "hold_watch")["task_id"]
    _wait_until(lambda: _state(server, task_id) == "running")
    watcher = subprocess.Popen(
        [*AZOLLA, "--server", server.url, "--json", "watch", task_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # the watch is live from here
        assert first["state"] == "running"
        assert first["terminal"] is False
        assert azolla("cancel", task_id, server=server).code == 0
        rest, err = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 1, err
    last = json.loads(rest.strip().splitlines()[-1])
    assert last["state"] == "cancelled"
    assert last["terminal"] is True


def _state(server: BackgroundServer, task_id: str) -> str:
    state: str = azolla("--json", "status", task_id, server=server).json()["state"]
    return state


def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- cancel and retry ------------------------------------------------------------------------------


def test_cancel_a_running_task_then_again(server: BackgroundServer) -> None:
    task_id = submit_json(server, "hold_cancel")["task_id"]
    _wait_until(lambda: _state(server, task_id) == "running")
    run = azolla("cancel", task_id, "--reason", "test", server=server)
    assert run.code == 0, run
    assert f"cancelled task {task_id}" in run.stdout
    again = azolla("--json", "cancel", task_id, server=server)
    assert again.code == 0
    assert again.json() == {"task_id": task_id, "cancelled": False, "state": "cancelled"}
    assert _state(server, task_id) == "cancelled"


def test_retry_requeues_a_failed_task_once(server: BackgroundServer) -> None:
    source = submit_json(server, "fail_retry", "--args", '["a"]', "--wait")["task_id"]
    first = azolla("--json", "retry", source, server=server)
    assert first.code == 0, first
    requeued = first.json()
    assert requeued["source_task_id"] == source
    assert requeued["deduplicated"] is False
    assert requeued["task_id"] != source

    again = azolla("--json", "retry", source, server=server)
    assert again.json()["task_id"] == requeued["task_id"]
    assert again.json()["deduplicated"] is True

    waited = azolla("retry", source, "--wait", server=server)  # the new task fails the same way
    assert waited.code == 1, waited
    assert "ValueError: boom" in waited.stdout
    status = azolla("--json", "status", requeued["task_id"], server=server).json()
    assert status["name"] == "fail_retry"
    assert status["args"] == ["a"]


def test_retry_a_cancelled_task_and_refuse_a_succeeded_one(server: BackgroundServer) -> None:
    held = submit_json(server, "hold_retry")["task_id"]
    assert azolla("cancel", held, server=server).code == 0
    run = azolla("retry", held, server=server)
    assert run.code == 0, run
    assert f"task {held} requeued as" in run.stdout

    done = submit_json(server, "echo_retry", "--wait")["task_id"]
    refused = azolla("retry", done, server=server)
    assert refused.code == 1
    assert "only failed or cancelled tasks can be requeued" in one_line_error(refused)


# -- listing ---------------------------------------------------------------------------------------


def test_tasks_list_filters_and_pages(server: BackgroundServer) -> None:
    domain = unique("listing")  # no shepherd serves it: its tasks stay queued
    ids = [submit_json(server, "page", "--domain", domain, "--args", f"[{i}]")["task_id"]
           for i in range(5)]
    submit_json(server, "other", "--domain", domain)

    first = azolla("--json", "tasks", "list", "--domain", domain, "--name", "page", "--limit",
                   "2", server=server).json()
    assert [t["task_id"] for t in first["tasks"]] == ids[:2]
    assert first["next_cursor"]
    second = azolla("--json", "tasks", "list", "--domain", domain, "--name", "page", "--limit",
                    "2", "--cursor", str(first["next_cursor"]), server=server).json()
    assert [t["task_id"] for t in second["tasks"]] == ids[2:4]

    every = azolla("--json", "tasks", "list", "--domain", domain, "--name", "page", "--limit",
                   "2", "--all", server=server).json()
    assert [t["task_id"] for t in every["tasks"]] == ids
    assert every["next_cursor"] is None
    row = every["tasks"][0]
    assert row["state"] == "queued"
    assert row["domain"] == domain
    assert row["attempts"] == 0

    def count(*filters: str) -> int:
        run = azolla("--json", "tasks", "list", "--domain", domain, "--all", *filters,
                     server=server)
        assert run.code == 0, run
        return len(run.json()["tasks"])

    assert count() == 6
    assert count("--state", "queued") == 6
    assert count("--state", "succeeded") == 0
    assert count("--since", "1h") == 6
    assert count("--since", "2999-01-01") == 0
    assert count("--until", "2000-01-01T00:00:00Z") == 0

    human = azolla("tasks", "list", "--domain", domain, "--limit", "2", server=server)
    assert human.code == 0
    assert ids[0] in human.stdout
    assert "queued" in human.stdout
    assert "--cursor" in human.stderr
    empty = azolla("tasks", "list", "--domain", unique("empty"), server=server)
    assert empty.code == 0
    assert "no tasks match" in empty.stdout


def test_shepherds_list(server: BackgroundServer) -> None:
    run = azolla("--json", "shepherds", "list", server=server)
    assert run.code == 0, run
    [shepherd] = [s for s in run.json()["shepherds"] if s["shepherd_id"] == SHEPHERD_ID]
    assert shepherd["capacity"] == 64
    assert shepherd["domain"] == "default"
    assert shepherd["version"] == "cli-test"
    assert shepherd["connected_at"]
    human = azolla("shepherds", "list", server=server)
    assert SHEPHERD_ID in human.stdout
    assert "/64" in human.stdout
    other = azolla("--json", "shepherds", "list", "--domain", unique("nobody"), server=server)
    assert other.json() == {"shepherds": []}


def test_events_tail_reads_the_log(server: BackgroundServer) -> None:
    domain = unique("events")
    task_id = submit_json(server, "evented", "--domain", domain)["task_id"]

    run = azolla("--json", "events", "tail", "--limit", "3", server=server)
    assert run.code == 0, run
    events = run.json_lines()
    assert len(events) == 3
    positions = [e["position"] for e in events]
    assert positions == sorted(positions)
    assert positions[0] >= 1
    after = azolla("--json", "events", "tail", "--after", str(positions[1]), "--limit", "1",
                   server=server).json_lines()
    assert after[0]["position"] > positions[1]

    mine = azolla("--json", "events", "tail", "--domain", domain, server=server).json_lines()
    assert [e["type"] for e in mine] == ["TaskSubmitted.v1"]
    assert mine[0]["stream_id"] == task_id
    assert mine[0]["payload"]["name"] == "evented"
    human = azolla("events", "tail", "--domain", domain, server=server)
    assert "TaskSubmitted.v1" in human.stdout
    assert task_id in human.stdout


def test_events_tail_follow_streams_new_events_until_ctrl_c(server: BackgroundServer) -> None:
    domain = unique("follow")
    tail = subprocess.Popen(
        [*AZOLLA, "--server", server.url, "--json", "events", "tail", "--follow", "--domain",
         domain], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        task_id = submit_json(server, "followed", "--domain", domain)["task_id"]
        assert tail.stdout is not None
        event = json.loads(tail.stdout.readline())
        assert event["stream_id"] == task_id
        assert event["type"] == "TaskSubmitted.v1"
        later = submit_json(server, "followed", "--domain", domain)["task_id"]
        event = json.loads(tail.stdout.readline())  # committed while the tail follows
        assert event["stream_id"] == later
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=20)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 130, err
    assert "Traceback" not in err


# -- dead letters ----------------------------------------------------------------------------------


def test_dead_letters_list_and_requeue(server: BackgroundServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_remote, "REQUEUE_CHUNK", 2)  # several windows, several RPCs
    name = unique("fail_dead")
    sources = [submit_json(server, name, "--args", f"[{i}]", "--wait")["task_id"]
               for i in range(5)]

    listed = azolla("--json", "dead-letters", "list", "--name", name, server=server)
    assert listed.code == 0, listed
    assert [t["task_id"] for t in listed.json()["tasks"]] == sources
    assert all(t["error"]["type"] == "ValueError" for t in listed.json()["tasks"])
    human = azolla("dead-letters", "list", "--name", name, server=server)
    assert "ValueError: boom" in human.stdout

    dry = azolla("--json", "dead-letters", "requeue", "--name", name, "--dry-run",
                 server=server)
    assert dry.json() == {"dead_letters": 5, "requeued": [], "dry_run": True}

    run = azolla("--json", "dead-letters", "requeue", "--name", name, server=server)
    assert run.code == 0, run
    requeued = run.json()["requeued"]
    assert len(requeued) == 5
    assert not any(r["deduplicated"] for r in requeued)
    new_ids = {r["task_id"] for r in requeued}
    assert not new_ids & set(sources)

    again = azolla("--json", "dead-letters", "requeue", "--name", name, server=server).json()
    repeated = [r for r in again["requeued"] if r["deduplicated"]]
    assert {r["task_id"] for r in repeated} >= new_ids  # the sources were not requeued twice

    none = azolla("dead-letters", "requeue", "--name", unique("nothing"), server=server)
    assert none.code == 0
    assert "0 dead letter(s)" in none.stdout


def test_requeue_windows_cover_every_task_once() -> None:
    times = [5, 1, 2, 2, 2, 3, 9, 9, 10]
    windows = cli_remote.requeue_windows(times, 2, lower=0, upper=0)
    assert windows[0][0] == 0
    assert windows[-1][1] == 0
    for (_, end, _), (start, _, _) in itertools.pairwise(windows):
        assert end == start  # contiguous
    assert sum(expected for _, _, expected in windows) == len(times)
    for moment in times:  # each time falls in exactly one window
        inside = [w for w in windows if w[0] <= moment and (w[1] == 0 or moment < w[1])]
        assert len(inside) == 1
    assert cli_remote.requeue_windows([], 10, lower=4, upper=8) == [(4, 8, 0)]


# -- wrong input -----------------------------------------------------------------------------------


def test_unknown_task_id_is_a_readable_error(server: BackgroundServer) -> None:
    missing = str(uuid.uuid4())
    for command in (["status", missing], ["watch", missing], ["cancel", missing],
                    ["retry", missing], ["status", "not-a-uuid"]):
        run = azolla(*command, server=server)
        assert run.code == 1, (command, run)
        assert "not found" in one_line_error(run)


def test_bad_json_and_bad_options_are_usage_errors(server: BackgroundServer) -> None:
    cases = [
        (["submit", "echo", "--args", "{bad"], "--args is not valid JSON"),
        (["submit", "echo", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
        (["submit", "echo", "--args", '{"a": 1}', "--kwargs", '{"b": 2}'], "give keyword"),
        (["tasks", "list", "--state", "sleeping"], "--state must be one of"),
        (["tasks", "list", "--since", "yesterday"], "--since must be an ISO 8601 time"),
        (["submit", "echo", "--bogus"], "No such option"),
        (["retention", "run", "--older-than", "soon"], "--older-than must be"),
        (["submit", ""], "task"),
    ]
    for args, expected in cases:
        run = azolla(*args, server=server)
        assert run.code == 2, (args, run)
        assert expected in one_line_error(run), (args, run.stderr)


def test_unreachable_server_fails_fast_with_code_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = azolla("status", str(uuid.uuid4()), url=url)
    assert run.code == 3, run
    message = one_line_error(run)
    assert "cannot connect to the orchestrator" in message
    assert url in message
    assert time.monotonic() - started < 5  # refused at once, not after the timeout
    assert azolla("submit", "echo", url=url).code == 3
    bad = azolla("tasks", "list", url="ftp://example.com")
    assert bad.code == 2
    assert "scheme" in one_line_error(bad)


def test_tokens_are_sent_and_refusals_are_code_4() -> None:
    auth = AuthSettings(tokens=(TokenSettings(name="ops", token=TOKEN, domains=("*",),
                                              roles=("client", "admin")),))
    settings = Settings(store="memory", port=0, log_level="warning", auth=auth)
    with BackgroundServer(settings, with_shepherd=False) as secured:
        refused = azolla("tasks", "list", server=secured)
        assert refused.code == 4, refused
        assert "UNAUTHENTICATED" in one_line_error(refused)
        wrong = azolla("--token", "not-the-token-at-all", "submit", "x", server=secured)
        assert wrong.code == 4, wrong
        ok = azolla("--json", "submit", "x", server=secured, env={"AZOLLA_TOKEN": TOKEN})
        assert ok.code == 0, ok
        listed = azolla("--token", TOKEN, "--json", "tasks", "list", server=secured)
        assert [t["task_id"] for t in listed.json()["tasks"]] == [ok.json()["task_id"]]


def test_tls_with_a_private_certificate_authority(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is on every CI image
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    settings = Settings(store="memory", port=0, log_level="warning", tls_cert_file=cert,
                        tls_key_file=key)
    with BackgroundServer(settings, with_shepherd=False) as secured:
        url = secured.url.replace("http://", "https://")
        submitted = azolla("--ca-file", str(cert), "--json", "submit", "over_tls", url=url)
        assert submitted.code == 0, submitted
        listed = azolla("--ca-file", str(cert), "--json", "tasks", "list", url=url)  # admin
        assert [t["name"] for t in listed.json()["tasks"]] == ["over_tls"]
        untrusted = azolla("tasks", "list", url=url)  # the system roots do not know this CA
        assert untrusted.code == 3, untrusted
        plain = azolla("tasks", "list", url=secured.url)
        assert plain.code == 3, plain
        assert azolla("--ca-file", str(tmp_path / "missing.pem"), "tasks", "list",
                      url=url).code == 2


def test_help_lists_every_command() -> None:
    run = azolla("--help")
    assert run.code == 0
    for command in ("submit", "status", "watch", "cancel", "retry", "tasks", "events",
                    "shepherds", "dead-letters", "migrate", "retention", "dev"):
        assert command in run.stdout
    assert "Exit codes" in run.stdout
