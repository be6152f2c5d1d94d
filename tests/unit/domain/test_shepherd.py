"""Every transition of the Shepherd aggregate, allowed and refused, and its slot accounting."""

from __future__ import annotations

import pytest

from azolla.domain import CapacityExceeded, InvalidTransition, Shepherd, ShepherdState
from azolla.domain.values import shepherd_stream_id

from ._support import T0, make_shepherd


def state_of(shepherd: Shepherd) -> ShepherdState:
    """The state, read through a call so that type checkers do not narrow it across commands."""
    return shepherd.state


def test_register() -> None:
    shepherd = Shepherd.register(shepherd_uuid="shep-1", domain="d", group="g", capacity=4,
                                 software_version="2.1", now=T0)
    assert shepherd.id == shepherd_stream_id("shep-1")
    assert shepherd.shepherd_uuid == "shep-1"
    assert (shepherd.domain, shepherd.group) == ("d", "g")
    assert shepherd.capacity == 4
    assert shepherd.software_version == "2.1"
    assert shepherd.partition_day == 19675
    assert shepherd.state is ShepherdState.REGISTERED
    assert shepherd.running == set()
    assert shepherd.free_slots == 4
    (event,) = shepherd.collect_events()
    assert isinstance(event, Shepherd.Registered)


def test_a_single_slot_is_enough() -> None:
    shepherd = Shepherd.register(shepherd_uuid="x", domain="d", group="g", capacity=1,
                                 software_version="1", now=T0)
    shepherd.connect(1, "1", T0)
    assert shepherd.free_slots == 1


@pytest.mark.parametrize("capacity", [0, -2])
def test_register_needs_capacity(capacity: int) -> None:
    with pytest.raises(
        InvalidTransition, match=rf"^a shepherd needs a capacity of at least 1, got {capacity}$"
    ):
        Shepherd.register(shepherd_uuid="x", domain="d", group="g", capacity=capacity,
                          software_version="1", now=T0)


def test_connect_sets_capacity_and_version() -> None:
    shepherd = make_shepherd(capacity=2, connect=False)
    shepherd.collect_events()
    shepherd.connect(5, "1.1", T0 + 1)
    assert shepherd.state is ShepherdState.CONNECTED
    assert shepherd.capacity == 5
    assert shepherd.software_version == "1.1"
    (event,) = shepherd.collect_events()
    assert isinstance(event, Shepherd.Connected)
    assert (event.capacity, event.software_version) == (5, "1.1")


def test_connect_refused_when_connected_or_without_capacity() -> None:
    shepherd = make_shepherd()
    with pytest.raises(InvalidTransition, match=r"^the shepherd is already connected$"):
        shepherd.connect(2, "1.0", T0)
    shepherd.disconnect("bye", T0)
    with pytest.raises(InvalidTransition, match=r"at least 1, got 0$"):
        shepherd.connect(0, "1.0", T0)
    assert shepherd.state is ShepherdState.DISCONNECTED
    shepherd.connect(1, "1.0", T0)
    assert state_of(shepherd) is ShepherdState.CONNECTED


@pytest.mark.parametrize("end", ["disconnect", "expire"])
def test_reconnect_after_disconnect_or_expiry(end: str) -> None:
    shepherd = make_shepherd()
    shepherd.reserve("t", 1)
    if end == "disconnect":
        shepherd.disconnect("stream closed", T0 + 1)
        assert shepherd.state is ShepherdState.DISCONNECTED
    else:
        shepherd.expire(T0 + 1)
        assert shepherd.state is ShepherdState.EXPIRED
    assert shepherd.running == set()
    shepherd.connect(3, "1.2", T0 + 2)
    assert state_of(shepherd) is ShepherdState.CONNECTED
    assert shepherd.free_slots == 3


def test_disconnect_records_the_reason() -> None:
    shepherd = make_shepherd()
    shepherd.collect_events()
    shepherd.disconnect("stream closed", T0 + 1)
    (event,) = shepherd.collect_events()
    assert isinstance(event, Shepherd.Disconnected)
    assert event.reason == "stream closed"


