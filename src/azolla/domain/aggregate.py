"""The base of Azolla's aggregates: ``eventsourcing``'s Aggregate with a lean event path.

Every task costs five events on its happy path, so creating and applying an event is on the
orchestrator's hottest path. ``eventsourcing``'s generic machinery (signature filtering of
keyword arguments, topic resolution, argument copying, frozen-dataclass ``__init__`` with one
``object.__setattr__`` per field) made :meth:`Task.submit` and :meth:`Attempt.assign` cost
~60 µs each here. The overrides below do the same work for Azolla's explicit events, whose
fields are always all given: the events are the same classes with the same field values
(``tests/unit/domain/test_aggregate_fast_path.py`` checks them against the generic
constructors), aggregates end in the same state, and :func:`~azolla.domain.events.rebuild`
folds stored events through the same ``mutate`` methods.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate, CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import get_topic, resolve_topic

__all__ = ["AzollaAggregate", "new_event"]

_E = TypeVar("_E")
_A = TypeVar("_A", bound="AzollaAggregate")


def new_event(event_class: type[_E], fields: dict[str, Any]) -> _E:
    """Make an event (a frozen dataclass) from a complete field dict without its ``__init__``.

    The caller passes every field of ``event_class``; no defaults or ``__post_init__`` apply.
    """
    event: _E = object.__new__(event_class)
    event.__dict__.update(fields)
    return event


@cache
def _aggregate_class(topic: str) -> tuple[type[Aggregate], tuple[str, ...]]:
    """The aggregate class a topic names, and the parameters of its ``__init__``."""
    cls: type[Aggregate] = resolve_topic(topic)
    params = tuple(name for name in inspect.signature(cls.__init__).parameters
                   if name != "self")
    return cls, params


@cache
def _topic(cls: type[Any]) -> str:
    return get_topic(cls)


class AzollaAggregate(Aggregate):
    """An eventsourcing aggregate whose events are created and applied without reflection.

    Subclasses declare their creation event as a subclass of :class:`AzollaAggregate.Created`
    and pass ``id``, ``timestamp`` and every event field to :meth:`_create` and
    :meth:`trigger_event`.
    """

    class Created(Aggregate.Created):
        """Creation event whose ``mutate`` builds the aggregate without signature filtering."""

        def mutate(self, aggregate: Any) -> Any:
            """Construct the aggregate this event creates (``aggregate`` must be None)."""
            assert aggregate is None
            cls, params = _aggregate_class(self.originator_topic)
            agg: Any = cls.__new__(cls)
            agg.__base_init__(self.originator_id, self.originator_version, self.timestamp)
            fields = self.__dict__
            agg.__init__(**{name: fields[name] for name in params})
            self.apply(agg)
            return agg

    @classmethod
    def _create(cls: type[_A], event_class: type[CanInitAggregate[UUID]], *,
                id: UUID | None = None, **fields: Any) -> _A:
        """Create the aggregate from a creation event holding ``fields`` (``id`` required)."""
        if id is None:
            raise ValueError(f"{cls.__name__} is created with an explicit id")
        fields["originator_topic"] = _topic(cls)
        fields["originator_id"] = id
        fields["originator_version"] = cls.INITIAL_VERSION
        if fields.get("timestamp") is None:
            fields["timestamp"] = event_class.create_timestamp()
        event = new_event(event_class, fields)
        agg: _A = event.mutate(None)  # type: ignore[assignment]
        agg._pending_events.append(event)
        return agg

    def trigger_event(self, event_class: type[CanMutateAggregate[UUID]], **fields: Any) -> None:
        """Create the next event of this aggregate from ``fields`` and apply it."""
        version = self._version + 1
        fields["originator_id"] = self._id
        fields["originator_version"] = version
        timestamp = fields.get("timestamp")
        if timestamp is None:
            timestamp = fields["timestamp"] = event_class.create_timestamp()
        event = new_event(event_class, fields)
        # What ``event.mutate(self)`` does, minus its checks that the event names this
        # aggregate and the next version (true by construction here).
        event.apply(self)
        self._version = version
        self._modified_on = timestamp
        self._pending_events.append(event)

    def collect_events(self) -> list[CanMutateAggregate[UUID]]:
        """Return the pending events in order and clear the pending list."""
        events, self._pending_events = self._pending_events, []
        return events
