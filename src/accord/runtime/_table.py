"""The activation table: which agents are active on this node, by id and by shard, and the ones
still deactivating (a new activation of the same id waits for the old one to finish). One
abandoned after a turn timeout is replaced at once: its stuck handler is not waited for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from .._ids import AgentId
from .._spec import AgentSpec
from ._activation import Activation
from ._host import ActivationRef, Host
from ._settings import Stats


class ActivationTable:
    def __init__(self, host: Host, stats: Stats) -> None:
        self._host = host
        self._stats = stats
        self.live: dict[AgentId, Activation] = {}  # read on the hot path
        self._by_shard: dict[int, dict[AgentId, Activation]] = {}
        self._deactivating: dict[AgentId, asyncio.Task[None]] = {}
        self._stuck: set[asyncio.Task[Any]] = set()  # handlers of abandoned turns still running

    def get_or_create(
        self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int, orphan: bool = False
    ) -> Activation:
        """The live activation of `agent_id` for `epoch`, or a new one (which first waits for a
        previous activation of the same agent to finish deactivating)."""
        act = self.live.get(agent_id)
        if act is not None and act.epoch == epoch and not act.closing:
            return act
        previous = act.task if act is not None else self._deactivating.get(agent_id)
        act = Activation(self._host, agent_id, spec, shard, epoch, previous)
        if self._host.observe.active and agent_id not in self.live:
            self._host.observe.activations_changed(spec.type_name, 1)
        if orphan:
            act.make_orphan()
        self.live[agent_id] = act
        self._by_shard.setdefault(shard, {})[agent_id] = act
        return act

    def ended(self, ref: ActivationRef) -> None:
        agent_id = ref.id
        if self.live.get(agent_id) is ref:
            del self.live[agent_id]
            if self._host.observe.active:
                self._host.observe.activations_changed(agent_id.type, -1)
        by = self._by_shard.get(ref.shard)
        if by is not None and by.get(agent_id) is ref:
            del by[agent_id]
        task = ref.task
        self._deactivating[agent_id] = task
        task.add_done_callback(lambda t: self._forget(agent_id, t))
        self._stats.deactivations += 1

    def abandon(self, act: Activation, stuck: asyncio.Task[Any] | None, restart: bool) -> None:
        """`act` gave up after a turn timed out. With `restart`, a fresh activation of the same
        agent (same epoch) takes its place and its queue at once, without waiting for `act`'s
        task or the stuck handler; without, `act` just ends. The stuck handler is kept to be
        cancelled again at `cancel_stuck` (node stop)."""
        if stuck is not None and not stuck.done():
            self._stuck.add(stuck)
            stuck.add_done_callback(self._stuck.discard)
        if not restart or self.live.get(act.id) is not act:
            self.ended(act)
            return
        fresh = Activation(self._host, act.id, act.spec, act.shard, act.epoch, None)
        if act.orphan:
            fresh.make_orphan()
        fresh.merge_to = act.merge_to
        fresh.closing = act.closing
        fresh.queue.extend(act.queue)  # still counted by the bulkhead: same per-type counts
        act.queue.clear()
        self.live[act.id] = fresh
        self._by_shard.setdefault(act.shard, {})[act.id] = fresh
        self._stats.deactivations += 1

    def cancel_stuck(self) -> None:
        """Cancel the handlers of abandoned turns once more (node stop); not awaited: they may
        never finish (a blocked thread, an await that ignores cancellation)."""
        for task in list(self._stuck):
            task.cancel()

    def _forget(self, agent_id: AgentId, task: asyncio.Task[None]) -> None:
        if self._deactivating.get(agent_id) is task:
            del self._deactivating[agent_id]

    def in_shard(
        self, shard: int, where: Callable[[Activation], bool] | None = None
    ) -> list[Activation]:
        acts = list(self._by_shard.get(shard, {}).values())
        return acts if where is None else [a for a in acts if where(a)]

    def count(self) -> int:
        return len(self.live)

    def close_idle(self, now: float) -> None:
        """Deactivate every activation idle for longer than its type's `idle_timeout`."""
        for act in list(self.live.values()):
            if not act.busy and not act.queue and now - act.last_active >= act.spec.idle_timeout:
                act.close()

    async def sweep_idle(self, specs: Iterable[AgentSpec], loop: asyncio.AbstractEventLoop) -> None:
        """Forever: close idle activations, checking a few times per shortest idle timeout."""
        idle = min((s.idle_timeout for s in specs), default=60.0)
        while True:
            await asyncio.sleep(max(0.05, min(idle / 4, 1.0)))
            self.close_idle(loop.time())
