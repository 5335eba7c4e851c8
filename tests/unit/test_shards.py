"""Shard ownership (`cluster/_shards.ShardManager`) over the in-memory engine on a virtual clock:
leases are acquired, renewed, lost when renewals stop getting through, handed off, and taken over
from a holder that stopped renewing. No sleeps: time moves only when the test advances it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from accord._clock import VirtualClock
from accord.cluster._config import ClusterConfig
from accord.cluster._detector import State
from accord.cluster._membership import MemberInfo
from accord.cluster._placement import assign
from accord.cluster._shards import LeaseValue, ShardManager
from accord.engine._api import KV, BucketSpec
from accord.engine.memory import MemoryEngine

TTL = 2
SHARDS = 4


class Members:
    """Membership as ShardManager reads it: who am I, who is live, in what state."""

    def __init__(self, name: str, live: list[str]) -> None:
        self.me = MemberInfo(name=name, incarnation=f"{name}-1", pid=1, host="h", started_at=0.0)
        self.alive = live

    def live(self) -> list[str]:
        return list(self.alive)

    def state(self, node: str) -> State | None:
        return State.ALIVE if node in self.alive else None


class Owner:
    """Records what the node side is told."""

    def __init__(self) -> None:
        self.acquired: list[tuple[int, int]] = []
        self.released: list[tuple[int, bool, bool]] = []

    async def shard_acquired(self, shard: int, epoch: int) -> None:
        self.acquired.append((shard, epoch))

    async def shard_released(self, shard: int, graceful: bool, orphan: bool = False) -> None:
        self.released.append((shard, graceful, orphan))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def engine(clock: VirtualClock) -> MemoryEngine:
    return MemoryEngine(clock=clock)


@pytest.fixture
async def kv(engine: MemoryEngine) -> KV:
    # As `open_cluster` makes it: per-key TTLs, and a marker when a key expires.
    return await engine.bucket(BucketSpec(name="leases", marker_ttl=1))


async def until(clock: VirtualClock, cond: Callable[[], bool], within: float = 30.0) -> None:
    """Advance virtual time in small steps until `cond()` holds; fail after `within` seconds."""
    deadline = clock.now() + within
    while not cond():
        assert clock.now() < deadline, "condition not reached within the virtual deadline"
        await clock.advance(0.05)


Manager = tuple[ShardManager, Owner, Members]


@pytest.fixture
async def node_a(kv: KV, clock: VirtualClock) -> AsyncIterator[Manager]:
    members, owner = Members("a", ["a"]), Owner()
    config = ClusterConfig(num_shards=SHARDS, lease_ttl=TTL)
    mgr = ShardManager(kv, config, members, owner, clock=clock)
    await mgr.start()
    try:
        yield mgr, owner, members
    finally:
        await mgr.stop()


async def lease_of(kv: KV, shard: int) -> LeaseValue | None:
    entry = await kv.get(f"shard.{shard}")
    return None if entry is None else msgspec.msgpack.decode(entry.value, type=LeaseValue)


async def revision(kv: KV, key: str) -> int:
    entry = await kv.get(key)
    assert entry is not None, key
    return entry.revision


async def test_a_lone_node_acquires_every_shard_with_its_create_revision_as_epoch(
    node_a: Manager, kv: KV, clock: VirtualClock
) -> None:
    mgr, owner, _ = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    for shard, epoch in mgr.held().items():
        assert mgr.serving(shard) == epoch
        assert (shard, epoch) in owner.acquired
        lease = await lease_of(kv, shard)
        assert lease is not None and lease.node == "a" and lease.epoch == epoch


async def test_renewals_keep_the_leases_past_many_ttls(
    node_a: Manager, kv: KV, clock: VirtualClock
) -> None:
    mgr, owner, _ = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    epochs = mgr.held()
    revisions = {s: await revision(kv, f"shard.{s}") for s in epochs}
    await clock.advance(5 * TTL)
    assert mgr.held() == epochs  # same epochs: never lost, never re-acquired
    assert all(mgr.serving(s) == e for s, e in epochs.items())
    assert all([await revision(kv, f"shard.{s}") > revisions[s] for s in epochs])  # renewed
    assert owner.released == []


async def test_a_shard_is_lost_once_renewals_stop_getting_through(
    node_a: Manager, engine: MemoryEngine, clock: VirtualClock
) -> None:
    mgr, owner, _ = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    engine.down()  # the engine stops answering: no renewal is confirmed any more
    lost_at = clock.now()
    await until(clock, lambda: not mgr.held(), within=2 * TTL)
    # Served until validity ran out (TTL minus the margin after the last confirmed renewal),
    # never past the TTL, and handed to the node as an orphan (split-brain types keep serving).
    assert clock.now() - lost_at < TTL
    assert sorted(owner.released) == [(s, False, True) for s in range(SHARDS)]
    assert all(mgr.serving(s) is None for s in range(SHARDS))


async def test_shards_are_handed_off_to_a_joining_node(
    node_a: Manager, kv: KV, clock: VirtualClock
) -> None:
    mgr, owner, members = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    members.alive = ["a", "b"]
    mgr.wake()
    theirs = {s for s, n in assign(SHARDS, ["a", "b"]).items() if n == "b"}
    assert theirs, "placement gives the joining node some shards"
    await until(clock, lambda: set(mgr.held()) == set(range(SHARDS)) - theirs)
    assert sorted(s for s, graceful, _ in owner.released if graceful) == sorted(theirs)
    assert all([await kv.get(f"shard.{s}") is None for s in theirs])  # released for b to take


async def test_a_lease_left_unrenewed_without_expiry_is_taken_over_by_compare_and_set(
    kv: KV, clock: VirtualClock
) -> None:
    # A stream leader elected during a partition may not expire a lease by TTL: node b's lease
    # stays in the bucket, unrenewed. After TTL + grace the desired owner takes it by CAS on the
    # revision it saw, and its epoch (the new revision) is greater than b's.
    stale = msgspec.msgpack.encode(LeaseValue("b", 0, "b-1"))
    old = {s: await kv.put(f"shard.{s}", stale) for s in range(SHARDS)}  # no TTL: never expires
    members, owner = Members("a", ["a"]), Owner()
    mgr = ShardManager(kv, ClusterConfig(num_shards=SHARDS, lease_ttl=TTL), members, owner,
                       clock=clock)  # fmt: skip
    await mgr.start()
    try:
        await clock.advance(TTL)
        assert mgr.held() == {}  # not before TTL + grace since the lease was seen
        await until(clock, lambda: len(mgr.held()) == SHARDS)
        for shard, epoch in mgr.held().items():
            assert epoch > old[shard]
            lease = await lease_of(kv, shard)
            assert lease is not None and lease.node == "a"
    finally:
        await mgr.stop()


async def test_a_renewal_refused_because_another_node_took_the_key_stops_serving_at_once(
    node_a: Manager, kv: KV, clock: VirtualClock
) -> None:
    mgr, owner, _ = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    await kv.put("shard.0", msgspec.msgpack.encode(LeaseValue("b", 99, "b-1")), ttl=TTL)
    await until(clock, lambda: 0 not in mgr.held(), within=TTL / 2)
    assert (0, False, False) in owner.released  # lost, not orphaned: the new holder is reachable


async def test_leaving_hands_every_shard_off_and_frees_its_key(
    node_a: Manager, kv: KV, clock: VirtualClock
) -> None:
    mgr, owner, _ = node_a
    await until(clock, lambda: len(mgr.held()) == SHARDS)
    await mgr.leave(timeout=5.0)
    assert mgr.held() == {}
    assert sorted(owner.released) == [(s, True, False) for s in range(SHARDS)]
    assert all([await kv.get(f"shard.{s}") is None for s in range(SHARDS)])
    await clock.advance(3 * TTL)
    assert mgr.held() == {}  # a leaving node takes nothing back
