"""The Shepherd aggregate: a process that runs attempts for one domain and group.

Registration and connection changes are events; heartbeats and slot usage are liveness, kept
in memory only (they are rebuilt from the running attempts a reconnecting shepherd reports).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, cast

from eventsourcing.domain import Aggregate

from azolla.domain.aggregate import AzollaAggregate
from azolla.domain.errors import CapacityExceeded, InvalidTransition
from azolla.domain.values import event_time, partition_day, shepherd_stream_id

__all__ = ["Shepherd", "ShepherdState"]




class ShepherdState(StrEnum):
    """Connection state of a shepherd."""

    REGISTERED = "registered"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    EXPIRED = "expired"
    DRAINED = "drained"


class Shepherd(AzollaAggregate):
    """A shepherd. Create with :meth:`register`.

    Attributes:
        shepherd_uuid: The id the shepherd chose (unique per boot).
        domain: The domain it serves.
        group: The shepherd group it serves.
        capacity: How many attempts it runs at once.
        software_version: Its software version.
        state: A :class:`ShepherdState`.
        running: ``(task_id, attempt)`` pairs it is running (in memory, not events).
    """

    class Registered(AzollaAggregate.Created):
        """A shepherd introduced itself for the first time."""

        TYPE: ClassVar[str] = "ShepherdRegistered.v1"
        shepherd_uuid: str
        domain: str
        group: str
        capacity: int
        software_version: str

    class Connected(Aggregate.Event):
        """A stream from the shepherd was accepted."""

        TYPE: ClassVar[str] = "ShepherdConnected.v1"
        capacity: int
        software_version: str

        def apply(self, aggregate: Aggregate) -> None:
            """Mark connected with the announced capacity."""
            aggregate = cast(Shepherd, aggregate)
            aggregate.state = ShepherdState.CONNECTED
            aggregate.capacity = self.capacity
            aggregate.software_version = self.software_version

    class Disconnected(Aggregate.Event):
        """The shepherd's stream ended."""

        TYPE: ClassVar[str] = "ShepherdDisconnected.v1"
        reason: str

        def apply(self, aggregate: Aggregate) -> None:
            """Mark disconnected."""
            aggregate = cast(Shepherd, aggregate)
            aggregate.state = ShepherdState.DISCONNECTED
            aggregate.running.clear()

    class Expired(Aggregate.Event):
        """The shepherd went silent past the heartbeat timeout."""

        TYPE: ClassVar[str] = "ShepherdExpired.v1"

        def apply(self, aggregate: Aggregate) -> None:
            """Mark expired."""
            aggregate = cast(Shepherd, aggregate)
            aggregate.state = ShepherdState.EXPIRED
            aggregate.running.clear()

    class Drained(Aggregate.Event):
        """The shepherd stopped taking work (shutting down)."""

        TYPE: ClassVar[str] = "ShepherdDrained.v1"

        def apply(self, aggregate: Aggregate) -> None:
            """Mark drained."""
            aggregate = cast(Shepherd, aggregate)
            aggregate.state = ShepherdState.DRAINED

    def __init__(self, shepherd_uuid: str, domain: str, group: str, capacity: int,
                 software_version: str) -> None:
        self.shepherd_uuid = shepherd_uuid
        self.domain = domain
        self.group = group
        self.capacity = capacity
        self.software_version = software_version
        self.partition_day = partition_day(self.created_on.timestamp())
        self.state = ShepherdState.REGISTERED
        self.running: set[tuple[str, int]] = set()

    @classmethod
    def register(cls, *, shepherd_uuid: str, domain: str, group: str, capacity: int,
                 software_version: str, now: float) -> Shepherd:
        """Create the shepherd's stream.

        Raises:
            InvalidTransition: ``capacity`` is below 1.
        """
        if capacity < 1:
            raise InvalidTransition(f"a shepherd needs a capacity of at least 1, got {capacity}")
        return cls._create(cls.Registered, id=shepherd_stream_id(shepherd_uuid),
                           timestamp=event_time(now), shepherd_uuid=shepherd_uuid, domain=domain,
                           group=group, capacity=capacity,
                           software_version=software_version)

    @property
    def free_slots(self) -> int:
        """Slots not taken by running attempts (never negative)."""
        return max(self.capacity - len(self.running), 0)

    def connect(self, capacity: int, software_version: str, now: float) -> None:
        """Record a (re)connection with the announced capacity.

        Raises:
            InvalidTransition: Already connected, or ``capacity`` below 1.
        """
        if self.state is ShepherdState.CONNECTED:
            raise InvalidTransition("the shepherd is already connected")
        if capacity < 1:
            raise InvalidTransition(f"a shepherd needs a capacity of at least 1, got {capacity}")
        self.trigger_event(self.Connected, timestamp=event_time(now), capacity=capacity,
                           software_version=software_version)

    def disconnect(self, reason: str, now: float) -> None:
        """Record that the stream ended. No-op unless connected."""
        if self.state is ShepherdState.CONNECTED or self.state is ShepherdState.DRAINED:
            self.trigger_event(self.Disconnected, timestamp=event_time(now), reason=reason)

    def expire(self, now: float) -> None:
        """Record that the shepherd went silent. No-op unless connected or draining."""
        if self.state is ShepherdState.CONNECTED or self.state is ShepherdState.DRAINED:
            self.trigger_event(self.Expired, timestamp=event_time(now))

    def drain(self, now: float) -> None:
        """Record that the shepherd takes no more work.

        Raises:
            InvalidTransition: The shepherd is not connected.
        """
        if self.state is not ShepherdState.CONNECTED:
            raise InvalidTransition("only a connected shepherd can drain")
        self.trigger_event(self.Drained, timestamp=event_time(now))

    def reserve(self, task_id: str, attempt: int) -> None:
        """Take one slot for an attempt.

        Raises:
            InvalidTransition: The shepherd does not take work now.
            CapacityExceeded: No slot is free.
        """
        if self.state is not ShepherdState.CONNECTED:
            raise InvalidTransition(f"the shepherd is {self.state.value}; it takes no work")
        if (task_id, attempt) in self.running:
            return
        if self.free_slots < 1:
            raise CapacityExceeded(f"all {self.capacity} slots are taken")
        self.running.add((task_id, attempt))

    def release(self, task_id: str, attempt: int) -> bool:
        """Free the slot of an attempt; False if it held none."""
        try:
            self.running.remove((task_id, attempt))
        except KeyError:
            return False
        return True
