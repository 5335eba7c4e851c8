"""An engine failure in coordination surfaces as an `AccordError` (here `NotConnected`), never as
an engine signal or a library error: barriers, counters, named leases and quorum ballots over an
in-memory KV whose engine stops answering."""

from __future__ import annotations

import asyncio

import pytest

import accord
from accord._clock import VirtualClock
from accord.coord._groups import barrier, counter_add, counter_value
from accord.coord._leases import LeaseKeeper
from accord.coord._quorum import Ballots, ProposalRecord

from ._fake_kv import FakeEvents, FakeKV


def down() -> FakeKV:
    kv = FakeKV()
    kv.fail = True
    return kv


async def test_barrier_counter_add_and_counter_value_raise_not_connected() -> None:
    kv = down()
    with pytest.raises(accord.NotConnected):
        await barrier(kv, "phase", "m1", 2, timeout=1.0)
    with pytest.raises(accord.NotConnected):
        await counter_add(kv, "hits", 1)
    with pytest.raises(accord.NotConnected):
        await counter_value(kv, "hits")


async def test_counter_adds_are_not_lost_and_the_barrier_opens_for_all() -> None:
    kv = FakeKV()
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
    kv = FakeKV(clock)
    kv.fail = True
    keeper = LeaseKeeper(kv, "me", clock)
    task = asyncio.create_task(keeper.acquire("job", 5, timeout=1.0))
    await until_done(clock, task, within=2.0)  # retried until the deadline, then gave up
    with pytest.raises(accord.NotConnected):
        task.result()


async def test_lease_acquire_of_a_held_lease_raises_lease_not_acquired_at_its_timeout() -> None:
    clock = VirtualClock()
    kv = FakeKV(clock)
    holder = LeaseKeeper(kv, "holder", clock)
    lease, renewer = await holder.acquire("job", 5, timeout=0.0)
    try:
        task = asyncio.create_task(LeaseKeeper(kv, "other", clock).acquire("job", 5, timeout=1.0))
        await until_done(clock, task, within=2.0)
        with pytest.raises(accord.LeaseNotAcquired):
            task.result()
        assert lease.valid  # renewed all along by its holder
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
    assert lease.lost.is_set()


async def test_ballots_raise_not_connected_and_a_lost_event_does_not_fail_a_decision() -> None:
    record = ProposalRecord(
        id="p1", topic="t", voters=["v/1"], quorum=1.0, proposer="me", created_at=0.0
    )
    with pytest.raises(accord.NotConnected):
        await Ballots(FakeEvents(), down(), "events.decision").open(record)
    with pytest.raises(accord.NotConnected):
        await Ballots(FakeEvents(), down(), "events.decision").decision("p1")

    events = FakeEvents()
    events.fail = True  # the events stream is a copy; the KV record is the truth
    ballots = Ballots(events, FakeKV(), "events.decision")
    await ballots.open(record)
    decision = await ballots.vote("p1", "v/1", True, by="node-a")
    assert decision is not None and decision.outcome == "accepted"
    assert await ballots.decision("p1") == decision
