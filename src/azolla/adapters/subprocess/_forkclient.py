"""The shepherd's side of the fork server: start and supervise it, spawn and watch workers."""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from azolla.adapters.subprocess._frames import FrameDecoder, FrameTooLarge
from azolla.adapters.subprocess._outcomes import ExitStatus
from azolla.adapters.subprocess._output import OutputTail
from azolla.adapters.subprocess.limits import ResourceLimits

__all__ = [
    "ChildProcess",
    "ForkServerClient",
    "WorkerLostError",
    "WorkerStartError",
    "signal_group",
]

_READ_CHUNK = 1 << 16
#: The directory holding the ``azolla`` package, so the fork server finds it without PYTHONPATH.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from azolla.adapters.subprocess._forkserver import main; main(sys.argv[2:])"
)


class WorkerStartError(RuntimeError):
    """No worker process could be started (the fork server failed to start or to fork)."""


class WorkerLostError(WorkerStartError):
    """The fork server died while it was starting a worker, which may have begun its request.

    The worker dies with the fork server, but the request written into its pipe may have run
    in part: callers report this as a crash, not as a start that never happened.
    """


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (or to ``pid`` alone if it has none)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    except PermissionError:
        pass


class ChildProcess:
    """A worker process forked by the fork server, seen from the shepherd.

    The shepherd holds three non-blocking pipe ends: requests out, results in, output in.
    Result frames are passed to :attr:`on_frame`; the end of the result pipe calls
    :attr:`on_eof`; :attr:`exited` resolves with the exit status reported by the fork server.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request_fd: int,
        result_fd: int,
        output_fd: int,
        *,
        tail_bytes: int,
        tail_lines: int,
        max_frame: int,
    ) -> None:
        self.loop = loop
        self.pid = 0
        self.request_fd = request_fd
        self.result_fd = result_fd
        self.output_fd = output_fd
        self.tail = OutputTail(tail_bytes, tail_lines)
        self.decoder = FrameDecoder(max_frame)
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self.on_frame: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.result_eof = False
        self.protocol_error: str | None = None
        self._pending = bytearray()
        self._close_input_when_sent = False
        self._closed = False
        #: Descriptors registered with the event loop (each removed once: removing costs a
        #: dozen Python calls on the default loop).
        self._watched: set[int] = set()

    # -- I/O -------------------------------------------------------------------------------

    def start_reading(self) -> None:
        """Watch the result and output pipes."""
        self.loop.add_reader(self.result_fd, self._on_result_readable)
        self.loop.add_reader(self.output_fd, self._on_output_readable)
        self._watched.update((self.result_fd, self.output_fd))

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)

    def send(self, data: bytes) -> None:
        """Write to the request pipe without blocking (the rest is written when possible)."""
        if self.request_fd < 0:
            return
        if self._pending:
            self._pending += data
            return
        try:
            written = os.write(self.request_fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the worker is gone; its exit is handled elsewhere
        if written < len(data):
            self._pending += data[written:]
            self.loop.add_writer(self.request_fd, self._on_writable)

    def close_input(self) -> None:
        """Close the request pipe once pending data is written (the worker then exits)."""
        if self._pending:
            self._close_input_when_sent = True
        else:
            self._close_request_fd()

    def _on_writable(self) -> None:
        try:
            written = os.write(self.request_fd, self._pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._pending)
        del self._pending[:written]
        if not self._pending:
            self.loop.remove_writer(self.request_fd)
            if self._close_input_when_sent:
                self._close_request_fd()

    def _close_request_fd(self) -> None:
        if self.request_fd >= 0:
            if self._pending:
                self.loop.remove_writer(self.request_fd)
                self._pending.clear()
            os.close(self.request_fd)
            self.request_fd = -1

    def _on_result_readable(self) -> None:
        try:
            data = os.read(self.result_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._result_ended()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameTooLarge as exc:
            self.protocol_error = str(exc)
            self.kill()
            self._result_ended()
            return
        callback = self.on_frame
        for frame in frames:
            if callback is not None:
                callback(frame)

    def _result_ended(self) -> None:
        if self.result_eof:
            return
        self.result_eof = True
        self._unwatch(self.result_fd)
        if self.on_eof is not None:
            self.on_eof()

    def _on_output_readable(self) -> None:
        try:
            data = os.read(self.output_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unwatch(self.output_fd)
            return
        self.tail.feed(data)

    def drain(self) -> None:
        """Read whatever the worker already wrote (call once it has exited)."""
        for _ in range(1024):
            if self.result_eof:
                break
            try:
                data = os.read(self.result_fd, _READ_CHUNK)
            except (BlockingIOError, OSError):
                break
            if not data:
                self._result_ended()
                break
            self._feed(data)
        self.drain_output()

    def drain_output(self) -> None:
        """Read the output the worker already wrote into the tail.

        A worker flushes its output before it writes a result frame, but the event loop may
        see the frame first; call this before reporting a failure with the tail.
        """
        if self._closed:
            return
        for _ in range(1024):
            try:
                data = os.read(self.output_fd, _READ_CHUNK)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            self.tail.feed(data)

    # -- lifecycle -------------------------------------------------------------------------

    def set_exited(self, status: ExitStatus) -> None:
        """Record the exit status (called by the fork server client)."""
        if not self.exited.done():
            self.exited.set_result(status)

    @property
    def alive(self) -> bool:
        """False once the worker's exit was observed."""
        return not self.exited.done()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's process group."""
        if self.pid and not self.exited.done():
            signal_group(self.pid, sig)

    async def wait_exit(self, timeout: float) -> ExitStatus | None:
        """Wait for the exit status; None on timeout (cancelling the wait leaves it alone)."""
        exited = self.exited
        if exited.done():
            return exited.result()
        # A future and a timer: a third of the cost of wait_for(shield(...)), which runs after
        # every process-mode attempt (the worker exits just after its result arrives).
        waiter = self.loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = self.loop.call_later(timeout, wake)
        exited.add_done_callback(wake)
        try:
            await waiter
        finally:
            timer.cancel()
            exited.remove_done_callback(wake)
        return exited.result() if exited.done() else None

    async def terminate(self, grace: float, *, kill_wait: float = 5.0) -> ExitStatus:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL; return the status."""
        if not self.exited.done():
            self.kill(signal.SIGTERM)
            status = await self.wait_exit(grace)
            if status is not None:
                return status
            self.kill(signal.SIGKILL)
            status = await self.wait_exit(kill_wait)
            if status is not None:
                return status
            self.set_exited(ExitStatus.unknown())
        return self.exited.result()

    def close(self) -> None:
        """Stop watching and close the shepherd's pipe ends."""
        if self._closed:
            return
        self._closed = True
        self._close_request_fd()
        for fd in (self.result_fd, self.output_fd):
            self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.on_frame = None
        self.on_eof = None


