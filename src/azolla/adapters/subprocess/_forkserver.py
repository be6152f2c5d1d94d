"""The fork server: imports the task modules once, then forks a worker per request.

Started by the shepherd as ``python -c <bootstrap> <package-dir> <control-fd>`` (with a clean
environment, in its own session), which imports this module and calls :func:`main`. The control
descriptor is a ``SOCK_SEQPACKET`` Unix socket; every message is one orjson object.

Shepherd -> fork server:

* ``{"op": "init", "modules": [...], "sys_path": [...], "limits": {...},
  "max_result_bytes": n, "max_request_bytes": n}`` (first message);
* ``{"op": "spawn", "id": n, "max_attempts": k | null}`` with three descriptors attached
  (``SCM_RIGHTS``): request-read, result-write, output-write;
* ``{"op": "shutdown"}``.

Fork server -> shepherd:

* ``{"op": "ready", "pid": p, "tasks": [...]}`` or ``{"op": "fatal", "message": "..."}``;
* ``{"op": "spawned", "id": n, "pid": p}`` or ``{"op": "spawn_failed", "id": n, ...}``;
* ``{"op": "exited", "pid": p, "code": c | null, "signal": s | null, "max_rss_kb": k}``.

When a worker exits, the fork server kills the worker's process group *before* reaping it (the
zombie keeps the group id from being reused), and kills any orphan that was re-parented to it
(it is a child subreaper). When the shepherd goes away (control socket closed) or on
``shutdown``/``SIGTERM``, it kills every worker and exits.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

import orjson

_PR_SET_CHILD_SUBREAPER = 36
_MAX_MESSAGE = 1 << 20


class _Shutdown(Exception):
    pass


class ForkServer:
    """The fork server's main loop (runs in its own process)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.registry: Any = None
        self.limits: Any = None
        self.max_result_bytes = 0
        self.max_request_bytes = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()

    # -- messages --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(orjson.dumps(message))
        except OSError as exc:
            raise _Shutdown from exc

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        fds = array.array("i")
        msg, ancdata, _flags, _addr = self.sock.recvmsg(
            _MAX_MESSAGE, socket.CMSG_SPACE(16 * fds.itemsize)
        )
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not msg:
            for fd in fds:
                os.close(fd)
            raise _Shutdown
        return orjson.loads(msg), list(fds)

    # -- start-up --------------------------------------------------------------------------

    def initialise(self) -> None:
        message, fds = self.receive()
        for fd in fds:
            os.close(fd)
        if message.get("op") != "init":
            raise _Shutdown
        for entry in reversed(message.get("sys_path", [])):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        try:
            from azolla.adapters.subprocess import _child
            from azolla.adapters.subprocess.limits import ResourceLimits
            from azolla.tasks import load_modules

            self.registry = load_modules(message.get("modules", []))
            self.limits = ResourceLimits.from_dict(message.get("limits", {}))
            _child.preload()
        except BaseException as exc:
            self.send(
                {
                    "op": "fatal",
                    "message": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-8000:],
                }
            )
            raise _Shutdown from exc
        self.max_result_bytes = int(message["max_result_bytes"])
        self.max_request_bytes = int(message["max_request_bytes"])
        with contextlib.suppress(OSError, AttributeError):
            _child._libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        gc.collect()
        gc.freeze()  # keep forked workers from copying pages just to update GC headers
        self.send({"op": "ready", "pid": os.getpid(), "tasks": self.registry.names()})

    # -- main loop -------------------------------------------------------------------------

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, _raise_shutdown)
        self.selector.register(self.sock, selectors.EVENT_READ, "ctrl")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in self.selector.select():
                if key.data == "ctrl":
                    self.handle_message()
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                    self.reap()

    def handle_message(self) -> None:
        message, fds = self.receive()
        op = message.get("op")
        if op == "spawn":
            self.spawn(message, fds)
            return
        for fd in fds:
            os.close(fd)
        if op == "shutdown":
            raise _Shutdown

    def spawn(self, message: dict[str, Any], fds: list[int]) -> None:
        spawn_id = message["id"]
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self.send({"op": "spawn_failed", "id": spawn_id, "message": "expected 3 descriptors"})
            return
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.send({"op": "spawn_failed", "id": spawn_id, "message": str(exc)})
            return
        if pid == 0:
            self._become_worker(fds, message)
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        self.send({"op": "spawned", "id": spawn_id, "pid": pid})

    def _become_worker(self, fds: list[int], message: dict[str, Any]) -> None:
        try:
            self.selector.close()
            self.sock.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            from azolla.adapters.subprocess._child import worker_entry

            worker_entry(
                fds,
                self.registry,
                self.limits,
                message.get("max_attempts"),
                self.max_result_bytes,
                self.max_request_bytes,
            )
        finally:
            os._exit(70)

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            known = pid in self.children
            if known:
                # Kill what the worker left in its group while the zombie pins the group id.
                _kill_group(pid)
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                continue
            if known:
                self.children.discard(pid)
                self.send(
                    {
                        "op": "exited",
                        "pid": pid,
                        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                        "max_rss_kb": usage.ru_maxrss,
                    }
                )
            self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill re-parented descendants of finished workers (we are their subreaper)."""
        for pid in _children():
            if pid not in self.children:
                _kill_group(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        for pid in list(self.children):
            _kill_group(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.kill_orphans()
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _raise_shutdown(*_: object) -> None:
    raise _Shutdown


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        if pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGKILL)


def _children() -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as fh:
                pids.extend(int(p) for p in fh.read().split())
    return pids


def main(argv: list[str] | None = None) -> None:
    """Run the fork server on the control socket whose descriptor is ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(True)
    server = ForkServer(sock)
    try:
        server.initialise()
        server.serve()
    except (_Shutdown, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
