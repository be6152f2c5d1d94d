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
* ``{"op": "exits", "exits": [[pid, code | null, signal | null, max_rss_kb], ...]}``: the
  workers reaped at one wake-up, in one message.

When a worker exits, the fork server kills the worker's process group *before* reaping it (the
zombie keeps the group id from being reused), and kills any orphan that was re-parented to it
(it is a child subreaper; its children are read from ``/proc/self/task/<pid>/children``, kept
open). When the shepherd goes away (control socket closed) or on ``shutdown``/``SIGTERM``, it
kills every worker and exits.

Every fork makes the fork server's own memory copy-on-write again, so its loop between forks
does little Python work: ``poll`` instead of ``selectors``, orphans scanned once per batch of exits
with one ``pread``.

What a worker costs is mostly the pages it writes to (each is copied for it, a few microseconds on
a VM), so two things are done once in the fork server instead of in every worker:

* **No Python-level at-fork hooks when they have nothing to do** (:class:`Forker`).
  ``os.fork()`` runs every hook registered with :func:`os.register_at_fork` in the child:
  ``threading``'s alone rebuilds its thread table and locks and writes ~120 pages per worker.
  Those hooks repair the state of *other* threads (locks they held, thread objects). When the
  fork server has a single thread and the only hooks registered are the standard library's
  (``threading``, ``logging``, ``concurrent.futures``: locks; ``random``: reseed), the worker
  is forked with libc's ``fork()`` (the GIL held, so the interpreter's state is copied as
  ``os.fork()`` copies it) and only ``random`` is reseeded (on 3.11 ``threading``'s hook does
  not update the main thread's ``native_id`` either). Anything else (a second thread, a hook
  some task module registered, a Python other than CPython 3.11 with the GIL, for which this
  equivalence was not checked) and every fork is a plain ``os.fork()``.
* **A warm-up**: the attempt path (decoding a request, binding arguments, running a task,
  encoding its result) runs a few times with a private no-op task before the first fork, so that
  CPython's specialised bytecode and type-attribute cache are built once in the fork server rather
  than written (and copied) in every worker. The task modules' own tasks never run here.
"""

from __future__ import annotations

import _thread
import array
import contextlib
import copy
import gc
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import orjson

_PR_SET_CHILD_SUBREAPER = 36
#: Largest message: the first one (``init``) carries the import path.
_MAX_MESSAGE = 1 << 20
#: Largest message after ``init`` (``spawn`` or ``shutdown``).
_MAX_REQUEST = 1 << 16


class _Shutdown(Exception):
    pass


def _before_marker() -> None:
    """Registered with ``os.register_at_fork`` just to find the interpreter's hook lists."""


def _parent_marker() -> None:
    """See :func:`_before_marker`."""


def _child_marker() -> None:
    """See :func:`_before_marker`."""


def _hook_list(marker: Callable[[], None]) -> list[Any] | None:
    """The interpreter's at-fork hook list that holds ``marker`` (found through the GC)."""
    found = [
        ref
        for ref in gc.get_referrers(marker)
        if type(ref) is list and any(item is marker for item in ref)
    ]
    return found[0] if len(found) == 1 else None


def _single_threaded() -> bool:
    """True when this process has one thread (counted by the kernel, not just by Python)."""
    if _thread._count():
        return False
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1]) == 1
    except (OSError, ValueError, IndexError):
        pass
    return False


def _gil_enabled() -> bool:
    is_gil_enabled: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return True if is_gil_enabled is None else is_gil_enabled()


