"""The live figures of a node's status reply (`stats`: rates, p99 turn time, loop lag, per-type
activations and backlog), kept by an observer on the node's seam (`_observe.py`) and a sampler
that snapshots the turn counts once a second; `accord top` and the dashboard read them."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .._observe import Kind, Observer, Outcome
from ._bulkhead import Bulkhead
from ._settings import Stats

WINDOW = 10.0
"""Seconds over which `msgs_per_s` is averaged."""
RECENT_TURNS = 1024
"""Turns whose durations `p99_turn_ms` is computed from."""


class Rates(Observer):
    """Turn counts per type, recent turn durations, live activations per type, dead letters."""

    def __init__(
        self,
        agent_types: Iterable[str],
        bulkhead: Bulkhead,
        stats: Stats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._bulkhead = bulkhead
        self._stats = stats
        self.turns: dict[str, int] = dict.fromkeys(agent_types, 0)
        self.activations: dict[str, int] = dict.fromkeys(self.turns, 0)
        self._durations: deque[float] = deque(maxlen=RECENT_TURNS)
        self.dlq = 0
        # (time, turns per type) once a second, oldest first, covering WINDOW seconds.
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=int(WINDOW) + 1)
        self._samples.append((clock(), dict(self.turns)))

    # -- the seam ------------------------------------------------------------------------------

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        self.turns[agent_type] = self.turns.get(agent_type, 0) + 1
        self._durations.append(seconds)

    def activations_changed(self, agent_type: str, delta: int) -> None:
        self.activations[agent_type] = self.activations.get(agent_type, 0) + delta

    def dead_lettered(self, agent_type: str) -> None:
        self.dlq += 1

    # -- sampling ------------------------------------------------------------------------------

    def sample(self) -> None:
        self._samples.append((self._clock(), dict(self.turns)))

    async def run(self, interval: float = 1.0) -> None:
        """Forever: snapshot the counts every `interval` seconds (cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            self.sample()

    def snapshot(self) -> dict[str, Any]:
        """The `stats` block of `Node.status()` (shape in docs/operations.md)."""
        now = self._clock()
        then, old = self._samples[0]
        span = max(now - then, 1e-3)
        per_type = {
            t: {
                "activations": self.activations.get(t, 0),
                "msgs_per_s": round((n - old.get(t, 0)) / span, 2),
                "mailbox_pending": self._bulkhead.load(t).n,
            }
            for t, n in sorted(self.turns.items())
        }
        recent = sorted(self._durations)
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))] * 1000 if recent else None
        return {
            "msgs_per_s": round(sum(v["msgs_per_s"] for v in per_type.values()), 2),
            "p99_turn_ms": None if p99 is None else round(p99, 3),
            "loop_lag_ms": round(self._stats.loop_lag_last * 1000, 3),
            "activations": sum(self.activations.values()),
            "per_type": per_type,
            "dlq": self.dlq,
        }
