"""Domain errors: stable codes, the hierarchy adapters rely on, and the gRPC status map."""

from __future__ import annotations

import pytest

from azolla.domain import errors
from azolla.domain.errors import (
    GRPC_STATUS_BY_CODE,
    AzollaDomainError,
    ConcurrencyConflict,
    DuplicateTerminalOutcome,
    InvalidTransition,
    StaleAttempt,
)

ERROR_CLASSES = [
    getattr(errors, name) for name in errors.__all__ if name != "GRPC_STATUS_BY_CODE"
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_has_a_stable_code_and_a_grpc_status(cls: type[AzollaDomainError]) -> None:
    assert issubclass(cls, AzollaDomainError)
    if cls is not AzollaDomainError:
        assert cls.code != AzollaDomainError.code
        assert cls.code in GRPC_STATUS_BY_CODE
    error = cls("why", 1, None) if cls is StaleAttempt else cls("why")
    assert error.message == "why"
    assert str(error) == "why"


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))


def test_refusals_are_failed_preconditions_and_conflicts_abort() -> None:
    assert GRPC_STATUS_BY_CODE[StaleAttempt.code] == "FAILED_PRECONDITION"
    assert GRPC_STATUS_BY_CODE[DuplicateTerminalOutcome.code] == "ABORTED"
    assert issubclass(StaleAttempt, InvalidTransition)
    assert issubclass(DuplicateTerminalOutcome, ConcurrencyConflict)


def test_stale_attempt_carries_both_numbers() -> None:
    error = StaleAttempt("late", reported=2, current=3)
    assert (error.reported, error.current, error.message) == (2, 3, "late")
    assert StaleAttempt("late", reported=1, current=None).current is None
