"""The hand-written ``SubmitRequest.__init__`` stays in step with its dataclass fields."""

from __future__ import annotations

import dataclasses
import inspect
from uuid import uuid4

import pytest

from azolla.app.model import SubmitRequest


def test_init_takes_every_field_in_order_with_the_same_defaults() -> None:
    fields = dataclasses.fields(SubmitRequest)
    parameters = list(inspect.signature(SubmitRequest.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        missing = field.default is dataclasses.MISSING
        expected = inspect.Parameter.empty if missing else field.default
        assert parameter.default == expected, field.name


def test_every_value_lands_in_its_field_and_stays_frozen() -> None:
    values = {f.name: f"value-{i}" for i, f in enumerate(dataclasses.fields(SubmitRequest))}
    values["task_id"] = uuid4()
    request = SubmitRequest(**values)
    assert {name: getattr(request, name) for name in values} == values
    assert SubmitRequest(*values.values()) == request
    assert dataclasses.replace(request, name="other").name == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.name = "changed"  # type: ignore[misc]
