"""An engine failure in coordination surfaces as an `AccordError` (here `NotConnected`), never as
an engine signal or a library error: barriers, counters, named leases and quorum ballots over the
in-memory engine, cut off or failing one call."""

from __future__ import annotations

import asyncio

import pytest

import accord
from accord._clock import VirtualClock
from accord._errors import NotConnected
from accord.coord._groups import barrier, counter_add, counter_value
from accord.coord._leases import LeaseKeeper
from accord.coord._quorum import Ballots, ProposalRecord
from accord.engine._api import KV, BucketSpec, Refused, StreamSpec
from accord.engine.memory import MemoryEngine

SUBJECT = "accord.t.events.decision"


async def bucket(engine: MemoryEngine, name: str = "coord", marker_ttl: int = 0) -> KV:
    return await engine.bucket(BucketSpec(name=name, marker_ttl=marker_ttl))


async def test_barrier_counter_add_and_counter_value_raise_not_connected() -> None:
    engine = MemoryEngine()
    kv = await bucket(engine)
    engine.down()
    with pytest.raises(accord.NotConnected):
        await barrier(kv, "phase", "m1", 2, timeout=1.0)
    with pytest.raises(accord.NotConnected):
        await counter_add(kv, "hits", 1)
    with pytest.raises(accord.NotConnected):
        await counter_value(kv, "hits")


async def test_an_engine_refusal_is_not_connected_not_an_internal_signal() -> None:
    engine = MemoryEngine()
    kv = await bucket(engine)
    engine.fail_next("kv.create", Refused("bucket full (injected)"))
    with pytest.raises(accord.NotConnected):
        await counter_add(kv, "hits", 1)
    assert await counter_add(kv, "hits", 1) == 1  # nothing was applied by the refused add


async def test_counter_adds_are_not_lost_and_the_barrier_opens_for_all() -> None:
    kv = await bucket(MemoryEngine())
    await asyncio.gather(*(counter_add(kv, "hits", 1) for _ in range(20)))
    assert await counter_value(kv, "hits") == 20
    arrived = await asyncio.gather(*(barrier(kv, "p", f"m{i}", 3, timeout=5) for i in range(3)))
    assert arrived == [3, 3, 3]


async def until_done(clock: VirtualClock, task: asyncio.Task[object], within: float) -> None:
    deadline = clock.now() + within
    while not task.done():
        assert clock.now() < deadline, "still running at the virtual deadline"
        await clock.advance(0.05)


async def test_lease_acquire_on_an_unreachable_engine_raises_not_connected_at_its_timeout() -> None:
    clock = VirtualClock()
    engine = MemoryEngine(clock=clock)
    kv = await bucket(engine, "locks", marker_ttl=1)
    engine.down()
    task = asyncio.create_task(LeaseKeeper(kv, "me", clock).acquire("job", 5, timeout=1.0))
    await until_done(clock, task, within=2.0)  # retried until the deadline, then gave up
    with pytest.raises(accord.NotConnected):
        task.result()


async def test_lease_acquire_of_a_held_lease_raises_lease_not_acquired_at_its_timeout() -> None:
    clock = VirtualClock()
    kv = await bucket(MemoryEngine(clock=clock), "locks", marker_ttl=1)
    lease, renewer = await LeaseKeeper(kv, "holder", clock).acquire("job", 2, timeout=0.0)
    try:
        task = asyncio.create_task(LeaseKeeper(kv, "other", clock).acquire("job", 2, timeout=5.0))
        await until_done(clock, task, within=6.0)  # 5 s: longer than the TTL, renewed meanwhile
        with pytest.raises(accord.LeaseNotAcquired):
            task.result()
        assert lease.valid
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
    assert lease.lost.is_set()
    later, renewer = await LeaseKeeper(kv, "other", clock).acquire("job", 2, timeout=0.0)
    renewer.cancel()
    await asyncio.gather(renewer, return_exceptions=True)
    assert later.token > lease.token  # released on exit: the next holder gets a newer token


def proposal() -> ProposalRecord:
    return ProposalRecord(
        id="p1", topic="t", voters=["v/1"], quorum=1.0, proposer="me", created_at=0.0
    )


async def test_ballots_raise_not_connected_while_the_engine_is_unreachable() -> None:
    engine = MemoryEngine()
    ballots = Ballots(engine, await bucket(engine), SUBJECT)
    engine.down()
    with pytest.raises(accord.NotConnected):
        await ballots.open(proposal())
    with pytest.raises(accord.NotConnected):
        await ballots.decision("p1")
    with pytest.raises(accord.NotConnected):
        await ballots.vote("p1", "v/1", True, by="node-a")


async def test_a_decision_is_recorded_once_and_appended_to_the_events_stream() -> None:
    engine = MemoryEngine()
    await engine.ensure_stream(StreamSpec(name="events", subjects=("accord.t.events.>",)))
    ballots = Ballots(engine, await bucket(engine), SUBJECT)
    await ballots.open(proposal())
    decision = await ballots.vote("p1", "v/1", True, by="node-a")
    assert decision is not None and decision.outcome == "accepted"
    again = await ballots.decide(proposal(), "expired", {}, by="late-proposer")
    assert again == decision  # never decided twice
    event = await engine.get_message("events", subject=SUBJECT)
    assert event is not None and b'"accepted"' in event.data


async def test_a_lost_decision_event_does_not_fail_the_decision() -> None:
    engine = MemoryEngine()
    ballots = Ballots(engine, await bucket(engine), SUBJECT)
    await ballots.open(proposal())
    engine.fail_next("append", NotConnected("events stream away (injected)"))
    decision = await ballots.vote("p1", "v/1", True, by="node-a")  # the KV record is the truth
    assert decision is not None and await ballots.decision("p1") == decision
