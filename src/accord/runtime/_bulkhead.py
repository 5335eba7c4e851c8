"""Bulkheads: how many messages a node (and each agent type on it) has accepted and not yet
started, and the backpressure that keeps it under its limits.

Asks over the limit get `Overloaded` (not processed); mailbox consumers wait for capacity before
pulling more. Activations update the counts in place (`InFlight.n`) on the hot path.
"""

from __future__ import annotations

import asyncio

from .._errors import Overloaded
from .._observe import Observers
from ._settings import NodeSettings, Stats


class InFlight:
    """A bulkhead's count: messages accepted and not yet started, per agent type or per node.

    `waiting` (node-wide count only): a mailbox consumer waits for the count to drop; whoever
    lowers it then calls `Bulkhead.freed`.
    """

    __slots__ = ("n", "waiting")

    def __init__(self) -> None:
        self.n = 0
        self.waiting = False


class Bulkhead:
    def __init__(
        self,
        settings: NodeSettings,
        stats: Stats,
        node_name: str,
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        self.max_total = settings.max_inflight
        self.max_per_type = settings.max_inflight_per_type
        self.total = InFlight()  # node-wide
        self._per_type: dict[str, InFlight] = {}
        self._stats = stats
        self._node = node_name
        self._capacity = asyncio.Event()

    def load(self, agent_type: str) -> InFlight:
        """The count of `agent_type` (activations update it in place)."""
        load = self._per_type.get(agent_type)
        if load is None:
            load = self._per_type[agent_type] = InFlight()
        return load

    def add(self, agent_type: str, n: int) -> None:
        self.load(agent_type).n += n
        self.total.n += n
        if n < 0 and self.total.waiting:
            self.freed()

    def freed(self) -> None:
        """The node-wide count dropped while a mailbox consumer waits: wake it below the limit."""
        if self.total.n < self.max_total:
            self.total.waiting = False
            self._capacity.set()

    def check(self, agent_type: str) -> None:
        """Raise `Overloaded` unless one more message of `agent_type` fits."""
        load = self._per_type.get(agent_type)
        per_type = 0 if load is None else load.n
        if self.total.n < self.max_total and per_type < self.max_per_type:
            return
        self._stats.overloaded += 1
        if self._observe.active:
            self._observe.bulkhead_rejected(agent_type)
        if self.total.n >= self.max_total:
            raise Overloaded(f"node {self._node} has {self.total.n} messages in flight")
        raise Overloaded(f"agent type {agent_type!r} has too many messages in flight")

    async def wait_capacity(self) -> None:
        """Return once the node-wide count is below its limit."""
        while self.total.n >= self.max_total:
            self._capacity.clear()
            self.total.waiting = True
            await self._capacity.wait()
