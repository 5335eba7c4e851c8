"""The one KV watch loop (`cluster/_watch.follow`) over the in-memory engine: current values then
changes; a watch silent for `stall` seconds is replaced (replaying the current values), and a
failed one is replaced after a backoff, on a virtual clock."""

from __future__ import annotations

import asyncio

from accord._background import cancel_and_wait
from accord._clock import VirtualClock
from accord.cluster._watch import follow
from accord.engine._api import BucketSpec, Entry
from accord.engine.memory import MemoryEngine


class Seen:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.synced = 0
        self.restarts = 0

    def apply(self, entry: Entry) -> None:
        self.entries.append(entry)

    def sync(self) -> None:
        self.synced += 1

    def restarted(self) -> None:
        self.restarts += 1


async def test_current_values_then_changes_then_a_stalled_watch_is_replaced() -> None:
    clock = VirtualClock()
    kv = await MemoryEngine(clock=clock).bucket(BucketSpec(name="b"))
    await kv.put("a", b"1")
    seen = Seen()
    task = asyncio.create_task(
        follow(kv, seen.apply, stall=5.0, synced=seen.sync, restarted=seen.restarted, clock=clock)
    )
    try:
        await clock.advance(1.0)
        await kv.put("b", b"2")
        await kv.delete("a")
        await clock.advance(1.0)
        assert [(e.key, e.deleted) for e in seen.entries] == [
            ("a", False),
            ("b", False),
            ("a", True),
        ]
        assert (seen.synced, seen.restarts) == (1, 0)
        before = len(seen.entries)
        await clock.advance(5.0)  # no change for `stall` seconds: a new watch replays "b"
        assert seen.restarts == 1 and seen.synced == 2
        replayed = [(e.key, e.deleted) for e in seen.entries[before:]]
        assert ("b", False) in replayed and ("a", False) not in replayed
    finally:
        await cancel_and_wait([task])


async def test_a_failed_watch_is_retried_until_the_engine_answers_again() -> None:
    clock = VirtualClock()
    engine = MemoryEngine(clock=clock)
    kv = await engine.bucket(BucketSpec(name="b"))
    seen = Seen()
    engine.down()
    task = asyncio.create_task(
        follow(kv, seen.apply, synced=seen.sync, restarted=seen.restarted, clock=clock)
    )
    try:
        await clock.advance(3.0)
        assert seen.restarts >= 2 and seen.synced == 0  # kept trying, paced by the backoff
        engine.up()
        await kv.put("k", b"v")
        await clock.advance(4.0)  # longer than the capped backoff
        assert seen.synced == 1 and [e.key for e in seen.entries] == ["k"]
    finally:
        await cancel_and_wait([task])
