"""State-based CRDTs for replicating accord state without coordination.

Every type is a frozen msgspec Struct, so it travels as msgpack or JSON, and
``merge`` is a join: replicas may exchange states in any order, any number of
times, and still converge on the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Generic, Protocol, Self, TypeVar

import msgspec

__all__ = [
    "GCounter",
    "GSet",
    "LWWRegister",
    "Mergeable",
    "ORMap",
    "ORSet",
    "PNCounter",
    "merge",
]

T = TypeVar("T", bound="str | int")
V = TypeVar("V")
C = TypeVar("C", bound="Mergeable")
M = TypeVar("M", bound="Mergeable")

# Validated on decode so a corrupt peer can't smuggle in a count that would
# make max() a non-inflation.
_Count = Annotated[int, msgspec.Meta(ge=0)]


class Mergeable(Protocol):
    """Anything with a join; the bound for values nested in an :class:`ORMap`."""

    def merge(self, other: Self, /) -> Self: ...


def _elem_order(elem: str | int) -> tuple[int, int, str]:
    # Python refuses to order str against int, yet a mixed set still needs one
    # canonical order so equal states encode to identical bytes.
    if isinstance(elem, str):
        return (1, 0, elem)
    return (0, elem, "")


def _sorted_elems(elems: Iterable[T]) -> tuple[T, ...]:
    return tuple(sorted(set(elems), key=_elem_order))


def _canonical_counts(counts: dict[str, int]) -> dict[str, int]:
    # Zero entries carry no information; dropping them keeps "never touched"
    # and "touched by nothing" equal as structs.
    return {replica: n for replica, n in sorted(counts.items()) if n}


class GCounter(msgspec.Struct, frozen=True):
    """Grow-only counter: one monotonic count per replica, summed for the value.

    Only *replica* itself may increment its own entry; that single-writer rule
    is what lets merge take the per-replica maximum.
    """

    counts: dict[str, _Count] = msgspec.field(default_factory=dict)

    @property
    def value(self) -> int:
        return sum(self.counts.values())

    def increment(self, replica: str, n: int = 1) -> GCounter:
        if n < 0:
            raise ValueError(f"GCounter can only grow, got n={n}")
        if n == 0:
            return self
        counts = dict(self.counts)
        counts[replica] = counts.get(replica, 0) + n
        return GCounter(counts=_canonical_counts(counts))

    def merge(self, other: GCounter) -> GCounter:
        counts = dict(self.counts)
        for replica, n in other.counts.items():
            counts[replica] = max(n, counts.get(replica, 0))
        return GCounter(counts=_canonical_counts(counts))


class PNCounter(msgspec.Struct, frozen=True):
    """Counter that can also decrement.

    A per-replica count that may go down can't be joined with max, so the
    increments and decrements are kept as two grow-only counters instead.
    """

    increments: GCounter = msgspec.field(default_factory=GCounter)
    decrements: GCounter = msgspec.field(default_factory=GCounter)

    @property
    def value(self) -> int:
        return self.increments.value - self.decrements.value

    def increment(self, replica: str, n: int = 1) -> PNCounter:
        if n < 0:
            return self.decrement(replica, -n)
        return PNCounter(self.increments.increment(replica, n), self.decrements)

    def decrement(self, replica: str, n: int = 1) -> PNCounter:
        if n < 0:
            return self.increment(replica, -n)
        return PNCounter(self.increments, self.decrements.increment(replica, n))

    def merge(self, other: PNCounter) -> PNCounter:
        return PNCounter(
            self.increments.merge(other.increments),
            self.decrements.merge(other.decrements),
        )


class GSet(msgspec.Struct, Generic[T], frozen=True):
    """Grow-only set of str/int elements, kept sorted for deterministic encoding."""

    items: tuple[T, ...] = ()

    @property
    def value(self) -> frozenset[T]:
        return frozenset(self.items)

    def __contains__(self, elem: object) -> bool:
        return elem in self.items

    def add(self, elem: T) -> GSet[T]:
        if elem in self.items:
            return self
        return GSet(items=_sorted_elems((*self.items, elem)))

    def merge(self, other: GSet[T]) -> GSet[T]:
        return GSet(items=_sorted_elems((*self.items, *other.items)))


class ORSet(msgspec.Struct, Generic[T], frozen=True):
    """Add-wins observed-remove set.

    Each add carries a caller-supplied tag that must be globally unique, for
    example ``f"{replica}:{counter}"``. A remove retires only the tags it has
    seen, so an add concurrent with a remove survives the merge. Retired tags
    stay forever as tombstones: pruning them safely needs causal stability,
    which this layer doesn't track.

    JSON object keys are always strings, so a set mixing str and int elements
    only round-trips through msgpack.
    """

    entries: dict[T, tuple[str, ...]] = msgspec.field(default_factory=dict)
    tombstones: tuple[str, ...] = ()

    @property
    def value(self) -> frozenset[T]:
        return frozenset(elem for elem, tags in self.entries.items() if tags)

    def __contains__(self, elem: object) -> bool:
        return bool(self.entries.get(elem))  # type: ignore[call-overload]

    def add(self, elem: T, tag: str) -> ORSet[T]:
        # Expressing mutations as a join with a one-op delta keeps them
        # monotone and canonical for free.
        return self.merge(ORSet(entries={elem: (tag,)}))

    def remove(self, elem: T) -> ORSet[T]:
        observed = self.entries.get(elem)
        if not observed:
            return self
        return self.merge(ORSet(tombstones=observed))

    def merge(self, other: ORSet[T]) -> ORSet[T]:
        tombstones = set(self.tombstones).union(other.tombstones)
        tagged: dict[T, set[str]] = {}
        for entries in (self.entries, other.entries):
            for elem, tags in entries.items():
                tagged.setdefault(elem, set()).update(tags)
        live: dict[T, tuple[str, ...]] = {}
        for elem in sorted(tagged, key=_elem_order):
            alive = tagged[elem] - tombstones
            if alive:
                live[elem] = tuple(sorted(alive))
        return ORSet(entries=live, tombstones=tuple(sorted(tombstones)))


class LWWRegister(msgspec.Struct, Generic[V], frozen=True):
    """Last-writer-wins register.

    Writes are ordered by ``(timestamp, replica)``: the timestamp is an HLC or
    wall-clock reading and the replica id settles clock collisions between
    replicas. An unset register (``stamp is None``) loses to any write.
    """

    value: V | None = None
    stamp: tuple[int, str] | None = None

    def set(self, value: V, timestamp: int, replica: str) -> LWWRegister[V]:
        # A write stamped older than what we hold must lose exactly as it
        # would in a merge, or local and remote outcomes could differ.
        return self.merge(LWWRegister(value=value, stamp=(timestamp, replica)))

    def merge(self, other: LWWRegister[V]) -> LWWRegister[V]:
        if other.stamp is None:
            return self
        if self.stamp is None or other.stamp > self.stamp:
            return other
        if other.stamp == self.stamp and _encode(other.value) > _encode(self.value):
            # Equal stamps mean a replica reused a clock reading. Ordering on
            # the encoded value keeps merge commutative instead of letting
            # each side keep its own write.
            return other
        return self


_encode = msgspec.msgpack.encode


class ORMap(msgspec.Struct, Generic[C], frozen=True):
    """Map from str keys to nested CRDTs of a single kind.

    Key presence is an add-wins :class:`ORSet`, so an update concurrent with a
    remove keeps the key. Removing only hides a key: its nested state is kept
    and still merged, since a replica restarting the entry from empty would
    have its fresh increments swallowed by the max() against older copies.
    A key that comes back therefore resumes from the retained state.
    """

    keys: ORSet[str] = msgspec.field(default_factory=ORSet)
    entries: dict[str, C] = msgspec.field(default_factory=dict)

    @property
    def value(self) -> dict[str, C]:
        """The nested CRDTs of the keys currently present."""
        return {key: crdt for key, crdt in self.entries.items() if key in self.keys}

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def get(self, key: str) -> C | None:
        return self.entries.get(key) if key in self.keys else None

    def update(self, key: str, tag: str, fn: Callable[[C], C], default: C) -> ORMap[C]:
        """Apply *fn* to *key*'s retained state (or *default*) and mark it present.

        *tag* must be globally unique, as for :meth:`ORSet.add`.
        """
        current = self.entries.get(key, default)
        entries = dict(self.entries)
        # Joining with the current state stops a careless fn from rolling the
        # entry back, which merge would otherwise silently undo.
        entries[key] = current.merge(fn(current))
        return ORMap(keys=self.keys.add(key, tag), entries=dict(sorted(entries.items())))

    def remove(self, key: str) -> ORMap[C]:
        return ORMap(keys=self.keys.remove(key), entries=dict(self.entries))

    def merge(self, other: ORMap[C]) -> ORMap[C]:
        entries: dict[str, C] = {}
        for key in sorted(self.entries.keys() | other.entries.keys()):
            if key not in other.entries:
                entries[key] = self.entries[key]
            elif key not in self.entries:
                entries[key] = other.entries[key]
            else:
                entries[key] = self.entries[key].merge(other.entries[key])
        return ORMap(keys=self.keys.merge(other.keys), entries=entries)


_CRDT_TYPES = (GCounter, PNCounter, GSet, ORSet, LWWRegister, ORMap)


def merge(a: M, b: M) -> M:
    """Join two replicas of the same CRDT, refusing mismatched kinds."""
    # Checked on the class so mypy keeps *a* typed as M rather than narrowing.
    if not issubclass(type(a), _CRDT_TYPES):
        raise TypeError(f"merge() expects an accord CRDT, got {type(a).__name__}")
    if type(a) is not type(b):
        raise TypeError(
            f"cannot merge {type(a).__name__} with {type(b).__name__}: "
            "both replicas must be the same CRDT type"
        )
    return a.merge(b)
