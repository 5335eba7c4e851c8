"""Capped exponential backoff with jitter, the one retry pacing of accord.

The random source is injected (`rng`), so a test can make the delays repeatable; by default each
`Backoff` has its own `random.Random`, never the module-level generator.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays `start, 2·start, 4·start, …` capped at `cap`, each scaled by a jitter factor.

    `jitter="equal"` draws the factor from [0.5, 1.5) (the delay stays near the schedule);
    `"full"` from [0, 1) (AWS's full jitter, for many competing retriers).
    """

    __slots__ = ("_cap", "_next", "_rng", "_start", "full")

    def __init__(
        self,
        start: float,
        cap: float,
        *,
        full: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        if start <= 0 or cap < start:
            raise ValueError(f"backoff needs 0 < start <= cap, got {start}, {cap}")
        self._start = start
        self._cap = cap
        self._next = start
        self.full = full
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The next delay (seconds); the one after is twice as long, up to the cap."""
        base = self._next
        self._next = min(self._next * 2, self._cap)
        factor = self._rng.random() if self.full else 0.5 + self._rng.random()
        return base * factor

    def reset(self) -> None:
        self._next = self._start

    def delay_for(self, attempt: int) -> float:
        """The delay of the `attempt`-th retry (1-based) without advancing: for callers that
        count attempts themselves (redeliveries)."""
        base = min(self._cap, self._start * 2.0 ** max(0, attempt - 1))
        factor = self._rng.random() if self.full else 0.5 + self._rng.random()
        return base * factor
