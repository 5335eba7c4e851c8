"""A node: an OS process's membership in the cluster, hosting agents for the shards it owns.

It joins (membership + shard manager), subscribes to the subject of each shard it gains, turns
requests into work for activations, and short-circuits messages for its own shards in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from . import _codec as codec
from ._activation import Activation, InFlight, Work, _Recorded
from ._agent import Agent, spec_of
from ._background import cancel_and_wait
from ._errors import (
    AccordError,
    AgentTypeNotFound,
    BadRequest,
    ConfigurationError,
    Degraded,
    Overloaded,
    UnknownMessageType,
)
from ._ids import AgentId
from ._mesh import Mesh
from ._settings import NodeSettings, Stats
from ._spec import DELIVERY_MODES, AgentSpec, HandlerSpec
from .cluster._config import Names, open_cluster
from .cluster._hlc import HybridClock
from .cluster._membership import MemberInfo, Membership
from .cluster._replication import Replication
from .cluster._shards import ShardManager
from .coord._quorum import VoteRequest
from .delivery._dlq import dead_letter
from .delivery._mailbox import DurableDelivery, ShardMailbox, ensure_streams
from .engine._admin import NatsAdmin
from .engine._api import Delivery, Message, Subscription
from .engine._nats import NatsTransport
from .engine._resolve import resolve_servers
from .state._durable import Durable
from .state._events import EventLog
from .state._store import MERGE_TYPE, MergeState, StateStore

if TYPE_CHECKING:
    from .services._agent import NodeAgent
    from .services._proxy import Balancer

log = logging.getLogger("accord.node")


class Node(Mesh):
    """Hosts agent types on the cluster. Use `async with Node(agents=[...], nats=url) as node`.

    On exit it leaves gracefully: stops intake, drains in-flight turns, deactivates its agents and
    releases its shards so peers take them over without failed asks.
    """

    def __init__(
        self,
        agents: Iterable[type[Agent]] = (),
        *,
        nats: str | list[str] | None = None,
        name: str | None = None,
        settings: NodeSettings | None = None,
    ) -> None:
        self.settings = settings or NodeSettings()
        self.specs: dict[str, AgentSpec] = {}
        for cls in agents:
            spec = spec_of(cls)
            if spec.type_name in self.specs:
                raise ConfigurationError(f"two agent classes share the type {spec.type_name!r}")
            self.specs[spec.type_name] = spec
        self.node_name = name or f"node-{socket.gethostname()}-{os.getpid()}"
        if not Names(self.node_name.replace(".", "-")[:32]).cluster:
            raise ConfigurationError(f"bad node name {self.node_name!r}")
        if "." in self.node_name or "*" in self.node_name or ">" in self.node_name:
            raise ConfigurationError(
                f"node name may not contain '.', '*' or '>': {self.node_name!r}"
            )
        self._nats = nats
        self.stats = Stats()
        self._activations: dict[AgentId, Activation] = {}
        self._by_shard: dict[int, dict[AgentId, Activation]] = {}
        self._deactivating: dict[AgentId, asyncio.Task[None]] = {}
        self._shard_subs: dict[int, Subscription] = {}
        self._engine: Any = None
        self._sending: set[asyncio.Task[None]] = set()
        self._mailboxes: dict[int, ShardMailbox] = {}
        self._sub_epochs: dict[int, int] = {}
        self._orphans: dict[int, tuple[Subscription, int]] = {}  # cut-off shards still served
        self._standby: dict[int, int] = {}  # shards served for a vanished owner -> its epoch
        self._standby_sub: Subscription | None = None
        self._hlc = HybridClock()
        self._inflight: dict[str, InFlight] = {}
        self.inflight = InFlight()  # node-wide bulkhead count
        self.agent: NodeAgent | None = None  # the node agent (services), once started
        self.balancer: Balancer | None = None  # the HTTP entry point, with --http-port
        self._capacity = asyncio.Event()
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> Node:

        self.loop = asyncio.get_running_loop()
        self._delivered: asyncio.Future[Any] = self.loop.create_future()  # "handed over" (tells)
        self._delivered.set_result(None)
        servers, self._engine = await resolve_servers(self._nats)
        try:
            transport = await NatsTransport.connect(servers, self.node_name)
            names = Names(self.settings.cluster)
            admin = NatsAdmin(transport.nc, transport.js, names.bucket("meta"))
            self._replication = Replication(admin, names.cluster, explicit=self.settings.replicas)
            config, buckets = await open_cluster(
                transport,
                names,
                num_shards=self.settings.num_shards,
                lease_ttl=self.settings.lease_ttl,
                replicas=await self._replication.initial(),
                replicas_auto=self.settings.replicas is None,
            )
            super().__init__(transport, names, config, buckets, self.settings.breaker)
            self._nc = transport
            await ensure_streams(
                transport, names, config.replicas or await self._replication.initial()
            )
            self._store = StateStore(buckets.state)
            self._events = EventLog(transport, f"accord_{names.cluster}_es", f"{names.prefix}.es")
            await self.register_types(self.specs.values())
            for spec in self.specs.values():
                for topic in spec.topics:
                    await self.subscribe(topic, spec.type_name)
            me = MemberInfo(
                name=self.node_name,
                incarnation=uuid.uuid4().hex,
                pid=os.getpid(),
                host=socket.gethostname(),
                started_at=time.time(),
                labels=dict(self.settings.labels),
            )
            s = self.settings
            self.membership = Membership(
                transport,
                buckets.members,
                names,
                me,
                heartbeat_interval=s.heartbeat_interval,
                suspect_after=s.suspect_after,
                dead_after=s.dead_after,
                on_change=self._membership_changed,
            )
            self.shards = ShardManager(buckets.leases, config, self.membership, self)
            self.membership.on_stall = self.shards.resync
            self._admin = await transport.subscribe(
                names.admin_subject, self._on_admin, queue="admin"
            )
            self._node_admin = await transport.subscribe(
                f"{names.admin_subject}.{self.node_name}", self._on_admin
            )
            if any(s.options.failover == "split_brain_allowed" for s in self.specs.values()):
                self._standby_sub = await transport.subscribe(
                    names.standby_subject("*"), self._on_standby_msg, queue="standby"
                )
            await self.membership.start()
            await self.shards.start()
            self._sweeper = self.loop.create_task(self._sweep_idle(), name="accord-idle-sweep")
            self._orphan_watch = self.loop.create_task(self._watch_orphans(), name="accord-heal")
            self._replicator = self.loop.create_task(
                self._replication.run(), name="accord-replication"
            )
            self._started = True
        except BaseException:
            await self._stop_engine()
            raise
        self._services_task = self.loop.create_task(
            self._start_services(), name="accord-services-start"
        )
        log.info("node %s up (cluster %s, %d shards)", self.node_name, names.cluster,
                 config.num_shards)  # fmt: skip
        return self

    def _needs_mailbox(self) -> bool:
        if self.settings.mailbox is not None:
            return self.settings.mailbox
        # Split-brain states come back to the owner through the mailbox after a partition.
        return any(
            s.options.delivery != "at_most_once"
            or VoteRequest in s.by_class
            or s.options.failover == "split_brain_allowed"
            for s in self.specs.values()
        )

    async def stop(self) -> None:
        """Leave the cluster gracefully and close everything this node started."""
        if not self._started:
            await self._stop_engine()
            return
        self._started = False
        await self._stop_services()
        await self.membership.leave()
        await self.shards.leave(self.settings.drain_timeout)
        await self.shards.stop()
        await cancel_and_wait([self._sweeper, self._orphan_watch, self._replicator])
        await self.membership.stop()
        with contextlib.suppress(Exception):
            await self._admin.unsubscribe()
            await self._node_admin.unsubscribe()
            if self._standby_sub is not None:
                await self._standby_sub.unsubscribe()
        if self._sending:  # replies of the last turns: send them before the connection closes
            await asyncio.wait(list(self._sending), timeout=5)
        await self.close()
        await self._stop_engine()
        log.info("node %s stopped; %s", self.node_name, self.stats)

    async def _start_services(self) -> None:
        """Start the node agent (services, promises) and the HTTP entry point, when configured.

        In the background and retried: a node serves its agents even while the services'
        buckets cannot be opened (JetStream without quorum, say).
        """
        from .services._agent import NodeAgent
        from .services._host import NodeParts
        from .services._promises import store_for
        from .services._proxy import Balancer

        s = self.settings
        if not s.services and s.http_port is None:
            return
        while self.agent is None:
            try:
                host = NodeParts(self.node_name, self.membership, self, self._transport,
                                 s.dead_after)  # fmt: skip
                agent = NodeAgent(host, await store_for(self), s.advertise)
                await agent.start()
                self.agent = agent
            except (AccordError, OSError) as exc:
                log.warning("node agent not started yet, retrying: %s", exc)
                await asyncio.sleep(2.0)
        if s.http_port is not None:
            balancer = Balancer(self.agent, s.http_host, s.http_port)
            try:
                await balancer.start()
                self.balancer = balancer
            except OSError as exc:
                log.error("cannot serve HTTP on %s:%d: %s", s.http_host, s.http_port, exc)

    async def _stop_services(self) -> None:
        await cancel_and_wait([self._services_task])
        if self.balancer is not None:
            await self.balancer.stop()
        if self.agent is not None:
            await self.agent.stop()

    async def _stop_engine(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.stop)

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _membership_changed(self) -> None:
        if hasattr(self, "shards"):
            self.shards.wake()

    # -- ShardOwner -------------------------------------------------------------------------

    async def shard_acquired(self, shard: int, epoch: int) -> None:
        def on_msg(msg: Message) -> None:
            self._on_request(shard, msg)

        if shard in self._orphans:  # healed and it came back here: merge, then serve anew
            await self._end_orphan(shard)
        if shard in self._standby:  # served for its vanished owner meanwhile: merge, then own
            self._end_standby(shard)
        subject = self.names.shard_subject(shard)
        self._shard_subs[shard] = await self._nc.subscribe_direct(subject, on_msg)
        self._sub_epochs[shard] = epoch
        self.membership.me.shards = len(self._shard_subs)
        if not self._needs_mailbox():
            return
        if not await self._start_mailbox(shard, epoch):
            # JetStream trouble (an election, a busy server): core messaging works meanwhile;
            # durable messages and split-brain merges wait in the stream until it starts.
            self._bg_task(self._retry_mailbox(shard, epoch))

    async def _start_mailbox(self, shard: int, epoch: int) -> bool:
        """Consume `shard`'s mailbox for `epoch`; False if JetStream refused (try again)."""
        mailbox = ShardMailbox(
            self._nc,
            self.names,
            shard,
            epoch,
            self._on_mailbox,
            self._wait_capacity,
            lambda: self.shards.valid(shard, epoch),
        )
        try:
            await mailbox.start(self.shards.previous_epoch.get(shard))
        except Exception as exc:
            log.warning("mailbox of shard %d not started: %s", shard, exc)
            return False
        if self._sub_epochs.get(shard) != epoch or shard in self._mailboxes:
            await mailbox.stop()  # the shard was released (or re-acquired) meanwhile
        else:
            self._mailboxes[shard] = mailbox
        return True

    async def _retry_mailbox(self, shard: int, epoch: int) -> None:
        delay = 0.5
        while self._started and self._sub_epochs.get(shard) == epoch:
            await asyncio.sleep(delay)
            if self._sub_epochs.get(shard) != epoch or shard in self._mailboxes:
                return
            if await self._start_mailbox(shard, epoch):
                return
            delay = min(4.0, delay * 2)

    async def shard_released(self, shard: int, graceful: bool, orphan: bool = False) -> None:
        sub = self._shard_subs.pop(shard, None)
        epoch = self._sub_epochs.pop(shard, None)
        self.membership.me.shards = len(self._shard_subs)
        mailbox = self._mailboxes.pop(shard, None)
        if mailbox is not None:
            await mailbox.stop()  # stop pulling; what was fetched is drained below
        tolerant = [s for s in self.specs.values() if s.options.failover != "absolute"]
        if orphan and tolerant and sub is not None and epoch is not None:
            # Cut off (renewals failed): keep answering for split-brain/degraded agent types from
            # memory; absolute ones stop below. Ends when the partition heals (_end_orphan).
            self._orphans[shard] = (sub, epoch)
            sub = None
            for act in self._by_shard.get(shard, {}).values():
                if act.spec.options.failover != "absolute":
                    act.make_orphan()
            log.warning("shard %d epoch %d: cut off; serving %s from memory", shard, epoch,
                        ", ".join(sorted(s.type_name for s in tolerant)))  # fmt: skip
        if sub is not None:
            with contextlib.suppress(Exception):
                if graceful:
                    await sub.drain()
                else:
                    await sub.unsubscribe()
        acts = [a for a in self._by_shard.get(shard, {}).values() if not a.orphan]
        if not graceful:
            # A CRDT turn in flight may still finish and persist: its write merges, it never
            # overwrites, and it will not reply. Everything else stops at once.
            merging = [a for a in acts if a.spec.options.consistency == "crdt"]
            for act in merging:
                act.close()
            if merging:
                self._bg_task(self._bounded(merging, self.settings.drain_timeout))
            acts = [a for a in acts if a.spec.options.consistency != "crdt"]
        if graceful:
            for act in acts:
                act.close()
            await asyncio.wait(
                [a.task for a in acts] or [self.loop.create_future()],
                timeout=self.settings.drain_timeout if acts else 0,
            )
            acts = [a for a in acts if not a.task.done()]
        for act in acts:
            act.task.cancel()
        for act in acts:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await act.task

    async def _bounded(self, acts: list[Activation], timeout: float) -> None:
        """Let `acts` finish within `timeout`, then cancel what is left."""
        await asyncio.wait([a.task for a in acts], timeout=timeout)
        for act in acts:
            act.task.cancel()

    def shards_valid(self, shard: int, epoch: int) -> bool:
        return self.shards.valid(shard, epoch)

    # -- inbound ----------------------------------------------------------------------------

    def _parse(self, shard: int, data: bytes) -> tuple[codec.Request, codec.Encoding, _Target]:
        """Decode and validate a request for `shard`; raise an AccordError naming the problem."""
        req, enc = codec.decode_request(data)
        try:
            agent_id, target_shard = self._resolve(req.target)
        except ConfigurationError as exc:
            raise BadRequest(f"bad target: {exc}") from None
        if target_shard != shard:
            raise BadRequest(f"{agent_id} does not live in shard {shard}")
        spec = self.specs.get(agent_id.type)
        if spec is None:
            raise AgentTypeNotFound(f"no agent type {agent_id.type!r} on this cluster")
        if req.kind == "result":
            return req, enc, _Target(agent_id, spec, None, None, None)
        if req.type == MERGE_TYPE:
            merge = codec.decode_as(req.body, MergeState, enc)
            return req, enc, _Target(agent_id, spec, None, merge, None)
        h = spec.handler_for_name(req.type)
        if h is None:
            raise UnknownMessageType(
                f"agent type {agent_id.type!r} has no handler for {req.type!r}"
            )
        body = codec.decode_as(req.body, h.msg_type, enc)
        deadline = None
        if req.timeout_ms is not None:
            if not -(2**63) <= req.timeout_ms < 2**64:
                raise BadRequest(f"timeout_ms out of range: {req.timeout_ms}")
            deadline = self.loop.time() + req.timeout_ms / 1000
        if req.delivery is not None and req.delivery not in DELIVERY_MODES:
            raise BadRequest(f"unknown delivery mode {req.delivery!r}")
        return req, enc, _Target(agent_id, spec, h, body, deadline)

    def _on_request(self, shard: int, msg: Message) -> None:
        # A message that reached this subscription is ours while the lease is valid, also while
        # the shard is being handed off: the subscription drains before the lease is released.
        epoch = self.shards.held_epoch(shard)
        orphan = False
        if epoch is None:
            cut_off = self._orphans.get(shard)
            if cut_off is None or self._superseded(shard, cut_off[1]):
                # A stale subscription, or a cut-off one whose shard another node now serves
                # where this message also arrived: stay silent, the valid owner answers (else
                # both would apply it).
                self.stats.dropped_not_owner += 1
                return
            epoch, orphan = cut_off[1], True
        reply_to = msg.reply or None
        enc: codec.Encoding = codec.sniff(msg.data)
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind == "result" and (reply_to is None or not req.id):
                raise BadRequest("a result request needs a reply subject and an id")
            if req.type == MERGE_TYPE:
                raise BadRequest("state merges go through the mailbox")
            self._check_capacity(t.spec.type_name)
        except AccordError as exc:
            self._reject(exc, reply_to, enc)
            return
        except Exception as exc:  # anything a hostile envelope provokes must not kill the node
            self._reject(BadRequest(f"rejected: {exc}"), reply_to, enc)
            return
        if orphan and not self._serve_cut_off(t, reply_to, enc):
            return
        reply = None
        if req.kind != "tell" and reply_to is not None:
            reply = self._remote_replier(reply_to, enc, epoch)
        act = self._activation(t.agent_id, t.spec, shard, epoch, orphan=orphan)
        if req.kind == "result":
            act.put(Work(None, None, t.deadline, reply, lookup=req.id))
        else:
            act.put(Work(t.handler, t.body, t.deadline, reply))

    def _serve_cut_off(self, t: _Target, reply_to: str | None, enc: codec.Encoding) -> bool:
        """While cut off: absolute types stay silent, degraded ones refuse writes."""
        failover = t.spec.options.failover
        if failover == "absolute" or t.handler is None:
            self.stats.dropped_not_owner += 1
            return False
        if failover == "degraded" and not t.handler.read_only:
            self._reject(Degraded(f"{t.agent_id} is cut off from the cluster: writes are "
                                  "refused until the partition heals"), reply_to, enc)  # fmt: skip
            return False
        return True

    async def _watch_orphans(self) -> None:
        """End cut-off serving once the partition healed and another node owns the shard, and
        standby serving once the shard has an owner again."""
        while True:
            await asyncio.sleep(0.25)
            for shard, (_, epoch) in list(self._orphans.items()):
                if self._superseded(shard, epoch):
                    await self._end_orphan(shard)
            for shard, epoch in list(self._standby.items()):
                if self._superseded(shard, epoch):
                    self._end_standby(shard)

    # -- standby serving (split_brain_allowed agents of a vanished owner) ---------------------

    async def _on_standby_msg(self, msg: Message) -> None:
        self._on_standby(msg)

    def _on_standby(self, msg: Message) -> None:
        """An ask for a `split_brain_allowed` agent whose shard had no subscriber (its owner's
        process died): serve it now from the stored state, as a split-brain replica, instead of
        waiting out the lease. When the shard has an owner again, what changed here is merged
        into it (as after a partition). Other failover strategies never come here."""
        try:
            shard = int(msg.subject.rsplit(".", 1)[-1])
        except ValueError:
            shard = -1
        reply_to = msg.reply or None
        enc: codec.Encoding = codec.sniff(msg.data)
        if not 0 <= shard < self.config.num_shards:
            self._reject(BadRequest(f"no shard {shard}"), reply_to, enc)
            return
        if self.shards.held_epoch(shard) is not None:  # it is ours by now: serve as owner
            self._on_request(shard, msg)
            return
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind != "ask" or t.handler is None:
                raise BadRequest("the standby subject takes asks only")
            if t.spec.options.failover != "split_brain_allowed":
                raise BadRequest(f"{t.agent_id} is not split_brain_allowed: no standby serving")
            self._check_capacity(t.spec.type_name)
        except AccordError as exc:
            self._reject(exc, reply_to, enc)
            return
        except Exception as exc:  # a hostile envelope must not kill the node
            self._reject(BadRequest(f"rejected: {exc}"), reply_to, enc)
            return
        epoch = self._standby.get(shard)
        if epoch is None:
            owner = self.shards.table.get(shard)
            epoch = owner.epoch if owner is not None else self.shards.previous_epoch.get(shard, 0)
            self._standby[shard] = epoch
            log.warning("shard %d: no owner answers; serving its split-brain agents here "
                        "(owner epoch %d) until it has one again", shard, epoch)  # fmt: skip
        reply = self._remote_replier(reply_to, enc, epoch) if reply_to is not None else None
        act = self._activation(t.agent_id, t.spec, shard, epoch, orphan=True)
        act.put(Work(t.handler, t.body, t.deadline, reply))

    def _end_standby(self, shard: int) -> None:
        if self._standby.pop(shard, None) is None:
            return
        acts = [a for a in self._by_shard.get(shard, {}).values() if a.orphan]
        self._merge_back(acts)
        log.warning("shard %d has an owner again; %d standby activation(s) merged into it",
                    shard, len(acts))  # fmt: skip

    def _merge_back(self, acts: list[Activation]) -> None:
        """Close orphan activations; each sends its changes to the owner once its turns end."""
        for act in acts:
            act.merge_to = functools.partial(self._merge_to_owner, act.id)
            act.close()

    def _merge_to_owner(self, agent_id: AgentId, payload: MergeState) -> None:
        self._bg_task(self._send_merge(agent_id, payload))

    def _superseded(self, shard: int, epoch: int) -> bool:
        """Does the lease table show another node serving `shard` under a newer epoch?"""
        owner = self.shards.table.get(shard)
        return owner is not None and owner.node != self.node_name and owner.epoch > epoch

    async def _end_orphan(self, shard: int) -> None:
        cut_off = self._orphans.pop(shard, None)
        if cut_off is None:
            return  # ended meanwhile (re-acquired here while the heal watch was at it)
        sub, epoch = cut_off
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        acts = [a for a in self._by_shard.get(shard, {}).values() if a.orphan]
        self._merge_back(acts)
        log.warning("shard %d epoch %d: partition healed; %d cut-off activation(s) merged back",
                    shard, epoch, len(acts))  # fmt: skip

    async def _send_merge(self, agent_id: AgentId, payload: MergeState) -> None:
        msg_id = f"merge:{self.node_name}:{payload.epoch}:{payload.hlc}:{agent_id}"
        for _ in range(30):
            try:
                await self.tell(agent_id, payload, delivery="at_least_once", msg_id=msg_id)
                return
            except AccordError as exc:
                log.warning("merge of %s not sent yet: %s", agent_id, exc)
                await asyncio.sleep(1.0)

    def record_merge(self, agent_id: AgentId, incoming: MergeState, outcome: str) -> None:
        """The owner folded a split-brain peer's state in: log it and append it to the events."""
        event = {"agent": str(agent_id), "from_node": incoming.node, "from_epoch": incoming.epoch,
                 "hlc": incoming.hlc, "outcome": outcome, "by": self.node_name}  # fmt: skip
        log.info("merged split-brain state of %s from %s: %s", agent_id, incoming.node, outcome)
        self.stats.merges += 1
        self._bg_task(
            self._nc.publish(self.names.events_subject("merge"), msgspec.json.encode(event))
        )

    def orphan_epoch(self, shard: int) -> int | None:
        """The epoch under which this node serves `shard` without holding it (cut off from the
        majority, or standing in for a vanished owner), else None."""
        cut_off = self._orphans.get(shard)
        return cut_off[1] if cut_off is not None else self._standby.get(shard)

    def _on_mailbox(self, shard: int, epoch: int, msg: Delivery) -> bool:
        """Dispatch one mailbox message; False once this node no longer owns `shard` at `epoch`."""
        if self.shards.held_epoch(shard) != epoch:
            return False
        enc: codec.Encoding = codec.sniff(msg.data)
        fallback_id = f"js:{msg.seq}"
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind == "result":
                raise BadRequest("result requests do not go through the mailbox")
        except Exception as exc:
            error = exc if isinstance(exc, AccordError) else BadRequest(f"rejected: {exc}")
            self.stats.rejected += 1
            self._bg_task(self._reject_durable(msg, error, fallback_id))
            return True
        mode = req.delivery or t.spec.options.delivery
        if mode == "at_most_once":
            mode = "at_least_once"  # it is in the mailbox: at least once is the floor
        delivery = DurableDelivery(msg, req.id or fallback_id, mode)
        reply = None
        if req.kind == "ask" and req.reply_to:
            reply = self._remote_replier(req.reply_to, enc, epoch)
        work = Work(t.handler, t.body, None, reply, delivery=delivery, data=msg.data)
        self._activation(t.agent_id, t.spec, shard, epoch).put(work)
        return True

    async def _reject_durable(self, msg: Delivery, error: AccordError, msg_id: str) -> None:
        """A mailbox message that can never be handled goes straight to the dead letters."""
        target = msg_type = ""
        with contextlib.suppress(Exception):
            req, enc = codec.decode_request(msg.data)
            target, msg_type = req.target, req.type
            if req.reply_to and req.kind == "ask":
                self._send(req.reply_to, codec.error_reply(error.code, str(error), enc))
        with contextlib.suppress(Exception):
            await dead_letter(
                self._nc,
                self.names,
                msg.data,
                target=target,
                msg_type=msg_type,
                msg_id=msg_id,
                reason=f"{error.code}: {error}",
                deliveries=1,
            )
            self.stats.dead_lettered += 1
        with contextlib.suppress(Exception):
            await msg.ack()

    async def dead_letter(self, work: Work, dd: DurableDelivery, error: AccordError) -> None:
        """Called by an activation when a message failed `max_deliver` times."""
        try:
            req, _ = codec.decode_request(work.data)
            target, msg_type = req.target, req.type
        except AccordError:
            target = msg_type = ""
        reason = f"{getattr(error, 'remote_type', error.code)}: " + getattr(
            error, "remote_message", str(error)
        )
        await dead_letter(self._nc, self.names, work.data, target=target, msg_type=msg_type,
                          msg_id=dd.msg_id, reason=reason, deliveries=dd.attempts)  # fmt: skip
        self.stats.dead_lettered += 1
        log.warning("dead-lettered %s %s after %d attempts: %s", target, msg_type, dd.attempts,
                    reason)  # fmt: skip

    async def record_vote(self, request: VoteRequest, voter: str, result: Any) -> None:
        """A voter agent's vote handler returned: record its vote, decide if that settles it."""
        if not isinstance(result, bool):
            raise TypeError(f"a VoteRequest handler must return bool, got {type(result).__name__}")
        await self._ballots().vote(request.proposal_id, voter, result, self.node_name)

    # -- bulkheads ----------------------------------------------------------------------------

    def type_load(self, agent_type: str) -> InFlight:
        """The bulkhead count of `agent_type` (activations update it in place)."""
        load = self._inflight.get(agent_type)
        if load is None:
            load = self._inflight[agent_type] = InFlight()
        return load

    def inflight_add(self, agent_type: str, n: int) -> None:
        self.type_load(agent_type).n += n
        self.inflight.n += n
        if n < 0 and self.inflight.waiting:
            self.capacity_freed()

    def capacity_freed(self) -> None:
        """The node-wide count dropped while a mailbox consumer waits: wake it below the limit."""
        if self.inflight.n < self.settings.max_inflight:
            self.inflight.waiting = False
            self._capacity.set()

    def _check_capacity(self, agent_type: str) -> None:
        s = self.settings
        load = self._inflight.get(agent_type)
        per_type = 0 if load is None else load.n
        if self.inflight.n < s.max_inflight and per_type < s.max_inflight_per_type:
            return
        self.stats.overloaded += 1
        if self.inflight.n >= s.max_inflight:
            raise Overloaded(f"node {self.node_name} has {self.inflight.n} messages in flight")
        raise Overloaded(f"agent type {agent_type!r} has too many messages in flight")

    async def _wait_capacity(self) -> None:
        while self.inflight.n >= self.settings.max_inflight:
            self._capacity.clear()
            self.inflight.waiting = True
            await self._capacity.wait()

    def durable_for(self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int) -> Durable:
        events = self._events if spec.options.consistency == "event_sourced" else None
        durable = Durable(
            spec,
            agent_id,
            epoch,
            self._store,
            events,
            lambda: self.shards.valid(shard, epoch),
            self._hlc,
        )
        # Activated while cut off (split brain): the state bucket is out of reach.
        cut_off = self.shards.held_epoch(shard) != epoch and self.orphan_epoch(shard) == epoch
        durable.orphaned = cut_off
        return durable

    def _bg_task(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _reject(self, exc: AccordError, reply_to: str | None, enc: codec.Encoding) -> None:
        self.stats.rejected += 1
        log.debug("rejected request: %s", exc)
        if reply_to:
            self._send(reply_to, codec.error_reply(exc.code, str(exc), enc))

    def _remote_replier(self, reply_to: str, enc: codec.Encoding, epoch: int) -> Any:
        def reply(result: Any, error: BaseException | None) -> Coroutine[Any, Any, None]:
            if error is not None:
                code = getattr(error, "code", "error")
                rtype = getattr(error, "remote_type", type(error).__name__)
                rmsg = getattr(error, "remote_message", str(error))
                data = codec.error_reply(code, rmsg, enc, rtype)
            else:
                try:
                    body = (
                        _recorded_body(result, enc)
                        if isinstance(result, _Recorded)
                        else (codec.encode(result, enc))
                    )
                    data = codec.ok_reply(body, enc, epoch, self.node_name)
                except (TypeError, ValueError, OverflowError) as exc:
                    data = codec.error_reply("remote_error", f"reply not encodable: {exc}", enc,
                                             "TypeError")  # fmt: skip
            if len(data) > self._nc.nc.max_payload:
                data = codec.error_reply(
                    "remote_error",
                    f"reply of {len(data)} bytes exceeds the server's max_payload",
                    enc,
                    "MaxPayloadError",
                )
            return self._nc.publish(reply_to, data)  # awaited by the turn: no task per reply

        return reply

    def _send(self, subject: str, data: bytes) -> None:
        self._bg_task(self._nc.publish(subject, data))

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background send failed: %s", task.exception())

    async def _on_admin(self, msg: Message) -> None:
        from ._status import node_status

        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, msgspec.json.encode(node_status(self)))

    # -- activations ------------------------------------------------------------------------

    def _activation(
        self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int, orphan: bool = False
    ) -> Activation:
        act = self._activations.get(agent_id)
        if act is not None and act.epoch == epoch and not act.closing:
            return act
        previous = act.task if act is not None else self._deactivating.get(agent_id)
        act = Activation(self, agent_id, spec, shard, epoch, previous)
        if orphan:
            act.make_orphan()
        self._activations[agent_id] = act
        self._by_shard.setdefault(shard, {})[agent_id] = act
        return act

    def activation_ended(self, act: Activation) -> None:
        if self._activations.get(act.id) is act:
            del self._activations[act.id]
        by = self._by_shard.get(act.shard)
        if by is not None and by.get(act.id) is act:
            del by[act.id]
        self._deactivating[act.id] = act.task
        act.task.add_done_callback(lambda t: self._forget(act.id, t))
        self.stats.deactivations += 1

    def _forget(self, agent_id: AgentId, task: asyncio.Task[None]) -> None:
        if self._deactivating.get(agent_id) is task:
            del self._deactivating[agent_id]

    def _local_spec(self, agent_type: str) -> AgentSpec | None:
        return self.specs.get(agent_type)

    def _tell_local(self, agent_id: AgentId, shard: int, msg: Any) -> bool:
        """An at-most-once tell to a live activation of a shard served here, in one step.

        Anything else (no activation yet, a new epoch, a full bulkhead, an unknown message, a
        durable mode) returns False and takes the general path, which decides and reports it.
        """
        act = self._activations.get(agent_id)
        if act is None or act.closing or not act.tells_direct:
            return False
        h = act.spec.by_class.get(type(msg))
        if h is None or self.shards.serving(shard) != act.epoch or not self._started:
            return False
        s = self.settings
        if self.inflight.n >= s.max_inflight or act.load.n >= s.max_inflight_per_type:
            return False
        act.put(Work(h, msg, None, None))
        return True

    def _route_local(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float | None, *, ask: bool
    ) -> asyncio.Future[Any] | None:
        epoch = self.shards.serving(shard) if self._started else None
        if epoch is None:
            return None
        spec = self.specs.get(agent_id.type)
        h = spec.by_class.get(type(msg)) if spec is not None else None
        try:
            if spec is None:
                raise AgentTypeNotFound(f"no agent type {agent_id.type!r} on this cluster")
            if h is None:
                raise UnknownMessageType(
                    f"{agent_id.type!r} has no handler for {type(msg).__name__}"
                )
            self._check_capacity(spec.type_name)
        except AccordError as exc:
            if not ask:
                raise
            failed: asyncio.Future[Any] = self.loop.create_future()
            failed.set_exception(exc)
            return failed
        if not ask:  # a tell: nothing to wait for
            act = self._activations.get(agent_id)
            if act is None or act.epoch != epoch or act.closing:
                act = self._activation(agent_id, spec, shard, epoch)
            act.put(Work(h, msg, deadline, None))
            return self._delivered
        fut: asyncio.Future[Any] = self.loop.create_future()
        work = Work(h, msg, deadline, _future_replier(fut), local=True)
        self._activation(agent_id, spec, shard, epoch).put(work)
        return fut

    async def _sweep_idle(self) -> None:
        while True:
            idle = min((s.idle_timeout for s in self.specs.values()), default=60.0)
            await asyncio.sleep(max(0.05, min(idle / 4, 1.0)))
            now = self.loop.time()
            for act in list(self._activations.values()):
                if (
                    not act.busy
                    and not act.queue
                    and now - act.last_active >= act.spec.idle_timeout
                ):
                    act.close()

    def activation_count(self) -> int:
        return len(self._activations)


class _Target(NamedTuple):
    agent_id: AgentId
    spec: AgentSpec
    handler: HandlerSpec | None
    body: Any
    deadline: float | None


def _recorded_body(rec: _Recorded, enc: codec.Encoding) -> bytes:
    return rec.data if enc == "msgpack" else msgspec.json.encode(msgspec.msgpack.decode(rec.data))


def _future_replier(fut: asyncio.Future[Any]) -> Any:
    def reply(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    return reply