@pytest.mark.parametrize("method", ["disconnect", "expire"])
def test_disconnect_and_expire_are_no_ops_unless_connected_or_draining(method: str) -> None:
    for state_setup in ("registered", "disconnected", "expired"):
        shepherd = make_shepherd(connect=state_setup != "registered")
        if state_setup == "disconnected":
            shepherd.disconnect("x", T0)
        elif state_setup == "expired":
            shepherd.expire(T0)
        shepherd.collect_events()
        state = shepherd.state
        if method == "disconnect":
            shepherd.disconnect("again", T0 + 1)
        else:
            shepherd.expire(T0 + 1)
        assert shepherd.state is state
        assert shepherd.collect_events() == []


@pytest.mark.parametrize("method", ["disconnect", "expire"])
def test_a_draining_shepherd_can_disconnect_or_expire(method: str) -> None:
    shepherd = make_shepherd()
    shepherd.reserve("t", 1)
    shepherd.drain(T0)
    assert shepherd.running == {("t", 1)}  # draining keeps its attempts until they end
    if method == "disconnect":
        shepherd.disconnect("done", T0 + 1)
        assert shepherd.state is ShepherdState.DISCONNECTED
    else:
        shepherd.expire(T0 + 1)
        assert shepherd.state is ShepherdState.EXPIRED
    assert shepherd.running == set()


def test_drain() -> None:
    shepherd = make_shepherd()
    shepherd.reserve("t", 1)
    shepherd.collect_events()
    shepherd.drain(T0 + 1)
    assert shepherd.state is ShepherdState.DRAINED
    assert shepherd.running == {("t", 1)}
    (event,) = shepherd.collect_events()
    assert isinstance(event, Shepherd.Drained)
    with pytest.raises(InvalidTransition, match=r"^only a connected shepherd can drain$"):
        shepherd.drain(T0 + 2)
    assert shepherd.release("t", 1) is True


@pytest.mark.parametrize("connect", [False, True])
def test_drain_refused_unless_connected(connect: bool) -> None:
    shepherd = make_shepherd(connect=connect)
    if connect:
        shepherd.expire(T0)
    with pytest.raises(InvalidTransition, match=r"^only a connected shepherd can drain$"):
        shepherd.drain(T0)


def test_reserve_and_release_count_slots_exactly() -> None:
    shepherd = make_shepherd(capacity=2)
    shepherd.reserve("a", 1)
    assert shepherd.free_slots == 1
    shepherd.reserve("a", 1)  # the same attempt again takes no second slot
    assert shepherd.free_slots == 1
    shepherd.reserve("b", 1)
    assert shepherd.free_slots == 0
    assert shepherd.running == {("a", 1), ("b", 1)}
    with pytest.raises(CapacityExceeded, match=r"^all 2 slots are taken$") as info:
        shepherd.reserve("c", 1)
    assert info.value.code == "capacity_exceeded"
    shepherd.reserve("b", 1)  # idempotent even when full
    assert shepherd.release("a", 1) is True
    assert shepherd.release("a", 1) is False
    assert shepherd.release("b", 2) is False
    assert shepherd.free_slots == 1
    shepherd.reserve("c", 1)
    assert shepherd.running == {("b", 1), ("c", 1)}
    assert shepherd.collect_events()[-1].__class__ is Shepherd.Connected  # slots are not events


def test_a_second_attempt_of_one_task_takes_its_own_slot() -> None:
    shepherd = make_shepherd(capacity=2)
    shepherd.reserve("a", 1)
    shepherd.reserve("a", 2)
    assert shepherd.free_slots == 0


def test_free_slots_never_negative_after_capacity_shrinks() -> None:
    shepherd = make_shepherd(capacity=3)
    for task in "abc":
        shepherd.reserve(task, 1)
    shepherd.drain(T0)
    shepherd.disconnect("restart", T0)
    shepherd.connect(1, "1.0", T0)
    shepherd.running.update({("a", 1), ("b", 1)})  # reported by the reconnecting shepherd
    assert shepherd.free_slots == 0
    with pytest.raises(CapacityExceeded):
        shepherd.reserve("c", 1)


@pytest.mark.parametrize("state", ["registered", "drained", "disconnected", "expired"])
def test_reserve_refused_unless_connected(state: str) -> None:
    shepherd = make_shepherd(connect=state != "registered")
    if state == "drained":
        shepherd.drain(T0)
    elif state == "disconnected":
        shepherd.disconnect("x", T0)
    elif state == "expired":
        shepherd.expire(T0)
    with pytest.raises(InvalidTransition, match=rf"^the shepherd is {state}; it takes no work$"):
        shepherd.reserve("t", 1)
    assert shepherd.running == set()
