"""Serving agents placed by override (cluster/_overrides.py) on the node side: which epoch an
agent is served under here, relaying a message that reached the wrong node (the shard owner relays
to the agent's node, any other node relays to the shard owner), and holding an agent's messages
while it moves. The shard owner stays the entry point of its agents' durable mailbox: a stored
message for an agent placed elsewhere is relayed and acknowledged once that node has handled it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from .._background import Background
from .._ids import AgentId
from ..cluster._config import Names
from ..cluster._membership import Membership
from ..cluster._overrides import Overrides, Placed
from ..cluster._overrides import place_subject as _place_subject
from ..cluster._shards import ShardManager
from ..engine._api import Delivery, Engine, Message, NoResponders, RequestTimeout

log = logging.getLogger("accord.placement")

SERVE_HERE = 0  # not placed by override: the shard owner serves it as usual
HANDLED = -1  # relayed or held: nothing more to do with the message here
HOPS = "Accord-Hops"
DURABLE = "Accord-Relayed"  # a relayed mailbox message: reply "ack" or "nak" once handled
MAX_HOPS = 4  # two nodes' tables disagreeing for a moment; beyond, the message is dropped


def place_subject(names: Names, node: str, shard: int | str) -> str:
    return _place_subject(names.prefix, node, shard)


class NodePlacement:
    """This node's view of overrides and the agents it is moving; every inbound path asks
    `route` first. `valid(epoch)` is the per-agent fence of an agent placed here: the override
    at that revision still names this node, and this node's heartbeats were confirmed within
    the lease TTL (it stops serving before others may place the agent elsewhere)."""

    def __init__(
        self,
        me: str,
        names: Names,
        transport: Engine,
        overrides: Overrides,
        membership: Membership,
        shards: ShardManager,
        lease_ttl: int,
        sends: Background,
    ) -> None:
        self.me = me
        self._names = names
        self._transport = transport
        self.overrides = overrides
        self._members = membership
        self.shards = shards
        self.ttl = lease_ttl
        self._margin = max(0.25, 0.15 * lease_ttl)
        self._sends = sends
        self.by_id: dict[AgentId, Placed] = {}
        self._mine: dict[int, AgentId] = {}  # epochs of agents placed here
        self.released: set[int] = set()  # epochs given up here (a move is under way)
        self.moving: dict[AgentId, list[Callable[[], None]]] = {}  # held work, by agent
        self.on_moved_away: Callable[[AgentId, int], None] = lambda a, e: None
        self.redispatch: Callable[[int, Message, bool], None] = lambda s, m, p: None
        self.redispatch_durable: Callable[[int, int, Delivery], bool] = lambda s, e, d: True
        # A message for an agent type not hosted here: placed on a node that hosts it (True),
        # or False when no live node does (the caller answers `AgentTypeNotFound`).
        self.foreign: Callable[[int, Message | None, Delivery | None, int], bool] = (
            lambda s, m, d, e: False
        )
        # An agent placed on a node that is not live any more: place it anew (the message waits).
        self.host_gone: Callable[[AgentId], None] = lambda a: None
        overrides.on_change = self._changed

    # -- the table --------------------------------------------------------------------------

    def _changed(self, agent: str, placed: Placed | None) -> None:
        try:
            aid = AgentId.parse(agent)
        except Exception:
            return
        old = self.by_id.pop(aid, None)
        if old is not None and old.node == self.me:
            self._mine.pop(old.revision, None)
            if placed is None or placed.node != self.me:
                self.on_moved_away(aid, old.revision)
        if placed is not None:
            self.by_id[aid] = placed
            if placed.node == self.me:
                self._mine[placed.revision] = aid

    def healthy(self) -> bool:
        return time.monotonic() < self._members.confirmed + self.ttl - self._margin

    def valid(self, epoch: int) -> bool:
        return epoch in self._mine and epoch not in self.released and self.healthy()

    def placed_here(self, agent_id: AgentId) -> int | None:
        """The epoch of `agent_id` if it is placed on this node by override and served here."""
        p = self.by_id.get(agent_id)
        if p is None or p.node != self.me or not self.valid(p.revision):
            return None
        return p.revision

    def local_epoch(self, agent_id: AgentId, shard: int) -> int | None:
        """For the in-process route: the epoch to deliver `agent_id` under here, else None."""
        if not self.by_id and not self.moving:
            return self.shards.serving(shard)
        if agent_id in self.moving:
            return None
        p = self.by_id.get(agent_id)
        if p is None:
            return self.shards.serving(shard)
        return p.revision if p.node == self.me and self.valid(p.revision) else None

    def node_of(self, agent_id: AgentId) -> str | None:
        """For senders: the node an agent is placed on by override, when that node is live."""
        p = self.by_id.get(agent_id)
        if p is None or p.node == self.me:
            return None
        return p.node if p.node in self._members.infos else None

    def subject_for(self, agent_id: AgentId, shard: int) -> str | None:
        node = self.node_of(agent_id) if self.by_id else None
        return None if node is None else place_subject(self._names, node, shard)

    # -- inbound --------------------------------------------------------------------------------

    def route(self, shard: int, agent_id: AgentId, msg: Message, placed: bool) -> int:
        """Where a core message for `agent_id` goes: an override epoch to serve it under here,
        `SERVE_HERE` (the shard's own path), or `HANDLED` (relayed or held)."""
        if not self.by_id and not self.moving and not placed:
            return SERVE_HERE
        if agent_id in self.moving:
            self.moving[agent_id].append(lambda: self.redispatch(shard, msg, placed))
            return HANDLED
        p = self.by_id.get(agent_id)
        if p is None:
            if placed and self.shards.held_epoch(shard) is None:
                self.relay(msg, self._names.shard_subject(shard))
                return HANDLED
            return SERVE_HERE
        if p.node == self.me and self.valid(p.revision):
            return p.revision
        owner = self.shards.held_epoch(shard) is not None
        if owner and p.node != self.me and p.node not in self._members.live():
            self.hold(agent_id)
            self.moving[agent_id].append(lambda: self.redispatch(shard, msg, placed))
            self.host_gone(agent_id)
            return HANDLED
        if owner and p.node != self.me:
            self.relay(msg, place_subject(self._names, p.node, shard))
        else:  # our table is behind (released here, or moved on): the shard owner knows
            self.relay(msg, self._names.shard_subject(shard))
        return HANDLED

    def route_durable(self, shard: int, agent_id: AgentId, msg: Delivery, epoch: int) -> int:
        """`route` for a message of the shard's mailbox (this node owns the shard at `epoch`)."""
        if not self.by_id and not self.moving:
            return SERVE_HERE
        if agent_id in self.moving:
            self.moving[agent_id].append(lambda: self._again(shard, epoch, msg))
            return HANDLED
        p = self.by_id.get(agent_id)
        if p is None:
            return SERVE_HERE
        if p.node == self.me and self.valid(p.revision):
            return p.revision
        if p.node != self.me and p.node not in self._members.live():
            self.hold(agent_id)
            self.moving[agent_id].append(lambda: self._again(shard, epoch, msg))
            self.host_gone(agent_id)
            return HANDLED
        self._sends.spawn(self._relay_durable(shard, epoch, agent_id, msg))
        return HANDLED

    def _again(self, shard: int, epoch: int, msg: Delivery) -> None:
        if not self.redispatch_durable(shard, epoch, msg):
            self._sends.spawn(_nak(msg))

    def relay(self, msg: Message, subject: str) -> None:
        hops = int((msg.headers or {}).get(HOPS, "0")) + 1
        if hops > MAX_HOPS:
            log.warning("dropping a message relayed %d times (placement tables disagree)", hops)
            return
        headers = dict(msg.headers or {})
        headers[HOPS] = str(hops)
        self._sends.spawn(
            self._transport.publish(subject, msg.data, reply=msg.reply, headers=headers)
        )

    async def _relay_durable(
        self, shard: int, epoch: int, agent_id: AgentId, msg: Delivery
    ) -> None:
        """Hand a stored message to the node the agent is placed on; ack it once that node has
        handled it (its turn stored the outcome), nak it if not (it comes back here)."""
        p = self.by_id.get(agent_id)
        if p is None:
            self._again(shard, epoch, msg)
            return
        if p.node == self.me:  # placed here but not served now (released, unhealthy)
            await _nak(msg, 0.2)
            return
        answer = b""
        with contextlib.suppress(NoResponders, RequestTimeout, Exception):
            reply = await self._transport.request_msg(
                place_subject(self._names, p.node, shard), msg.data, 30.0, {DURABLE: "1"}
            )
            answer = reply.data
        if answer == b"ack":
            with contextlib.suppress(Exception):
                await msg.ack()
        else:
            await _nak(msg, 0.2)

    # -- moves ----------------------------------------------------------------------------------

    def hold(self, agent_id: AgentId) -> None:
        self.moving.setdefault(agent_id, [])

    def unhold(self, agent_id: AgentId) -> None:
        for again in self.moving.pop(agent_id, []):
            try:
                again()
            except Exception:
                log.exception("re-dispatch of a held message for %s failed", agent_id)


class RelayedDelivery:
    """A mailbox message relayed by its shard owner: ack and nak answer the owner's request,
    which acknowledges the stored message (or has it delivered again)."""

    def __init__(self, transport: Engine, msg: Message) -> None:
        self._transport = transport
        self._reply = msg.reply
        self.data = msg.data
        self.subject = msg.subject
        self.headers = msg.headers
        self.seq = 0
        self.num_delivered = 1
        self._done = False

    async def _answer(self, what: bytes) -> None:
        if not self._done and self._reply:
            self._done = True
            await self._transport.publish(self._reply, what)

    async def ack(self) -> None:
        await self._answer(b"ack")

    async def nak(self, delay: float = 0.0) -> None:
        await self._answer(b"nak")

    async def in_progress(self) -> None:
        return None


async def _nak(msg: Any, delay: float = 0.0) -> None:
    with contextlib.suppress(Exception):
        await msg.nak(delay)
