"""Frozen dataclasses with a hand-written ``__init__`` (slot setters, for speed on hot paths)
stay in step with their fields: same names, order and defaults, every value in its field."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from azolla.app.model import SubmitRequest
from azolla.domain.ports import ExecutionOutcome, ExecutionRequest, NewEvent

CLASSES = [SubmitRequest, ExecutionRequest, ExecutionOutcome, NewEvent]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_takes_every_field_in_order_with_the_same_defaults(cls: type[Any]) -> None:
    fields = dataclasses.fields(cls)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        missing = field.default is dataclasses.MISSING
        expected = inspect.Parameter.empty if missing else field.default
        assert parameter.default == expected, field.name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_value_lands_in_its_field_and_stays_frozen(cls: type[Any]) -> None:
    values = {f.name: f"value-{i}" for i, f in enumerate(dataclasses.fields(cls))}
    made = cls(**values)
    assert {name: getattr(made, name) for name in values} == values
    assert cls(*values.values()) == made
    first = dataclasses.fields(cls)[0].name
    assert getattr(dataclasses.replace(made, **{first: "other"}), first) == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, first, "changed")
