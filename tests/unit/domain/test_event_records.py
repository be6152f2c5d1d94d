"""NewEvent and StoredEvent keep dataclass behaviour with their hand-written ``__init__``."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import uuid

import pytest

from azolla.domain.ports import NewEvent, StoredEvent


def test_new_event_is_a_frozen_value() -> None:
    sid = uuid.uuid4()
    positional = NewEvent(sid, 2, "T.v1", "{}", "d", 7)
    keywords = NewEvent(stream_id=sid, version=2, type="T.v1", payload="{}", domain="d",
                        partition_day=7)
    assert positional == keywords
    assert hash(positional) == hash(keywords)
    assert positional.terminal is False
    assert (positional.stream_id, positional.version, positional.type, positional.payload,
            positional.domain, positional.partition_day) == (sid, 2, "T.v1", "{}", "d", 7)
    assert dataclasses.replace(positional, terminal=True) == NewEvent(
        sid, 2, "T.v1", "{}", "d", 7, terminal=True)
    assert pickle.loads(pickle.dumps(positional)) == positional
    assert copy.deepcopy(positional) == positional
    with pytest.raises(dataclasses.FrozenInstanceError):
        positional.version = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        NewEvent(sid, 2, "T.v1", "{}", "d")  # type: ignore[call-arg]


def test_stored_event_is_a_frozen_value() -> None:
    sid = uuid.uuid4()
    stored = StoredEvent(5, sid, 1, "T.v1", "{}", "d", 7, True, 1.5)
    assert stored == StoredEvent(position=5, stream_id=sid, version=1, type="T.v1",
                                 payload="{}", domain="d", partition_day=7, terminal=True,
                                 recorded_at=1.5)
    assert dataclasses.asdict(stored)["recorded_at"] == 1.5
    assert "position=5" in repr(stored)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stored.position = 6  # type: ignore[misc]
