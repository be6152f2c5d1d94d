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
(it is a child subreaper; its children are read from ``/proc/self/task/<pid>/children``, kept
open). When the shepherd goes away (control socket closed) or on ``shutdown``/``SIGTERM``, it
kills every worker and exits.

Every fork makes the fork server's own memory copy-on-write again, so its loop between forks
does little Python work: ``poll`` instead of ``selectors``, orphans scanned once per batch of exits
with one ``pread``.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

import orjson

_PR_SET_CHILD_SUBREAPER = 36
#: Largest message: the first one (``init``) carries the import path.
_MAX_MESSAGE = 1 << 20
#: Largest message after ``init`` (``spawn`` or ``shutdown``).
_MAX_REQUEST = 1 << 16


class _Shutdown(Exception):
    pass


class ForkServer:
    """The fork server's main loop (runs in its own process)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.registry: Any = None
        self.plan: Any = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.children_fd = -1
        self._cmsg_space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        self.own_pgid = os.getpgrp()

    # -- messages --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(orjson.dumps(message))
        except OSError as exc:
            raise _Shutdown from exc

    def receive(self, size: int = _MAX_REQUEST) -> tuple[dict[str, Any], list[int]]:
        """Receive one message and the descriptors attached to it.

        Raises:
            _Shutdown: When the shepherd closed the socket.
        """
        fds = array.array("i")
        msg, ancdata, _flags, _addr = self.sock.recvmsg(size, self._cmsg_space)
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
        message, fds = self.receive(_MAX_MESSAGE)
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
            self.plan = _child.WorkerPlan(
                self.registry,
                ResourceLimits.from_dict(message.get("limits", {})),
                int(message["max_result_bytes"]),
                int(message["max_request_bytes"]),
            )
        except BaseException as exc:
            self.send(
                {
                    "op": "fatal",
                    "message": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-8000:],
                }
            )
            raise _Shutdown from exc
        if self.plan.prctl is not None:
            self.plan.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        with contextlib.suppress(OSError):
            self.children_fd = os.open(
                f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY | os.O_CLOEXEC
            )
        gc.collect()
        gc.freeze()  # keep forked workers from copying pages just to update GC headers
        self.send({"op": "ready", "pid": os.getpid(), "tasks": self.registry.names()})

    # -- main loop -------------------------------------------------------------------------

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, _raise_shutdown)
        poller = select.poll()
        ctrl = self.sock.fileno()
        poller.register(ctrl, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == ctrl:
                    self.handle_message()
                else:
                    with contextlib.suppress(BlockingIOError):
                        while len(os.read(self.wake_r, 4096)) == 4096:
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
            # Every other descriptor of the fork server is closed by the worker's set-up.
            self.sock.detach()
            self.plan.worker_entry(fds, self.plan, message.get("max_attempts"))
        finally:
            os._exit(70)

    def reap(self) -> None:
        """Reap every exited child, report the workers among them, then kill orphans."""
        reaped = False
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            pid = info.si_pid
            known = pid in self.children
            if known and pid != self.own_pgid:
                # Kill what the worker left in its group while the zombie pins the group id.
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                continue
            reaped = True
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
        if reaped:
            self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill re-parented descendants of finished workers (we are their subreaper)."""
        for pid in self.child_pids():
            if pid not in self.children:
                _kill_group(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def child_pids(self) -> list[int]:
        """Pids of this process's children (workers and re-parented orphans).

        Orphans are re-parented to the main thread, the one that forks the workers; so one
        ``pread`` of its ``children`` file lists them all (a thread that a task module started
        at import time forks children of its own, which are not ours to kill).
        """
        if self.children_fd < 0:
            return _children()
        size = 1 << 16
        while True:
            try:
                data = os.pread(self.children_fd, size, 0)
            except OSError:
                return _children()
            if len(data) < size:
                return [int(p) for p in data.split()]
            size *= 4

    def shutdown(self) -> None:
        """Kill every worker and orphan, then reap the workers."""
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
