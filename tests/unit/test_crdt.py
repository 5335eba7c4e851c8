"""Property tests for accord.crdt: every merge is a join, and replicas converge.

Each CRDT is described by a ``Spec``: how to apply an operation to the real
type, and how the same operation is recorded as an event in a deliberately
naive model (a replica's state is just the set of events it has seen). The
convergence test checks that every replica's value is always the documented
function of the history it has observed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accord.crdt import GCounter, GSet, LWWRegister, ORMap, ORSet, PNCounter, merge

REPLICAS = ("r0", "r1", "r2")
LAW_SETTINGS = settings(max_examples=100, deadline=None)
SIM_SETTINGS = settings(max_examples=200, deadline=None)

Event = tuple[Any, ...]
History = frozenset[Event]

ints = st.integers(0, 4)
mixed = st.one_of(st.integers(0, 4), st.sampled_from("abcd"))
keys = st.sampled_from("xyz")


@dataclass(frozen=True)
class Spec:
    name: str
    empty: Any
    decode_type: Any
    payloads: st.SearchStrategy[Any]
    # (state, replica, unique tag, payload) -> new state
    apply: Callable[[Any, str, str, Any], Any]
    # (payload, replica, unique tag, history seen so far) -> event for the model
    event: Callable[[Any, str, str, History], Event]
    expected: Callable[[History], Any]
    observe: Callable[[Any], Any] = lambda state: state.value
    json_roundtrips: bool = True


def _lww_winner(writes: list[tuple[int, str, Any]]) -> Any:
    # (timestamp, replica, value): equal stamps fall back to the encoded value,
    # which is the documented tie-break.
    if not writes:
        return None
    return max(writes, key=lambda w: (w[0], w[1], msgspec.msgpack.encode(w[2])))[2]


def _observed_tags(history: History, elem: Any) -> frozenset[str]:
    return frozenset(ev[0] for ev in history if ev[1] == "add" and ev[2] == elem)


def _add_wins_present(history: History) -> set[Any]:
    # An element is present iff some add of it was not seen by any remove.
    removed: set[str] = set()
    for ev in history:
        if ev[1] == "remove":
            removed |= ev[3]
    return {ev[2] for ev in history if ev[1] == "add" and ev[0] not in removed}


def _orset_apply(state: ORSet[Any], replica: str, tag: str, op: Any) -> ORSet[Any]:
    kind, elem = op
    return state.add(elem, tag) if kind == "add" else state.remove(elem)


def _orset_event(op: Any, replica: str, tag: str, seen: History) -> Event:
    kind, elem = op
    if kind == "add":
        return (tag, "add", elem)
    return (tag, "remove", elem, _observed_tags(seen, elem))


def _orset_payloads(elems: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from(["add", "remove"]), elems)


def _ormap_event(op: Any, replica: str, tag: str, seen: History) -> Event:
    kind, key, *rest = op
    if kind == "update":
        # The model treats an update as an add of the key plus its payload.
        return (tag, "add", key, replica, *rest)
    return (tag, "remove", key, _observed_tags(seen, key))


def _counter_map_apply(state: ORMap[Any], replica: str, tag: str, op: Any) -> Any:
    if op[0] == "remove":
        return state.remove(op[1])
    _, key, delta = op
    return state.update(key, tag, lambda c: c.increment(replica, delta), default=PNCounter())


def _counter_map_expected(history: History) -> dict[str, int]:
    # Removal hides a key but never resets it, so a live key's value counts
    # every update ever made to it.
    return {
        key: sum(ev[4] for ev in history if ev[1] == "add" and ev[2] == key)
        for key in _add_wins_present(history)
    }


def _register_map_apply(state: ORMap[Any], replica: str, tag: str, op: Any) -> Any:
    if op[0] == "remove":
        return state.remove(op[1])
    _, key, value, ts = op
    return state.update(key, tag, lambda r: r.set(value, ts, replica), default=LWWRegister[int]())


def _register_map_expected(history: History) -> dict[str, Any]:
    return {
        key: _lww_winner(
            [(ev[5], ev[3], ev[4]) for ev in history if ev[1] == "add" and ev[2] == key]
        )
        for key in _add_wins_present(history)
    }


def _nested_values(state: ORMap[Any]) -> dict[str, Any]:
    return {key: crdt.value for key, crdt in state.value.items()}


SPECS = [
    Spec(
        name="GCounter",
        empty=GCounter(),
        decode_type=GCounter,
        payloads=st.integers(0, 5),
        apply=lambda s, r, tag, n: s.increment(r, n),
        event=lambda n, r, tag, seen: (tag, n),
        expected=lambda h: sum(ev[1] for ev in h),
    ),
    Spec(
        name="PNCounter",
        empty=PNCounter(),
        decode_type=PNCounter,
        payloads=st.integers(-5, 5),
        apply=lambda s, r, tag, d: s.increment(r, d) if d >= 0 else s.decrement(r, -d),
        event=lambda d, r, tag, seen: (tag, d),
        expected=lambda h: sum(ev[1] for ev in h),
    ),
    Spec(
        name="GSet",
        empty=GSet[str | int](),
        decode_type=GSet[str | int],
        payloads=mixed,
        apply=lambda s, r, tag, e: s.add(e),
        event=lambda e, r, tag, seen: (tag, e),
        expected=lambda h: frozenset(ev[1] for ev in h),
    ),
    Spec(
        name="LWWRegister",
        empty=LWWRegister[int](),
        decode_type=LWWRegister[int],
        payloads=st.tuples(ints, st.integers(0, 5)),
        apply=lambda s, r, tag, op: s.set(op[0], op[1], r),
        event=lambda op, r, tag, seen: (tag, op[1], r, op[0]),
        expected=lambda h: _lww_winner([(ev[1], ev[2], ev[3]) for ev in h]),
    ),
    Spec(
        name="ORSet[int]",
        empty=ORSet[int](),
        decode_type=ORSet[int],
        payloads=_orset_payloads(ints),
        apply=_orset_apply,
        event=_orset_event,
        expected=_add_wins_present,
    ),
    Spec(
        name="ORSet[str|int]",
        empty=ORSet[str | int](),
        decode_type=ORSet[str | int],
        payloads=_orset_payloads(mixed),
        apply=_orset_apply,
        event=_orset_event,
        expected=_add_wins_present,
        # JSON object keys are strings, so mixed keys can't be told apart.
        json_roundtrips=False,
    ),
    Spec(
        name="ORMap[PNCounter]",
        empty=ORMap[PNCounter](),
        decode_type=ORMap[PNCounter],
        payloads=st.one_of(
            st.tuples(st.just("update"), keys, st.integers(-3, 3)),
            st.tuples(st.just("remove"), keys),
        ),
        apply=_counter_map_apply,
        event=_ormap_event,
        expected=_counter_map_expected,
        observe=_nested_values,
    ),
    Spec(
        name="ORMap[LWWRegister]",
        empty=ORMap[LWWRegister[int]](),
        decode_type=ORMap[LWWRegister[int]],
        payloads=st.one_of(
            st.tuples(st.just("update"), keys, ints, st.integers(0, 5)),
            st.tuples(st.just("remove"), keys),
        ),
        apply=_register_map_apply,
        event=_ormap_event,
        expected=_register_map_expected,
        observe=_nested_values,
    ),
]

by_spec = pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)


def states(spec: Spec) -> st.SearchStrategy[Any]:
    """Arbitrary reachable states, built from ops at random replicas.

    Tags come from a small pool so independently drawn states often share
    history, which is where merge bugs hide.
    """
    ops = st.lists(
        st.tuples(st.sampled_from(REPLICAS), st.integers(0, 6), spec.payloads),
        max_size=12,
    )

    def build(ops: list[tuple[str, int, Any]]) -> Any:
        return functools.reduce(
            lambda s, op: spec.apply(s, op[0], f"{op[0]}:{op[1]}", op[2]),
            ops,
            spec.empty,
        )

    return ops.map(build)


def _snapshot(state: Any) -> bytes:
    return msgspec.msgpack.encode(state)


@by_spec
@LAW_SETTINGS
@given(data=st.data())
def test_merge_is_commutative(spec: Spec, data: st.DataObject) -> None:
    a, b = data.draw(states(spec)), data.draw(states(spec))
    before = _snapshot(a), _snapshot(b)

    ab, ba = merge(a, b), merge(b, a)

    assert ab == ba
    assert spec.observe(ab) == spec.observe(ba)
    # Canonical form: equal states must also be byte-identical on the wire.
    assert _snapshot(ab) == _snapshot(ba)
    assert (_snapshot(a), _snapshot(b)) == before


@by_spec
@LAW_SETTINGS
@given(data=st.data())
def test_merge_is_associative(spec: Spec, data: st.DataObject) -> None:
    a, b, c = (data.draw(states(spec)) for _ in range(3))

    left = merge(merge(a, b), c)
    right = merge(a, merge(b, c))

    assert left == right
    assert spec.observe(left) == spec.observe(right)
    assert _snapshot(left) == _snapshot(right)


@by_spec
@LAW_SETTINGS
@given(data=st.data())
def test_merge_is_idempotent(spec: Spec, data: st.DataObject) -> None:
    a = data.draw(states(spec))

    assert merge(a, a) == a
    assert _snapshot(merge(a, a)) == _snapshot(a)


@by_spec
@SIM_SETTINGS
@given(data=st.data())
def test_replicas_converge_under_random_gossip(spec: Spec, data: st.DataObject) -> None:
    replica_ids = st.integers(0, len(REPLICAS) - 1)
    steps = data.draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("op"), replica_ids, spec.payloads),
                st.tuples(st.just("gossip"), replica_ids, replica_ids),
            ),
            max_size=40,
        )
    )
    replicas = [spec.empty for _ in REPLICAS]
    seen: list[History] = [frozenset() for _ in REPLICAS]
    seqs = [0 for _ in REPLICAS]

    for step in steps:
        if step[0] == "op":
            _, i, payload = step
            name, tag = REPLICAS[i], f"{REPLICAS[i]}:{seqs[i]}"
            seqs[i] += 1
            replicas[i] = spec.apply(replicas[i], name, tag, payload)
            seen[i] = seen[i] | {spec.event(payload, name, tag, seen[i])}
        else:
            _, src, dst = step
            replicas[dst] = merge(replicas[dst], replicas[src])
            seen[dst] = seen[dst] | seen[src]
        for state, history in zip(replicas, seen, strict=True):
            assert spec.observe(state) == spec.expected(history)

    # Final full exchange: pull everything into r0, then push it back out.
    for i in range(1, len(REPLICAS)):
        replicas[0] = merge(replicas[0], replicas[i])
    for i in range(1, len(REPLICAS)):
        replicas[i] = merge(replicas[i], replicas[0])

    assert all(state == replicas[0] for state in replicas)
    everything: History = frozenset().union(*seen)
    assert spec.observe(replicas[0]) == spec.expected(everything)


# JSON only for the specs whose states it can carry (`json_roundtrips`); the one it cannot has
# its own test below, which states the limitation instead of skipping it.
CODEC_CASES = [
    pytest.param(spec, codec, id=f"{spec.name}-{name}")
    for spec in SPECS
    for name, codec in (("msgpack", msgspec.msgpack), ("json", msgspec.json))
    if codec is msgspec.msgpack or spec.json_roundtrips
]


@pytest.mark.parametrize(("spec", "codec"), CODEC_CASES)
@LAW_SETTINGS
@given(data=st.data())
def test_msgspec_roundtrip(spec: Spec, codec: Any, data: st.DataObject) -> None:
    state = data.draw(states(spec))

    decoded = codec.decode(codec.encode(state), type=spec.decode_type)

    assert decoded == state
    assert spec.observe(decoded) == spec.observe(state)


def test_a_mixed_key_orset_cannot_roundtrip_through_json_but_does_through_msgpack() -> None:
    """The limitation `json_roundtrips=False` declares: JSON object keys are strings, so an
    ORSet holding both 1 and "1" decodes with its elements merged or mistyped."""
    state = ORSet[str | int]().add(1, "a:0").add("1", "b:0")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=ORSet[str | int]) == state
    try:
        decoded = msgspec.json.decode(msgspec.json.encode(state), type=ORSet[str | int])
    except msgspec.ValidationError:
        return  # refused outright: also not a round trip
    assert decoded != state


def test_orset_concurrent_add_beats_remove() -> None:
    a = ORSet[str]().add("x", "a:0")
    b = merge(ORSet[str](), a).remove("x")
    a = a.add("x", "a:1")  # concurrent with b's remove, which never saw it

    assert "x" not in b
    assert merge(a, b).value == merge(b, a).value == {"x"}
    # Once the remove has seen every add, the element really is gone.
    assert "x" not in merge(a, b).remove("x")


def test_ormap_update_concurrent_with_remove_keeps_key_and_counts() -> None:
    def bump(c: PNCounter, replica: str, n: int) -> PNCounter:
        return c.increment(replica, n)

    a = ORMap[PNCounter]().update("k", "a:0", lambda c: bump(c, "a", 2), PNCounter())
    b = merge(ORMap[PNCounter](), a).remove("k")
    a = a.update("k", "a:1", lambda c: bump(c, "a", 3), PNCounter())

    assert b.get("k") is None
    merged = merge(b, a)
    counter = merged.get("k")
    assert counter is not None and counter.value == 5

    # A key removed everywhere and re-added resumes from its retained state
    # rather than losing increments to max() against older copies.
    gone = merged.remove("k")
    back = gone.update("k", "b:0", lambda c: bump(c, "a", 1), PNCounter())
    assert "k" not in gone
    assert back.value["k"].value == 6


def test_lww_register_orders_by_stamp_then_replica() -> None:
    r = LWWRegister[str]().set("late", 10, "a").set("early", 5, "z")
    assert r.value == "late"
    assert r.set("tie", 10, "b").value == "tie"
    assert LWWRegister[str]().value is None


def test_gcounter_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="only grow"):
        GCounter().increment("a", -1)
    assert GCounter().increment("a", 0) == GCounter()


def test_merge_rejects_mismatched_types() -> None:
    with pytest.raises(TypeError, match="cannot merge GCounter with PNCounter"):
        merge(GCounter(), PNCounter())
    with pytest.raises(TypeError, match="expects an accord CRDT"):
        merge(1, 2)  # type: ignore[type-var]
