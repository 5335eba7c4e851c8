"""A hybrid logical clock: timestamps that follow wall time but never go backwards and order
causally related events, used for last-writer-wins merges of split-brain state.

A timestamp is one int: milliseconds since the epoch << 16 | a 16-bit logical counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class HybridClock:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._last = 0

    def now(self) -> int:
        physical = int(self._wall() * 1000) << 16
        self._last = max(physical, self._last + 1)
        return self._last

    def observe(self, remote: int) -> None:
        """Move past a timestamp seen from another node."""
        self._last = max(self._last, remote)
