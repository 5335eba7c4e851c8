"""The event bus's public types and the small `Backend` protocol its two stores implement.

Everything the bus guarantees (decoding by annotation, per-key order, retries, dead letters,
routing to agents) lives once above `Backend` (`_consumer.py`, `_bus.py`); a backend only stores
events, hands out a partition's events to the lease holder, acknowledges them and keeps leases.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import msgspec

from .._errors import AccordError as AccordError
from .._errors import ConfigurationError, NotConnected

Fsync = Literal["replicated", "always", "everysec", "no", "off", "waitaof"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class PublishUnconfirmed(AccordError):
    """The store did not confirm the publish: the event may or may not have been stored.
    Publishing it again may store it twice (consumers see a duplicate, never a loss)."""

    def __init__(self, message: str, *, event_id: str) -> None:
        super().__init__(message)
        self.event_id = event_id


class BusUnavailable(NotConnected):
    """The bus's store cannot be reached (or stopped answering)."""


class PublishAck(msgspec.Struct, frozen=True):
    """A publish the store confirmed. `durable`: on disk (JetStream: stored; Redis: the append-only
    file is fsynced before the reply, `appendfsync always`, or `WAITAOF` confirmed it). Otherwise
    `loss_window` says how many seconds of acknowledged events a server crash may lose (Redis
    `appendfsync everysec`: 1; `no`/no AOF: unbounded, given as -1)."""

    topic: str
    id: str
    partition: int
    durable: bool
    fsync: str
    loss_window: float = 0.0
    duplicate: bool = False


class Delivery(msgspec.Struct, frozen=True):
    """What a handler learns besides the event: its key, id (the publisher's, stable across
    redeliveries and replays), attempt (1 on the first delivery), topic, group, publish time."""

    topic: str
    group: str
    key: str
    id: str
    attempt: int
    published_at: float


class BusDeadLetter(msgspec.Struct, frozen=True):
    """An event a group gave up on after `attempts` failed handlings (`error`: the last one)."""

    id: str  # the dead letter's own id in the store (for replay / purge)
    topic: str
    group: str
    key: str
    event_id: str
    type: str
    attempts: int
    error: str
    failed_at: float
    body: bytes = b""


class GroupStats(msgspec.Struct, frozen=True):
    """One topic seen by one group (`group` empty: the topic alone, no group yet)."""

    topic: str
    group: str
    published: int
    pending: int  # stored, not yet acknowledged by the group (undelivered or in flight)
    oldest_pending_age: float  # seconds; 0 when nothing is pending
    redeliveries: int
    dead_letters: int


# -- what a backend stores and hands out ------------------------------------------------------


class Event(msgspec.Struct, frozen=True):
    """An event as stored: the body is JSON (so systems outside accord can publish too)."""

    id: str
    key: str
    type: str
    body: bytes
    published_at: float
    only: str = ""  # a replayed dead letter: for this group only, the others skip it


class Fetched(msgspec.Struct):
    """An event handed to a partition's holder; `attempt` counts the store's deliveries."""

    event: Event
    attempt: int
    token: Any  # the backend's handle for acknowledging it


class PartitionReader(Protocol):
    """The events of one (topic, group, partition), for the holder of its lease: first those a
    previous holder left unacknowledged, in publish order, then new ones in publish order."""

    async def fetch(self, limit: int, block: float) -> list[Fetched]:
        """Up to `limit` events, waiting up to `block` seconds for the first. Raises
        `BusUnavailable` when the store does not answer."""

    def push(
        self, take: Callable[[list[Fetched]], bool], has_room: Callable[[], Awaitable[None]]
    ) -> bool:
        """Deliver events by calling `take` (in order, from the event loop, never concurrently)
        instead of through `fetch`, if this store delivers by itself: True if it will. `take`
        returns False when the partition takes no more (the store stops delivering; what it
        delivered and was refused comes again to the next holder); `has_room` returns when the
        partition has room for more (the store waits for it before asking for more)."""

    async def ack(self, fs: list[Fetched]) -> None:
        """Done with these: the group never gets them again (an ack lost on the way means a
        duplicate). Raises `BusUnavailable` when the store did not confirm it."""

    async def touch(self, fs: list[Fetched]) -> None:
        """Still working on these: no other consumer may take them over yet."""

    async def retrying(self, f: Fetched, attempt: int) -> None:
        """`f` failed and is about to be tried for the `attempt`-th time: record that where the
        store can, so a holder taking over after a crash goes on counting (a poison event gets
        `max_deliver` attempts in all, not per crash). Raises `BusUnavailable` when the store
        did not confirm it (the count may then restart lower)."""

    async def close(self) -> None:
        """Stop reading; unacknowledged events stay pending for the next holder."""


class Backend(Protocol):
    """A store for the bus. Every method raises `BusUnavailable` when the store is unreachable."""

    kind: str  # "jetstream" or "redis"
    lease_granularity: float  # leases last whole multiples of this (seconds)

    async def partitions(self, topic: str, default: int) -> int:
        """The topic's partition count, fixed by its first user (`default`)."""

    async def append(self, topic: str, partition: int, event: Event) -> PublishAck:
        """Store the event; `PublishUnconfirmed` when the store did not confirm it."""

    async def reader(
        self, topic: str, group: str, partition: int, consumer: str, epoch: int, min_idle: float
    ) -> PartitionReader:
        """Open the partition for the lease holder at `epoch` (creating the group, which then
        sees every event still stored, if new). Events delivered to nobody who works on them
        (not touched for `min_idle`, e.g. a read cut short by a lost lease) come again."""

    async def heartbeat(self, topic: str, group: str, consumer: str, ttl: float) -> None:
        """Say `consumer` is alive in the group for `ttl` seconds."""

    async def members(self, topic: str, group: str) -> list[str]:
        """The group's live consumers, sorted."""

    async def acquire(self, lease: str, consumer: str, ttl: float) -> int:
        """Take the lease if free: its epoch (grows with every acquisition), or 0 if held."""

    async def renew(self, lease: str, consumer: str, epoch: int, ttl: float) -> int:
        """Extend our lease (held under token `epoch`): its token from now on, 0 when it is not
        ours any more (expired, taken)."""

    async def release(self, lease: str, consumer: str, epoch: int) -> None:
        """Give the lease up if still ours."""

    async def remove_group(self, topic: str, group: str, partitions: int) -> None:
        """Forget `group` on `topic`: its position and pending events on every partition, its
        members and lease epochs (its consumers must have stopped)."""

    async def dead_letter(self, letter: BusDeadLetter) -> None:
        """Store a dead letter (its `id` is assigned by the store)."""

    async def dead_letters(self, limit: int) -> list[BusDeadLetter]:
        """The oldest `limit` dead letters."""

    async def remove_dead_letter(self, letter_id: str) -> bool:
        """Delete one dead letter; False if there was none with that id."""

    async def stats(self) -> list[GroupStats]:
        """Per topic and group: published, pending, oldest pending age, redeliveries, dead
        letters."""

    async def close(self) -> None:
        """Close the connection; idempotent."""


def check_name(what: str, name: str) -> str:
    """Topics and groups are subject tokens and stream names: letters, digits, `_`, `-`."""
    if not _NAME.match(name):
        raise ConfigurationError(f"{what} {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name
