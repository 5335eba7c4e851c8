"""Serving without holding a shard, for agent types whose failover strategy allows it.

Cut off (`split_brain_allowed`, `degraded`): renewals stopped getting through, so the node keeps
answering from memory (degraded: reads only) until the partition heals and another node serves
the shard. Standby (`split_brain_allowed`): asks for a shard whose owner's process vanished are
served here before its lease runs out. Either way, once the shard has an owner again, what the
activations changed is sent to it and merged (`merge_turn`), and every merge is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import msgspec

from .._agent import Agent
from .._background import Background
from .._ids import AgentId
from ..cluster._config import ENGINE_FAILURES, Names
from ..cluster._shards import ShardManager
from ..engine._api import Engine, Subscription
from ..state._store import MergeState
from ._activation import Activation
from ._settings import Stats
from ._table import ActivationTable
from ._work import Work

log = logging.getLogger("accord.node")

#: How the merge of a cut-off activation reaches the shard's owner (an at-least-once tell).
SendMerge = Callable[[AgentId, MergeState, str], Awaitable[None]]

#: How often, one second apart, a merge or its event is tried before it is given up (logged).
ATTEMPTS = 30


class CutOff:
    def __init__(
        self,
        node: str,
        names: Names,
        shards: ShardManager,
        table: ActivationTable,
        engine: Engine,
        send_merge: SendMerge,
        stats: Stats,
        sends: Background,
    ) -> None:
        self._node = node
        self._names = names
        self._shards = shards
        self._table = table
        self._engine = engine
        self._send_merge_msg = send_merge
        self._stats = stats
        self._sends = sends
        self._orphans: dict[int, tuple[Subscription, int]] = {}  # cut-off shards still served
        self._standby: dict[int, int] = {}  # shards served for a vanished owner -> its epoch

    def orphan_epoch(self, shard: int) -> int | None:
        """The epoch under which this node serves `shard` without holding it (cut off from the
        majority, or standing in for a vanished owner), else None."""
        cut_off = self._orphans.get(shard)
        return cut_off[1] if cut_off is not None else self._standby.get(shard)

    def cut_off_epoch(self, shard: int) -> int | None:
        """The epoch of a cut-off shard this node may still answer for; None when it is not cut
        off, or another node serves it by now (where a message may also have arrived: answering
        too would apply it twice)."""
        cut_off = self._orphans.get(shard)
        if cut_off is None or self._superseded(shard, cut_off[1]):
            return None
        return cut_off[1]

    def begin_orphan(self, shard: int, sub: Subscription, epoch: int, types: list[str]) -> None:
        """Keep `sub` answering for the tolerant agent types of `shard` (renewals failed)."""
        self._orphans[shard] = (sub, epoch)
        for act in self._table.in_shard(shard):
            if act.spec.options.failover != "absolute":
                act.make_orphan()
        log.warning("shard %d epoch %d: cut off; serving %s from memory", shard, epoch,
                    ", ".join(sorted(types)))  # fmt: skip

    def standby_epoch(self, shard: int) -> int:
        """Begin (or continue) serving `shard`'s split-brain agents for its vanished owner."""
        epoch = self._standby.get(shard)
        if epoch is None:
            owner = self._shards.table.get(shard)
            epoch = owner.epoch if owner is not None else self._shards.previous_epoch.get(shard, 0)
            self._standby[shard] = epoch
            log.warning("shard %d: no owner answers; serving its split-brain agents here "
                        "(owner epoch %d) until it has one again", shard, epoch)  # fmt: skip
        return epoch

    async def acquired(self, shard: int) -> None:
        """`shard` is ours now: whatever was served without it merges into the new epoch."""
        if shard in self._orphans:  # healed and it came back here: merge, then serve anew
            await self._end_orphan(shard)
        if shard in self._standby:  # served for its vanished owner meanwhile: merge, then own
            self._end_standby(shard)

    async def watch(self) -> None:
        """Forever: end cut-off serving once the partition healed and another node owns the
        shard, and standby serving once the shard has an owner again."""
        while True:
            await asyncio.sleep(0.25)
            for shard, (_, epoch) in list(self._orphans.items()):
                if self._superseded(shard, epoch):
                    await self._end_orphan(shard)
            for shard, epoch in list(self._standby.items()):
                if self._superseded(shard, epoch):
                    self._end_standby(shard)

    def _superseded(self, shard: int, epoch: int) -> bool:
        """Does the lease table show another node serving `shard` under a newer epoch?"""
        owner = self._shards.table.get(shard)
        return owner is not None and owner.node != self._node and owner.epoch > epoch

    def _end_standby(self, shard: int) -> None:
        if self._standby.pop(shard, None) is None:
            return
        acts = self._table.in_shard(shard, lambda a: a.orphan)
        self._merge_back(acts)
        log.warning("shard %d has an owner again; %d standby activation(s) merged into it",
                    shard, len(acts))  # fmt: skip

    async def _end_orphan(self, shard: int) -> None:
        cut_off = self._orphans.pop(shard, None)
        if cut_off is None:
            return  # ended meanwhile (re-acquired here while the heal watch was at it)
        sub, epoch = cut_off
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        acts = self._table.in_shard(shard, lambda a: a.orphan)
        self._merge_back(acts)
        log.warning("shard %d epoch %d: partition healed; %d cut-off activation(s) merged back",
                    shard, epoch, len(acts))  # fmt: skip

    def _merge_back(self, acts: list[Activation]) -> None:
        """Close orphan activations; each sends its changes to the owner once its turns end."""
        for act in acts:
            act.merge_to = functools.partial(self._merge_to_owner, act.id)
            act.close()

    def _merge_to_owner(self, agent_id: AgentId, payload: MergeState) -> None:
        self._sends.spawn(self._send_merge(agent_id, payload), name=f"accord-merge-{agent_id}")

    async def _send_merge(self, agent_id: AgentId, payload: MergeState) -> None:
        msg_id = f"merge:{self._node}:{payload.epoch}:{payload.hlc}:{agent_id}"
        send = functools.partial(self._send_merge_msg, agent_id, payload, msg_id)
        await _retrying(f"merge of {agent_id}", send)

    def record(self, agent_id: AgentId, incoming: MergeState, outcome: str) -> None:
        """The owner folded a split-brain peer's state in: log it and append it to the events."""
        event = {"agent": str(agent_id), "from_node": incoming.node, "from_epoch": incoming.epoch,
                 "hlc": incoming.hlc, "outcome": outcome, "by": self._node}  # fmt: skip
        log.info("merged split-brain state of %s from %s: %s", agent_id, incoming.node, outcome)
        self._stats.merges += 1
        # Stored, not just published: right after a heal the events stream may have no leader
        # for a few seconds, and a merge is recorded once (the id dedups a repeated turn's).
        msg_id = (f"merge-event:{self._node}:{incoming.node}:{incoming.epoch}:{incoming.hlc}:"
                  f"{agent_id}")  # fmt: skip
        append = functools.partial(self._engine.append, self._names.events_subject("merge"),
                                   msgspec.json.encode(event), msg_id=msg_id)  # fmt: skip
        self._sends.spawn(_retrying(f"merge event of {agent_id}", append),
                          name=f"accord-merge-event-{agent_id}")  # fmt: skip


async def _retrying(what: str, attempt: Callable[[], Awaitable[object]]) -> None:
    """`attempt` until the engine confirms it, one second apart, `ATTEMPTS` times at most."""
    for n in range(ATTEMPTS):
        try:
            await attempt()
            return
        except ENGINE_FAILURES as exc:
            if n == ATTEMPTS - 1:
                log.error("%s given up after %d attempts: %s", what, ATTEMPTS, exc)
                return
            log.warning("%s not stored yet: %s", what, exc)
            await asyncio.sleep(1.0)


async def merge_turn(act: Activation, agent: Agent, work: Work) -> None:
    """The turn of a `MergeState`: fold in the state a cut-off node kept serving."""
    outcome = "ours"
    if act.durable is not None:
        outcome = act.durable.apply_merge(agent, work.msg)
        # CRDT merges are a new write here; an adopted peer state keeps its own write's time.
        await act.durable.commit(agent, stamp=outcome != "theirs")
    if work.delivery is not None:
        await work.delivery.ack()
    act.host.merged(act.id, work.msg, outcome)
