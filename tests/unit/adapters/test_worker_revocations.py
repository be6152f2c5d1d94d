"""A pool worker remembers only revocations of requests it has not taken yet.

A revocation can cross the answer to its request (the shepherd revokes a queued attempt just
as the worker starts it); remembering it would leak one entry per such race for the worker's
whole life.
"""

from __future__ import annotations

from types import SimpleNamespace

from azolla.adapters.subprocess._child import _Worker
from azolla.adapters.subprocess._frames import pack, revoke_frame


def _worker() -> _Worker:
    plan = SimpleNamespace(registry=None, limits=None, max_result_bytes=1 << 20,
                           max_request_bytes=1 << 20, async_tasks=frozenset(),
                           base_as=(-1, -1), base_cpu=(-1, -1))
    worker = _Worker(plan, None)  # type: ignore[arg-type]
    worker.eof = True  # no request pipe in this process: only what is fed
    return worker


def test_revocations_of_taken_requests_are_dropped_and_pending_ones_kept() -> None:
    worker = _worker()
    worker._feed(pack(b"first") + pack(b"second") + pack(b"third"))
    assert worker._next_request() == (0, b"first")
    worker._feed(revoke_frame(0) + revoke_frame(2))  # 0 is being served; 2 still waits
    assert worker.revoked == {2}
    assert worker._next_request() == (1, b"second")
    worker._feed(revoke_frame(1))
    assert worker.revoked == {2}
    assert worker._next_request() == (2, b"third")  # run() answers it "skipped"
    assert 2 in worker.revoked
