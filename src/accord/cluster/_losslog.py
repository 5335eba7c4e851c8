"""Lost shard leases, logged as one line per loss event: when a node's renewals stop, the leases
of all its shards expire within milliseconds of each other, and that is one event to an operator,
not one warning per shard."""

from __future__ import annotations

import logging

from .._clock import Clock, TimerHandle

LOSS_GATHER = 0.2
"""Seconds lease losses are gathered before they are logged: the leases of one node expire
within milliseconds of each other when its renewals stop, and that is one event."""


class LossLog:
    """Lost leases, logged as one WARNING line per loss event and reason (`lost leases of
    shards 3, 7, 12 (epochs 41, 44, 52): lease not renewed in time`), never one per shard."""

    def __init__(self, clock: Clock, logger: logging.Logger) -> None:
        self._clock = clock
        self._log = logger
        self._pending: dict[str, list[tuple[int, int]]] = {}
        self._timer: TimerHandle | None = None

    def add(self, shard: int, epoch: int, why: str) -> None:
        self._pending.setdefault(why, []).append((shard, epoch))
        if self._timer is None:
            self._timer = self._clock.call_at(self._clock.now() + LOSS_GATHER, self.flush)

    def flush(self) -> None:
        """Log what was gathered now (also called when the node stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for why, lost in pending.items():
            lost.sort()
            shards = ", ".join(str(s) for s, _ in lost)
            epochs = ", ".join(str(e) for _, e in lost)
            if len(lost) == 1:
                self._log.warning("lost the lease of shard %s (epoch %s): %s", shards, epochs, why)
            else:
                self._log.warning("lost leases of shards %s (epochs %s): %s", shards, epochs, why)
