"""A heartbeat failure detector with an injected clock, so tests can drive time without sleeping.

It only judges; `_membership.py` feeds it heartbeats from the members bucket and records the
transitions it returns. Suspects still count as live for placement (no churn on one late beat);
only the dead and the departed are taken out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec


class State(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class Transition(msgspec.Struct, frozen=True):
    """One change of one member's state as seen by `observer`. `at` is the observer's wall time."""

    observer: str
    node: str
    old: str
    new: str
    reason: str
    at: float


class _Member:
    __slots__ = ("incarnation", "last_seen", "leaving", "state")

    def __init__(self, now: float, incarnation: str) -> None:
        self.last_seen = now
        self.state = State.ALIVE
        self.incarnation = incarnation
        self.leaving = False


class FailureDetector:
    def __init__(
        self,
        observer: str,
        *,
        suspect_after: float,
        dead_after: float,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        if not 0 < suspect_after < dead_after:
            raise ValueError("need 0 < suspect_after < dead_after")
        self.observer = observer
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self._clock = clock
        self._wall = wall
        self._members: dict[str, _Member] = {}

    def _move(self, node: str, m: _Member, new: State, reason: str) -> Transition:
        t = Transition(self.observer, node, m.state.value, new.value, reason, self._wall())
        m.state = new
        return t

    def heartbeat(self, node: str, incarnation: str, leaving: bool = False) -> list[Transition]:
        now = self._clock()
        m = self._members.get(node)
        if m is None or (m.state in (State.DEAD, State.LEFT) and m.incarnation != incarnation):
            fresh = _Member(now, incarnation)
            fresh.leaving = leaving
            old = m.state.value if m else "unknown"
            self._members[node] = fresh
            return [Transition(self.observer, node, old, "alive", "joined", self._wall())]
        if m.state is State.LEFT:
            return []  # a late beat of a departed incarnation
        m.last_seen = now
        m.leaving = leaving
        if m.state is State.SUSPECT:
            return [self._move(node, m, State.ALIVE, "heartbeat resumed")]
        if m.state is State.DEAD:
            # A paused process (SIGSTOP, GC, partition) came back. Its leases are long gone and
            # it fenced itself, so it may simply rejoin placement.
            return [self._move(node, m, State.ALIVE, "heartbeat resumed after death")]
        return []

    def departed(self, node: str, reason: str) -> list[Transition]:
        m = self._members.get(node)
        if m is None or m.state in (State.DEAD, State.LEFT):
            return []
        return [self._move(node, m, State.LEFT, reason)]

    def tick(self) -> list[Transition]:
        now = self._clock()
        out: list[Transition] = []
        for node, m in self._members.items():
            if node == self.observer:
                continue  # we know we are alive; our own silence means our watch is broken
            silent = now - m.last_seen
            if m.state is State.ALIVE and silent > self.suspect_after:
                out.append(self._move(node, m, State.SUSPECT, f"no heartbeat for {silent:.2f}s"))
            if m.state is State.SUSPECT and silent > self.dead_after:
                out.append(self._move(node, m, State.DEAD, f"no heartbeat for {silent:.2f}s"))
        return out

    def state(self, node: str) -> State | None:
        m = self._members.get(node)
        return m.state if m else None

    def live(self) -> list[str]:
        """Members eligible to own shards: alive or suspect, and not leaving."""
        return sorted(
            n
            for n, m in self._members.items()
            if m.state in (State.ALIVE, State.SUSPECT) and not m.leaving
        )

    def members(self) -> dict[str, State]:
        return {n: m.state for n, m in self._members.items()}
