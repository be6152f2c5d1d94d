"""Checks shared by the event store adapters (memory and Postgres), so both refuse alike."""

from __future__ import annotations

from collections.abc import Sequence

from azolla.domain.errors import ConcurrencyConflict, DuplicateTerminalOutcome
from azolla.domain.ports import NewEvent

__all__ = ["MAX_PARTITION_DAY", "check_new_events"]

#: Highest accepted ``partition_day`` (9999-12-31).
MAX_PARTITION_DAY = 2_932_896


def check_new_events(events: Sequence[NewEvent]) -> None:
    """Validate one append before it is queued.

    Args:
        events: The events of one ``append`` call.

    Raises:
        ValueError: If a version is below 1 or a partition day is out of range.
        ConcurrencyConflict: If two events of the call name the same ``(stream_id, version)``.
        DuplicateTerminalOutcome: If two events of the call are terminal for the same stream.
    """
    for event in events:
        if event.version < 1:
            raise ValueError(f"event version must be >= 1, got {event.version}")
        if not 0 <= event.partition_day <= MAX_PARTITION_DAY:
            raise ValueError(f"partition_day out of range: {event.partition_day}")
    if len(events) < 2:
        return
    # Keyed by the UUIDs' integers: hashing a UUID is a Python-level call, an int's is not
    # (the orchestrator appends hundreds of events at once).
    keys: set[tuple[int, int]] = set()
    terminal: set[int] = set()
    for event in events:
        stream = event.stream_id.int
        key = (stream, event.version)
        if key in keys:
            raise ConcurrencyConflict(
                f"stream {event.stream_id} version {event.version} appears twice in one append"
            )
        keys.add(key)
        if event.terminal:
            if stream in terminal:
                raise DuplicateTerminalOutcome(
                    f"stream {event.stream_id} has two terminal events in one append"
                )
            terminal.add(stream)
