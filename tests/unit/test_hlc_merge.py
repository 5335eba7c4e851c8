"""The hybrid logical clock (`cluster/_hlc.HybridClock`) and the split-brain merge of an
activation's state (`state/_durable.Durable.apply_merge`): last writer by HLC wins for plain state,
CRDT state is merged. A virtual wall clock and a store that is never touched stand in below."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

import accord
from accord._agent import spec_of
from accord._ids import AgentId
from accord.cluster._hlc import HybridClock
from accord.crdt import GCounter
from accord.state._durable import Durable
from accord.state._store import MergeState, StateRecord


class Wall:
    """A wall clock the test sets by hand (seconds since the epoch)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _ms(hlc: int) -> int:
    return hlc >> 16


def _logical(hlc: int) -> int:
    return hlc & 0xFFFF


# -- HybridClock -----------------------------------------------------------------------------


def test_now_follows_wall_time_in_the_high_bits() -> None:
    clock = HybridClock(Wall(1000.0))
    t = clock.now()
    assert _ms(t) == 1_000_000 and _logical(t) == 0


def test_now_is_strictly_monotonic_when_the_wall_clock_stands_still() -> None:
    clock = HybridClock(Wall(1000.0))
    stamps = [clock.now() for _ in range(5)]
    assert stamps == sorted(set(stamps))
    assert {_ms(s) for s in stamps} == {1_000_000}  # the logical counter absorbed the ties
    assert [_logical(s) for s in stamps] == [0, 1, 2, 3, 4]


def test_now_never_goes_backwards_when_the_wall_clock_does() -> None:
    wall = Wall(1000.0)
    clock = HybridClock(wall)
    before = clock.now()
    wall.t = 990.0  # NTP stepped the clock back ten seconds
    after = clock.now()
    assert after > before
    wall.t = 1001.0
    assert _ms(clock.now()) == 1_001_000  # and follows wall time again once it is ahead


def test_observe_of_a_later_remote_time_moves_the_clock_past_it() -> None:
    clock = HybridClock(Wall(1000.0))
    remote = HybridClock(Wall(1005.0)).now()  # a peer whose clock runs five seconds ahead
    clock.observe(remote)
    assert clock.now() > remote


def test_observe_of_an_earlier_remote_time_changes_nothing() -> None:
    clock = HybridClock(Wall(1000.0))
    ours = clock.now()
    clock.observe(ours - (5000 << 16))
    assert clock.now() == ours + 1


def test_observe_of_an_equal_time_then_now_is_after_it() -> None:
    # Two nodes with the same wall clock stamp the same time: the observer's next stamp is after.
    a, b = HybridClock(Wall(1000.0)), HybridClock(Wall(1000.0))
    ta = a.now()
    assert b.now() == ta  # a tie between nodes
    b.observe(ta)
    assert b.now() > ta


# -- apply_merge ------------------------------------------------------------------------------


class Total(msgspec.Struct):
    total: int = 0


class Hits(msgspec.Struct):
    hits: GCounter = msgspec.field(default_factory=GCounter)
    label: str = ""


class Lww(accord.Agent, type="merge_lww", failover="split_brain_allowed"):
    state: Total


class Crdt(accord.Agent, type="merge_crdt", failover="split_brain_allowed", consistency="crdt"):
    state: Hits


class Stateless(accord.Agent, type="merge_none", failover="split_brain_allowed"):
    pass


