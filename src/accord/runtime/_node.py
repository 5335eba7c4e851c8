"""A node: an OS process's membership in the cluster, hosting agents for the shards it owns.

`Node.start()` builds its parts — transport, buckets, membership, shard ownership (`_ownership`),
inbound dispatch (`_inbound`), cut-off serving (`_cutoff`), the activation table and bulkheads,
the in-process route (`_local`), services — on an `AsyncExitStack`, so a failed start closes what
it opened and `stop()` closes everything in reverse order after a graceful leave.
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .._agent import Agent, spec_of
from .._background import Background, cancel_and_wait
from .._errors import AccordError, ConfigurationError
from .._ids import AgentId
from .._mesh import Mesh
from .._observe import Observers
from .._spec import AgentSpec
from ..cluster._config import Names, open_cluster
from ..cluster._hlc import HybridClock
from ..cluster._membership import MemberInfo, Membership
from ..cluster._replication import Replication
from ..cluster._shards import ShardManager
from ..coord._quorum import VoteRequest
from ..delivery._mailbox import DurableDelivery, ensure_streams
from ..engine._admin import NatsAdmin
from ..engine._api import Message
from ..engine._nats import NatsTransport
from ..engine._resolve import resolve_credentials, resolve_servers
from ..state._durable import Durable
from ..state._events import EventLog
from ..state._store import MergeState, StateStore
from ..workflows._timers import TimerService
from ._bulkhead import Bulkhead
from ._colocate import Colocation
from ._cutoff import CutOff
from ._host import ActivationRef, AfterTurn
from ._inbound import Inbound
from ._local import LocalRoute
from ._looplag import LoopMonitor
from ._migrate import start_placement
from ._ownership import ShardHost
from ._placement import NodePlacement
from ._pool import serve_pools
from ._settings import NodeSettings, Stats
from ._table import ActivationTable
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from ..services._agent import NodeAgent
    from ..services._proxy import Balancer

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
        creds: str | Path | None = None,
    ) -> None:
        self.settings = settings or NodeSettings()
        specs: dict[str, AgentSpec] = {}
        for cls in agents:
            spec = spec_of(cls)
            if spec.type_name in specs:
                raise ConfigurationError(f"two agent classes share the type {spec.type_name!r}")
            specs[spec.type_name] = spec
        self.specs: Mapping[str, AgentSpec] = specs
        self.node_name = name or f"node-{socket.gethostname()}-{os.getpid()}"
        if not Names(self.node_name.replace(".", "-")[:32]).cluster:
            raise ConfigurationError(f"bad node name {self.node_name!r}")
        if "." in self.node_name or "*" in self.node_name or ">" in self.node_name:
            raise ConfigurationError(
                f"node name may not contain '.', '*' or '>': {self.node_name!r}"
            )
        self._nats = nats
        self._creds = creds  # see accord.connect(creds=)
        self.stats = Stats()
        self._observe = Observers()  # metrics, status rates (`_observe.py`)
        self._stack: contextlib.AsyncExitStack | None = None
        self._running = False
        self._agent: NodeAgent | None = None  # the node agent (services), once started
        self._balancer: Balancer | None = None  # the HTTP entry point, with --http-port

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> Node:
        """Connect, join the cluster and take a share of its shards; return this node.

        Raises `NotConnected` when the engine cannot be reached or does not answer,
        `ConfigurationError` for settings the cluster refuses. A failed start closes everything
        it opened (connection, tasks, an embedded server it started).
        """
        if self._stack is not None:
            raise ConfigurationError(f"node {self.node_name} is already started")
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            await self._start(stack)
        except BaseException:
            self._stack = None
            self._running = False
            await stack.aclose()
            raise
        log.info("node %s up (cluster %s, %d shards)", self.node_name, self.names.cluster,
                 self.config.num_shards)  # fmt: skip
        return self

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        servers, engine = await resolve_servers(self._nats)
        if engine is not None:
            stack.push_async_callback(asyncio.to_thread, engine.stop)
        credentials = resolve_credentials(self._nats, self._creds)
        transport = await NatsTransport.connect(servers, self.node_name, credentials=credentials)
        stack.push_async_callback(transport.close)
        names = Names(s.cluster)
        admin = NatsAdmin(transport.nc, transport.js, names.bucket("meta"))
        replication = Replication(admin, names.cluster, explicit=s.replicas)
        config, buckets = await open_cluster(transport, names, num_shards=s.num_shards,
                                         lease_ttl=s.lease_ttl,
                                         replicas=await replication.initial(),
                                         replicas_auto=s.replicas is None)  # fmt: skip
        await ensure_streams(
            transport, names, config.replicas or await replication.initial(), config
        )
        sends = Background(expected=(AccordError, OSError))  # replies and merges
        stack.push_async_callback(sends.close)
        stack.push_async_callback(sends.drain, 5.0)  # the last turns' replies, before closing

        self._bulkhead = Bulkhead(s, self.stats, self.node_name, self._observe)
        self._telemetry = telemetry = Telemetry(self.node_name, s, sorted(self.specs),
                                                config.num_shards, self._bulkhead, self.stats,
                                                self._observe)  # fmt: skip
        metrics_url = await telemetry.start(stack)
        host = _Hosting(self, loop, self._bulkhead)
        self._table = table = ActivationTable(host, self.stats)
        stack.callback(table.cancel_stuck)
        if s.loop_lag_warning is not None:
            monitor = LoopMonitor(loop, self.stats, s.loop_lag_warning, observe=self._observe)
            monitor.start()
            stack.push_async_callback(monitor.stop)
        self._local_route = local = LocalRoute(self.specs, table, self._bulkhead, loop)
        self._bind(transport, names, config, buckets, s.breaker, local)
        stack.push_async_callback(self._close_mesh)
        self._store = StateStore(buckets.state)
        self._events = EventLog(transport, f"accord_{names.cluster}_es", f"{names.prefix}.es")
        await self.register_types(self.specs.values())
        for spec in self.specs.values():
            for topic in spec.topics:
                await self.subscribe(topic, spec.type_name)

        me = MemberInfo(name=self.node_name, incarnation=uuid.uuid4().hex, pid=os.getpid(),
                        host=socket.gethostname(), started_at=time.time(),
                        labels=dict(s.labels), metrics_url=metrics_url,
                        types=sorted(self.specs))  # fmt: skip
        self._membership = membership = Membership(
            transport, buckets.members, names, me,
            heartbeat_interval=s.heartbeat_interval, suspect_after=s.suspect_after,
            dead_after=s.dead_after, on_change=self._membership_changed,
        )  # fmt: skip
        owner = ShardHost(names, self.specs.values(), transport, table,
                          self._bulkhead, me, self._needs_mailbox(), s.drain_timeout, sends,
                          self._is_running)  # fmt: skip
        self._shards = shards = ShardManager(buckets.leases, config, membership, owner,
                                             observe=self._observe)  # fmt: skip
        membership.on_stall = shards.resync
        local.attach(shards.serving)
        self._cutoff = cutoff = CutOff(self.node_name, names, shards, table, transport,
                                       self._send_merge, self.stats, sends)  # fmt: skip
        self._inbound = inbound = Inbound(
            self.node_name, names, config.num_shards, self.specs, self._resolve, shards, cutoff,
            table, self._bulkhead, transport, self.stats, sends, loop.time, self._observe,
        )  # fmt: skip
        owner.attach(shards, inbound, cutoff)
        telemetry.bind(membership, shards, self._is_running, lambda: self._agent, self)
        placement, self._migrator, place_subs = await start_placement(
            names, transport, buckets.leases, membership, shards, table, self.specs,
            self._resolve, inbound, config.lease_ttl, s.drain_timeout, sends, self._bg)  # fmt: skip
        for sub in place_subs:
            stack.push_async_callback(_unsubscribe, sub)
        local.attach_placement(placement.local_epoch)
        self._sender.place = placement.subject_for
        self._colocation = colocation = Colocation(
            self, self._migrator, placement, membership, table, self.specs, config.num_shards,
            s.placement, s.adaptive, self._bg)  # fmt: skip
        local.observe = colocation.observe if s.placement.sample else None
        if s.placement.sample:  # turns per agent, for load-aware rebalancing
            self._observe.add(colocation.turns)
        host.bind(self, shards, cutoff, inbound, table, placement)

        status_sub = await transport.subscribe(names.admin_subject, self._on_admin, queue="admin")
        stack.push_async_callback(_unsubscribe, status_sub)
        node_admin = await transport.subscribe(f"{names.admin_subject}.{self.node_name}",
                                               self._on_admin)  # fmt: skip
        stack.push_async_callback(_unsubscribe, node_admin)
        if any(spec.options.failover == "split_brain_allowed" for spec in self.specs.values()):
            standby = await transport.subscribe(
                names.standby_subject("*"), inbound.on_standby_msg, queue="standby"
            )
            stack.push_async_callback(_unsubscribe, standby)
        await membership.start()
        stack.push_async_callback(membership.stop)
        await shards.start()
        stack.push_async_callback(shards.stop)
        tasks = [
            loop.create_task(table.sweep_idle(self.specs.values(), loop), name="accord-idle"),
            loop.create_task(cutoff.watch(), name="accord-heal"),
            loop.create_task(replication.run(), name="accord-replication"),
            loop.create_task(TimerService(self).run(), name="accord-timers"),
            loop.create_task(telemetry.rates.run(), name="accord-rates"),
        ]
        stack.push_async_callback(cancel_and_wait, tasks)
        self._pools = await serve_pools(self, self.specs.values(), s, stack, transport)
        self._running = local.open = True
        colocation.start()
        services = loop.create_task(self._start_services(), name="accord-services-start")
        stack.push_async_callback(self._stop_services, services)

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
        """Leave the cluster gracefully and close everything this node started.

        Intake stops, queued turns drain (up to `settings.drain_timeout`), activations
        deactivate and the shards are released so peers take them over at once. Idempotent.
        """
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._running:
            # Agents placed here by override go elsewhere now, not one lease TTL after we left
            # (bounded: the shards' own drain below needs the rest of the stop's time).
            await self._migrator.hand_back(self.config.num_shards, self.settings.drain_timeout / 2)
            self._running = self._local_route.open = False
            await self._stop_services(None)
            await self._membership.leave()
            await self._shards.leave(self.settings.drain_timeout)
        await stack.aclose()
        log.info("node %s stopped; %s", self.node_name, self.stats)

    async def _close_mesh(self) -> None:
        await self._bg.close()

    def _is_running(self) -> bool:
        return self._running

    async def _start_services(self) -> None:
        """Start the node agent (services, promises) and the HTTP entry point, when configured.

        In the background and retried: a node serves its agents even while the services'
        buckets cannot be opened (JetStream without quorum, say).
        """
        from ..services._agent import NodeAgent
        from ..services._host import NodeParts
        from ..services._promises import store_for
        from ..services._proxy import Balancer

        s = self.settings
        if not s.services and s.http_port is None:
            return
        while self._agent is None:
            try:
                host = NodeParts(self.node_name, self._membership, self, self._transport,
                                 s.dead_after)  # fmt: skip
                agent = NodeAgent(host, await store_for(self), s.advertise)
                await agent.start()
                self._agent = agent
            except (AccordError, OSError) as exc:
                log.warning("node agent not started yet, retrying: %s", exc)
                await asyncio.sleep(2.0)
        if s.http_port is not None:
            balancer = Balancer(self._agent, s.http_host, s.http_port)
            try:
                await balancer.start()
                self._balancer = balancer
            except OSError as exc:
                log.error("cannot serve HTTP on %s:%d: %s", s.http_host, s.http_port, exc)

    async def _stop_services(self, starting: asyncio.Task[None] | None) -> None:
        if starting is not None:
            await cancel_and_wait([starting])
        balancer, self._balancer = self._balancer, None
        if balancer is not None:
            await balancer.stop()
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _membership_changed(self) -> None:
        shards = getattr(self, "_shards", None)  # membership starts before the shard manager
        if shards is not None:
            shards.wake()

    async def _send_merge(self, agent_id: AgentId, payload: MergeState, msg_id: str) -> None:
        await self.tell(agent_id, payload, delivery="at_least_once", msg_id=msg_id)

    # -- status -----------------------------------------------------------------------------

    def activation_count(self) -> int:
        """How many agents are active on this node now."""
        return self._table.count()

    def held_shards(self) -> dict[int, int]:
        """The shards this node holds now, with their lease epochs."""
        return self._shards.held()

    def status(self) -> dict[str, Any]:
        """What this node reports about itself and its view of the cluster (`accord status`)."""
        membership = self._membership
        members = membership.detector.members()
        infos = membership.infos
        return {
            "node": self.node_name,
            "pid": membership.me.pid,
            "cluster": self.names.cluster,
            "num_shards": self.config.num_shards,
            "lease_ttl": self.config.lease_ttl,
            "held": self._shards.held(),
            "activations": self._table.count(),
            "inflight": self._bulkhead.total.n,
            "pools": self._pools.status(),
            "agent_types": sorted(self.specs),
            "stats": self._telemetry.stats(),
            "counters": msgspec.structs.asdict(self.stats),
            "metrics_url": self._telemetry.url or None,
            "members": {
                name: {
                    "state": state.value,
                    "shards": infos[name].shards if name in infos else 0,
                    "pid": infos[name].pid if name in infos else None,
                    "labels": infos[name].labels if name in infos else {},
                    "metrics_url": infos[name].metrics_url or None if name in infos else None,
                    "types": infos[name].types if name in infos else [],
                }
                for name, state in members.items()
            },
            "leases": {str(s): [v.node, v.epoch] for s, v in sorted(self._shards.table.items())},
            "history": [msgspec.structs.asdict(t) for t in list(membership.history)[-30:]],
        }

    async def _on_admin(self, msg: Message) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._transport.publish(msg.reply, msgspec.json.encode(self.status()))


class _Hosting:
    """The node as its activations see it (the `Host` protocol): kept apart from `Node` so that
    none of these callbacks shows on the public class. Its parts refer to each other, so the
    callbacks are bound once they all exist (`bind`, before any activation is created)."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop, bulkhead: Bulkhead) -> None:
        self.loop = loop
        self.name = node.node_name
        self.stats: Stats = node.stats
        self.bulkhead = bulkhead
        self.deactivate_timeout = node.settings.deactivate_timeout
        self.observe = node._observe
        self._after_turn: dict[type, AfterTurn] = {}
        self._node = node
        self._hlc = HybridClock()
        self.valid: Callable[[int, int], bool] = _unbound
        self.orphan_epoch: Callable[[int], int | None] = _unbound
        self.merged: Callable[[AgentId, MergeState, str], None] = _unbound
        self.dead_letter: Callable[[bytes, DurableDelivery, AccordError], Awaitable[None]] = (
            _unbound
        )
        self.ended: Callable[[ActivationRef], None] = _unbound
        self.abandon: Callable[[Any, asyncio.Task[Any] | None, bool], None] = _unbound

    def bind(self, node: Node, shards: ShardManager, cutoff: CutOff, inbound: Inbound,
             table: ActivationTable, placement: NodePlacement) -> None:  # fmt: skip
        shard_valid, placed_valid = shards.valid, placement.valid
        self.valid = lambda s, e: shard_valid(s, e) or placed_valid(e)  # shard or agent fence
        self.orphan_epoch = cutoff.orphan_epoch
        self.merged = cutoff.record
        self.dead_letter = inbound.dead_letter
        self.ended = table.ended
        self.abandon = table.abandon
        self._shards = shards
        self._cutoff = cutoff
        if any(VoteRequest in spec.by_class for spec in node.specs.values()):
            self._after_turn[VoteRequest] = functools.partial(_record_vote, node)

    @property
    def after_turn(self) -> Mapping[type, AfterTurn]:
        return self._after_turn

    @property
    def mesh(self) -> Mesh:
        return self._node

    def durable_for(self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int) -> Durable:
        node = self._node
        events = node._events if spec.options.consistency == "event_sourced" else None
        shards, valid = self._shards, self.valid
        durable = Durable(spec, agent_id, epoch, node._store, events,
                          lambda: valid(shard, epoch), self._hlc)  # fmt: skip
        # Activated while cut off (split brain): the state bucket is out of reach.
        cut_off = shards.held_epoch(shard) != epoch and self._cutoff.orphan_epoch(shard) == epoch
        durable.orphaned = cut_off
        return durable


def _unbound(*args: Any) -> Any:
    raise RuntimeError("the node's parts are not bound yet")


async def _record_vote(node: Node, request: VoteRequest, voter: str, result: Any) -> None:
    """A voter agent's vote handler returned: record its vote, decide if that settles it."""
    if not isinstance(result, bool):
        raise TypeError(f"a VoteRequest handler must return bool, got {type(result).__name__}")
    await node._ballots().vote(request.proposal_id, voter, result, node.node_name)


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