def _standard_hooks() -> tuple[list[object], list[Callable[[], object]]]:
    """The standard library's at-fork hooks of the modules loaded here.

    Returns:
        ``(skippable, rerun)``: hooks that only repair state left by other threads (nothing to
        repair in a single-threaded process), and hooks a child must still run (``random``'s
        reseed).
    """
    skippable: list[object] = []
    threading = sys.modules.get("threading")
    if threading is not None:
        skippable.append(getattr(threading, "_after_fork", None))
    logging = sys.modules.get("logging")
    if logging is not None:
        for name in ("_acquireLock", "_releaseLock", "_after_at_fork_child_reinit_locks"):
            skippable.append(getattr(logging, name, None))
    futures_thread = sys.modules.get("concurrent.futures.thread")
    lock = getattr(futures_thread, "_global_shutdown_lock", None)
    if lock is not None:
        skippable.extend((lock.acquire, lock.release, lock._at_fork_reinit))
    rerun: list[Callable[[], object]] = []
    random = sys.modules.get("random")
    instance = getattr(random, "_inst", None)
    if instance is not None:
        rerun.append(instance.seed)
    return [hook for hook in skippable if hook is not None], rerun


class Forker:
    """Forks workers; with libc's ``fork()`` when that is equivalent to ``os.fork()``.

    See the module docstring. :meth:`prepare` decides once, after the task modules are imported;
    :meth:`fork` re-checks cheaply that no thread was started and no hook registered since.

    Attributes:
        raw: True while workers are forked without the Python-level at-fork hooks.
        reason: Why they are not (empty when they are).
    """

    def __init__(self) -> None:
        self._fork: Callable[[], int] | None = None
        self._lists: tuple[list[Any], ...] = ()
        self._lengths: tuple[int, ...] = ()
        self._rerun: tuple[Callable[[], object], ...] = ()
        self.reason = "not prepared"

    @property
    def raw(self) -> bool:
        """True while workers are forked without the Python-level at-fork hooks."""
        return self._fork is not None

    def prepare(self) -> None:
        """Decide whether workers may be forked with libc's ``fork()``."""
        self._fork = None
        self.reason = self._check()

    def _check(self) -> str:
        if sys.platform != "linux" or sys.implementation.name != "cpython":
            return f"not CPython on Linux ({sys.implementation.name} on {sys.platform})"
        if sys.version_info[:2] != (3, 11) or not _gil_enabled():
            # What os.fork() does besides the hooks was checked for 3.11 only (3.12 registers
            # an asyncio hook, 3.13 renamed logging's); free-threaded builds take os.fork().
            return f"not checked for this Python ({sys.version.split()[0]})"
        if not _single_threaded():
            return "the fork server has more than one thread"
        markers = (_before_marker, _parent_marker, _child_marker)
        os.register_at_fork(
            before=_before_marker, after_in_parent=_parent_marker, after_in_child=_child_marker
        )
        gc.unfreeze()  # frozen objects are invisible to get_referrers (frozen again later)
        found = [_hook_list(marker) for marker in markers]
        for hooks, marker in zip(found, markers, strict=True):
            if hooks is not None:
                with contextlib.suppress(ValueError):
                    hooks.remove(marker)
        lists = [hooks for hooks in found if hooks is not None]
        if len(lists) != 3 or len({id(hooks) for hooks in lists}) != 3:
            return "the interpreter's at-fork hooks cannot be listed"
        skippable, rerun = _standard_hooks()
        wanted: list[Callable[[], object]] = []
        for hooks in lists:
            for hook in hooks:
                if any(hook == known for known in skippable):
                    continue
                if lists[2] is hooks and any(hook == known for known in rerun):
                    wanted.append(hook)
                    continue
                return f"an at-fork hook it does not know is registered: {hook!r}"
        try:
            import ctypes

            fork = ctypes.PyDLL(None, use_errno=True).fork
        except (ImportError, OSError, AttributeError) as exc:
            return f"libc fork() not found: {exc}"
        fork.restype = ctypes.c_int
        fork.argtypes = []
        self._lists = tuple(lists)
        self._lengths = tuple(len(hooks) for hooks in lists)
        self._rerun = tuple(wanted)
        self._fork = fork
        return ""

    def fork(self) -> int:
        """Fork (in the child: run the hooks it needs); return 0 in the child, the pid here.

        Raises:
            OSError: When the fork fails.
        """
        fork = self._fork
        if fork is None:
            return os.fork()
        before, parent, child = self._lists
        if _thread._count() or (len(before), len(parent), len(child)) != self._lengths:
            # A thread or a hook appeared after start-up (no task code runs here, so this
            # should not happen): from now on, the interpreter's own fork.
            self._fork = None
            self.reason = "a thread or an at-fork hook appeared after start-up"
            return os.fork()
        # PyDLL: the GIL stays held, as in os.fork(). One thing os.fork() does that this does
        # not: forget signals that arrived just before and whose Python handlers have not run
        # yet, so a child may run the fork server's handler once before its set-up resets them.
        # Both are harmless there: SIGCHLD's does nothing, and SIGTERM's (the fork server is
        # being stopped) ends the worker as a SIGTERM sent to the worker would.
        pid = fork()
        if pid == 0:
            for hook in self._rerun:
                try:
                    hook()
                except Exception:  # os.fork() reports and ignores them too
                    with contextlib.suppress(Exception):
                        traceback.print_exc()
        elif pid < 0:
            import ctypes

            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return pid