class NoStore:
    """apply_merge is pure: any store access is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"apply_merge touched the store ({name})")


def _owner(
    cls: type[accord.Agent], state: Any, hlc: int, clock: HybridClock
) -> tuple[Durable, Any]:
    spec = spec_of(cls)
    durable = Durable(spec, AgentId(spec.type_name, "k"), 3, NoStore(), None, lambda: True, clock)  # type: ignore[arg-type]
    durable.record = StateRecord(agent="k", epoch=3, hlc=hlc)
    agent = cls()
    agent.state = state  # type: ignore[attr-defined]
    return durable, agent


def _incoming(state: Any, hlc: int) -> MergeState:
    return MergeState(msgspec.Raw(msgspec.msgpack.encode(state)), hlc, "node-b", 3)


def test_lww_merge_takes_the_peer_state_when_its_hlc_is_newer() -> None:
    clock = HybridClock(Wall(1000.0))
    ours = clock.now()
    durable, agent = _owner(Lww, Total(1), ours, clock)
    assert durable.apply_merge(agent, _incoming(Total(2), ours + 1)) == "theirs"
    assert agent.state == Total(2)


def test_an_adopted_peer_state_keeps_its_write_time_so_a_later_write_still_wins() -> None:
    # Two split-brain replicas merge into the owner one after the other: the first was written
    # earlier than the second. Adopting the first must not stamp it "now" (merge time), or the
    # second, newer write would then lose to it.
    clock = HybridClock(Wall(1000.0))
    ours = clock.now()
    durable, agent = _owner(Lww, Total(1), ours, clock)
    first, second = ours + 10, ours + 20
    assert durable.apply_merge(agent, _incoming(Total(2), first)) == "theirs"
    assert durable.record.hlc == first
    clock.observe(ours + 1000)  # merging happens later than both writes
    assert durable.apply_merge(agent, _incoming(Total(3), second)) == "theirs"
    assert agent.state == Total(3) and durable.record.hlc == second


def test_lww_merge_keeps_ours_when_the_peer_hlc_is_older() -> None:
    clock = HybridClock(Wall(1000.0))
    ours = clock.now()
    durable, agent = _owner(Lww, Total(1), ours, clock)
    assert durable.apply_merge(agent, _incoming(Total(2), ours - 1)) == "ours"
    assert agent.state == Total(1)


def test_lww_merge_keeps_ours_on_an_hlc_tie() -> None:
    # Equal stamps: the owner's state stays (a deterministic choice; no flip-flop on re-send).
    clock = HybridClock(Wall(1000.0))
    ours = clock.now()
    durable, agent = _owner(Lww, Total(1), ours, clock)
    assert durable.apply_merge(agent, _incoming(Total(2), ours)) == "ours"
    assert agent.state == Total(1)


def test_a_merge_moves_the_owner_clock_past_the_peer_time() -> None:
    # The next change after the merge must win over the merged-in one in any later merge.
    clock = HybridClock(Wall(1000.0))
    durable, agent = _owner(Lww, Total(1), clock.now(), clock)
    theirs = HybridClock(Wall(1060.0)).now()  # the peer's clock is a minute ahead
    durable.apply_merge(agent, _incoming(Total(2), theirs))
    assert clock.now() > theirs


def test_crdt_merge_combines_both_sides_whatever_the_hlc() -> None:
    clock = HybridClock(Wall(1000.0))
    ours_hlc = clock.now()
    mine = Hits(GCounter().increment("node-a:3", 5), label="mine")
    durable, agent = _owner(Crdt, mine, ours_hlc, clock)
    theirs = Hits(GCounter().increment("node-b:3~x", 2), label="theirs")
    assert durable.apply_merge(agent, _incoming(theirs, ours_hlc - 100)) == "merged"
    assert agent.state.hits.value == 7
    assert agent.state.label == "mine"  # a non-CRDT field of a CRDT struct keeps the owner's


def test_a_stateless_agent_keeps_ours() -> None:
    clock = HybridClock(Wall(1000.0))
    durable, agent = _owner(Stateless, None, clock.now(), clock)
    assert durable.apply_merge(agent, _incoming(Total(2), clock.now() + 10)) == "ours"


def test_a_cut_off_activation_keeps_its_change_for_the_merge_and_never_flushes_it() -> None:
    # A split-brain activation on the cut-off side: its commit stays in memory, and the idle
    # flush of dirty state must not try the bucket either (a refused write would end the
    # activation and lose the change that the merge on heal is to carry).
    clock = HybridClock(Wall(1000.0))
    durable, agent = _owner(Lww, Total(1), clock.now(), clock)
    durable.orphaned = True
    durable._saved = msgspec.msgpack.encode(Total(1))
    agent.state = Total(9)
    asyncio.run(durable.commit(agent))
    asyncio.run(durable.flush(agent))
    assert durable.dirty
    payload = durable.merge_payload(agent, "node-a")
    assert payload is not None and payload.node == "node-a" and payload.epoch == 3
    assert msgspec.msgpack.decode(payload.state, type=Total) == Total(9)
    assert payload.hlc == durable.record.hlc > 0