class ForkServerClient:
    """Starts the fork server, asks it for workers and relays their exits.

    The fork server is restarted on demand after it dies (with a growing delay when it keeps
    failing). Workers of a dead fork server are killed and reported as exited with an unknown
    status.

    Args:
        modules: Task modules the fork server imports.
        limits: Resource limits for workers.
        env: The (already clean) environment of the fork server and its workers.
        python: The interpreter to run.
        sys_path: Entries put in front of the fork server's ``sys.path``.
        startup_timeout: Seconds allowed for start-up (imports included).
        max_result_bytes: Largest result frame.
        max_request_bytes: Largest request frame.
        tail_bytes: Output bytes kept per worker.
        tail_lines: Output lines reported per worker.
    """

    def __init__(
        self,
        modules: Sequence[str],
        *,
        limits: ResourceLimits,
        env: Mapping[str, str],
        python: str | None = None,
        sys_path: Sequence[str] | None = None,
        startup_timeout: float = 60.0,
        max_result_bytes: int,
        max_request_bytes: int,
        tail_bytes: int,
        tail_lines: int,
    ) -> None:
        self.modules = list(modules)
        self.limits = limits
        self.env = dict(env)
        self.python = python or sys.executable
        self.sys_path = [p for p in (sys.path if sys_path is None else sys_path) if p]
        self.startup_timeout = startup_timeout
        self.max_result_bytes = max_result_bytes
        self.max_request_bytes = max_request_bytes
        self.tail_bytes = tail_bytes
        self.tail_lines = tail_lines
        self.task_names: list[str] = []
        self.starts = 0
        #: Whether the running fork server forks without the Python-level at-fork hooks, why
        #: not, and whether its warm-up ran the worker's whole attempt path (see _forkserver).
        self.raw_fork = False
        self.raw_fork_off = ""
        self.warmed_up = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._start_lock = asyncio.Lock()
        self._alive = False
        self._closed = False
        self._ids = itertools.count(1)
        self._spawns: dict[int, tuple[asyncio.Future[int], ChildProcess]] = {}
        self._children: dict[int, ChildProcess] = {}
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._failures = 0
        self._last_error = ""

    @property
    def alive(self) -> bool:
        """True while a fork server is running and ready."""
        return self._alive

    @property
    def pid(self) -> int | None:
        """The fork server's pid, if running."""
        return self._proc.pid if self._proc is not None and self._alive else None

    # -- start / supervise -----------------------------------------------------------------

    async def ensure_started(self) -> None:
        """Start the fork server unless it runs.

        Raises:
            WorkerStartError: When it cannot be started.
        """
        if self._alive:
            return
        async with self._start_lock:
            if self._alive:
                return
            if self._closed:
                raise WorkerStartError("the executor is closed")
            if self._failures:
                await asyncio.sleep(min(5.0, 0.05 * 2 ** min(self._failures, 10)))
            try:
                await self._start()
            except WorkerStartError as exc:
                self._failures += 1
                self._last_error = str(exc)
                raise
            self._failures = 0

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        await self._reap_old()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-c",
                _BOOTSTRAP,
                _PACKAGE_ROOT,
                str(child_sock.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=None,
                pass_fds=(child_sock.fileno(),),
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            parent_sock.close()
            raise WorkerStartError(f"cannot run {self.python}: {exc}") from exc
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        self._proc = proc
        self._sock = parent_sock
        ready_future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._ready = ready_future
        self._outbox.clear()
        loop.add_reader(parent_sock.fileno(), self._on_readable, parent_sock)
        self._send(
            {
                "op": "init",
                "modules": self.modules,
                "sys_path": self.sys_path,
                "limits": self.limits.to_dict(),
                "max_result_bytes": self.max_result_bytes,
                "max_request_bytes": self.max_request_bytes,
            }
        )
        try:
            ready = await asyncio.wait_for(asyncio.shield(ready_future), self.startup_timeout)
        except BaseException as exc:
            self._on_dead(parent_sock)
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(
                    f"the fork server did not start within {self.startup_timeout:g} s"
                ) from None
            raise
        self.task_names = list(ready.get("tasks", []))
        self.raw_fork = bool(ready.get("raw_fork"))
        self.raw_fork_off = str(ready.get("raw_fork_off", ""))
        self.warmed_up = bool(ready.get("warmed_up"))
        self.starts += 1
        self._alive = True

    async def _reap_old(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(proc.wait(), 5.0)

    # -- control socket --------------------------------------------------------------------

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        if self._sock is None:
            for fd in fds or ():
                os.close(fd)
            return
        self._outbox.append((orjson.dumps(message), fds or []))
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while self._outbox:
            payload, fds = self._outbox[0]
            try:
                if fds:
                    sock.sendmsg(
                        [payload],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    )
                else:
                    sock.send(payload)
            except BlockingIOError:
                assert self._loop is not None
                self._loop.add_writer(sock.fileno(), self._on_writable, sock)
                return
            except OSError:
                return  # dead; the reader sees EOF and cleans up
            self._outbox.popleft()
            for fd in fds:
                os.close(fd)

    def _on_writable(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock.fileno())
        if sock is self._sock:
            self._flush()

    def _on_readable(self, sock: socket.socket) -> None:
        for _ in range(256):
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._on_dead(sock)
                return
            self._dispatch(orjson.loads(data))

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "exits":
            children = self._children
            for pid, code, sig, max_rss_kb in message["exits"]:
                child = children.pop(pid, None)
                if child is not None:
                    child.set_exited(ExitStatus(code=code, signal=sig, max_rss_kb=max_rss_kb))
        elif op == "spawned":
            entry = self._spawns.pop(message["id"], None)
            if entry is not None:
                future, child = entry
                child.pid = message["pid"]
                if future.done():  # the caller gave up while the worker was being forked
                    signal_group(child.pid, signal.SIGKILL)  # its exit report is ignored
                    return
                self._children[child.pid] = child
                future.set_result(child.pid)
        elif op == "spawn_failed":
            entry = self._spawns.pop(message["id"], None)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(WorkerStartError(str(message.get("message"))))
        elif op == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif op == "fatal":
            text = str(message.get("message", "fork server failed"))
            tb = str(message.get("traceback", ""))
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(WorkerStartError(f"{text}\n{tb}".strip()))

    def _on_dead(self, sock: socket.socket) -> None:
        """The fork server is gone: fail pending spawns, kill and release its workers."""
        loop = self._loop
        if loop is not None and sock.fileno() >= 0:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            with contextlib.suppress(ValueError, OSError):
                loop.remove_writer(sock.fileno())
        sock.close()
        if sock is not self._sock:
            return
        self._alive = False
        self._sock = None
        for _payload, fds in self._outbox:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._outbox.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerStartError("the fork server exited during start-up"))
        spawns, self._spawns = self._spawns, {}
        for future, _child in spawns.values():
            if not future.done():
                future.set_exception(WorkerLostError("the fork server died"))
        children, self._children = self._children, {}
        for child in children.values():
            child.kill(signal.SIGKILL)
            child.set_exited(ExitStatus.unknown())
        if self._proc is not None and self._proc.returncode is None:
            signal_group(self._proc.pid, signal.SIGKILL)

    # -- spawning --------------------------------------------------------------------------

    async def spawn(self, max_attempts: int | None, request: bytes = b"") -> ChildProcess:
        """Fork a worker that serves ``max_attempts`` attempts (None: until told to stop).

        Args:
            max_attempts: Attempts the worker serves before it exits.
            request: A request frame written to the worker's request pipe before the fork, so
                the worker finds it at once; with ``max_attempts=1`` the pipe is then closed.

        Returns:
            The worker, already being watched.

        Raises:
            WorkerStartError: When no worker could be started.
        """
        await self.ensure_started()
        loop = self._loop
        assert loop is not None
        if not self._alive or self._sock is None:  # died since ensure_started() returned
            raise WorkerStartError("the fork server died")
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        for fd in (req_w, res_r, out_r):
            os.set_blocking(fd, False)
        child = ChildProcess(
            loop,
            req_w,
            res_r,
            out_r,
            tail_bytes=self.tail_bytes,
            tail_lines=self.tail_lines,
            max_frame=self.max_result_bytes + 64,
        )
        if request:
            child.send(request)
            if max_attempts == 1:
                child.close_input()
        spawn_id = next(self._ids)
        future: asyncio.Future[int] = loop.create_future()
        self._spawns[spawn_id] = (future, child)
        self._send(
            {"op": "spawn", "id": spawn_id, "max_attempts": max_attempts}, [req_r, res_w, out_w]
        )
        try:
            await future
        except BaseException:
            if child.pid:
                self._spawns.pop(spawn_id, None)
                self._children.pop(child.pid, None)
                child.kill(signal.SIGKILL)
            # Otherwise the entry stays: the worker may already run the request written into
            # its pipe, and the "spawned" message that names it kills it (see _dispatch).
            child.close()
            raise
        child.start_reading()
        return child

    # -- shutdown --------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the fork server and every worker."""
        self._closed = True
        sock = self._sock
        for child in list(self._children.values()):
            child.kill(signal.SIGKILL)
        if sock is not None and self._alive:
            self._send({"op": "shutdown"})
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout)
        if sock is not None:
            self._on_dead(sock)
        self._proc = None
