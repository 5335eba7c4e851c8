"""`Bus.publish` above the `Backend` seam (a fake store): a topic's partition count is looked up
once however many publishes wait for it, and a failed lookup is tried again by the next publish."""

from __future__ import annotations

import asyncio
from typing import cast

from accord.bus._api import Backend, BusUnavailable, Event, PublishAck
from accord.bus._bus import Bus


class SlowStore:
    """Only what `publish` calls: a partition lookup that waits for `release`."""

    def __init__(self) -> None:
        self.lookups = 0
        self.release = asyncio.Event()
        self.fail_next = False
        self.stored: list[Event] = []

    async def partitions(self, topic: str, default: int) -> int:
        self.lookups += 1
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise BusUnavailable("no answer in time")
        return default

    async def append(self, topic: str, partition: int, event: Event) -> PublishAck:
        self.stored.append(event)
        return PublishAck(topic, event.id, partition, durable=True, fsync="always")


async def test_concurrent_publishes_share_one_partition_lookup() -> None:
    """200 publishes to a new topic while its lookup is slow: the store is asked once (before,
    each asked: at 5,000/s a slow first answer became thousands of stream creations)."""
    store = SlowStore()
    bus = Bus(cast(Backend, store), partitions=4)
    pubs = [asyncio.create_task(bus.publish("t", {"i": i}, key=f"k{i}")) for i in range(200)]
    while not store.lookups:
        await asyncio.sleep(0)
    store.release.set()
    acks = await asyncio.gather(*pubs)
    assert store.lookups == 1
    assert len(store.stored) == 200 and {a.partition for a in acks} <= {0, 1, 2, 3}


async def test_a_failed_lookup_fails_its_waiters_and_the_next_publish_asks_again() -> None:
    store = SlowStore()
    store.fail_next = True
    bus = Bus(cast(Backend, store), partitions=4)
    store.release.set()
    first = await asyncio.gather(bus.publish("t", 1), bus.publish("t", 2), return_exceptions=True)
    assert all(isinstance(r, BusUnavailable) for r in first) and store.lookups == 1
    await bus.publish("t", 3)
    assert store.lookups == 2 and len(store.stored) == 1