def _warm_up_task(value: float | None = None, *, label: str = "") -> list[Any]:
    """The private no-op task of the fork server's warm-up."""
    return [value, label, {"ok": True}]


_WARM_UP_TASK = "azolla.forkserver.warm_up"


def warm_up(plan: Any, rounds: int = 24) -> bool:
    """Run azolla's side of an attempt ``rounds`` times here, with a private no-op task.

    CPython 3.11 specialises bytecode in place and caches type lookups as code runs: code that
    each worker ran for the first time would write (and so copy) those pages in every worker.
    Running the path here first leaves them written once, before any fork. The tasks of the task
    modules never run; the worker's resource limits are not applied.

    Args:
        plan: The :class:`~azolla.adapters.subprocess._child.WorkerPlan`.
        rounds: How many attempts to run (bytecode is specialised after a few calls).

    Returns:
        True when the worker's whole attempt path ran; False when only part of it could (the
        worker's internals changed), which costs speed, never correctness.
    """
    import orjson

    from azolla.adapters.subprocess import _child
    from azolla.adapters.subprocess.limits import ResourceLimits
    from azolla.tasks import TaskContext, TaskDefinition, TaskRegistry, execute_sync

    registry = TaskRegistry([TaskDefinition(_warm_up_task, name=_WARM_UP_TASK)])
    payload = orjson.dumps(["", 1, _WARM_UP_TASK, "[1.5]", '{"label": "x"}', "", None])
    try:
        private = copy.copy(plan)
        private.registry = registry
        private.limits = ResourceLimits()
        private.async_tasks = frozenset()
        worker = _child._Worker(private, None)
        for _ in range(rounds):
            frame, _retire = worker._serve(payload)
            if not frame.startswith(b"O"):
                return False
        return True
    except Exception:
        with contextlib.suppress(Exception):
            context = TaskContext(task_id="", attempt=1, name=_WARM_UP_TASK, domain="")
            for _ in range(rounds):
                execute_sync(registry, _WARM_UP_TASK, "[1.5]", '{"label": "x"}', context)
        return False


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
        self.forker = Forker()
        self.warmed_up = False

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
        self.warmed_up = warm_up(self.plan)
        self.forker.prepare()
        gc.collect()
        gc.freeze()  # keep forked workers from copying pages just to update GC headers
        self.send(
            {
                "op": "ready",
                "pid": os.getpid(),
                "tasks": self.registry.names(),
                "raw_fork": self.forker.raw,
                "raw_fork_off": self.forker.reason,
                "warmed_up": self.warmed_up,
            }
        )

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
            pid = self.forker.fork()
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
        exits: list[tuple[int, int | None, int | None, int]] = []
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
                exits.append(
                    (
                        pid,
                        os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                        os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                        usage.ru_maxrss,
                    )
                )
        if exits:
            self.send({"op": "exits", "exits": exits})
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
