"""The node agent: the always-on part of every node that runs services.

Each node agent
- watches the `placements` bucket and runs (or stops) the replicas assigned to its node;
- campaigns for the services controller. The leader (one at a time, fenced by its lease token)
  turns specs + live nodes into placements (`_placement.place`), records every decision in the
  events stream, and assesses the promises every spec makes (`_verifiers.ServicePromises`);
- keeps a window of the promise ledger to rank nodes by reputation for placement.

It asks its node only what `ServiceHost` offers, and is the `ServiceView` its readers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from typing import Any, Generic, TypeVar

import msgspec

from .._background import Background
from .._errors import AccordError, Fenced
from ..cluster._watched import WatchedKV
from ..engine._api import Message, NoResponders, Refused, RequestTimeout
from ._host import ServiceHost
from ._placement import NodeView, Slot, _take, place
from ._promises import Reputation
from ._spec import ServiceSpec
from ._store import Instance, LogLine, Placement, ServiceStore, decoded
from ._supervisor import Replica
from ._verifiers import NodePromises, ServicePromises

log = logging.getLogger("accord.services")

CONTROLLER_LEASE = "services-controller"
T = TypeVar("T")


class NodeAgent:
    """Runs this node's share of the services; `store` is the node's (it stays open after
    `stop`), `address` is where other nodes reach the replicas that run here."""

    def __init__(self, host: ServiceHost, store: ServiceStore, address: str) -> None:
        self.host = host
        self.store = store
        self.address = address
        self._bg = Background()
        self.specs = WatchedKV(store.specs_kv, self._bg)
        self.placements = WatchedKV(store.placements_kv, self._bg)
        self.instances = WatchedKV(store.instances_kv, self._bg)
        self._specs_view = _Decoded(self.specs, ServiceSpec, "service spec")
        self._placements_view = _Decoded(self.placements, Placement, "placement")
        self._instances_view = _Decoded(self.instances, Instance, "instance")
        self.replicas: dict[tuple[str, int], Replica] = {}
        self.reputation = Reputation()
        self._node_promises = NodePromises(self)
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return self.host.name

    async def start(self) -> None:
        await self.specs.get_all()
        await self.placements.get_all()
        await self.instances.get_all()
        self._ledger_sub = await self.host.subscribe(
            f"{self.store.names.prefix}.ledger.>", self._on_assessment
        )
        self._bg.spawn(self._local_loop(), name="accord-node-agent")
        self._bg.spawn(self._controller_loop(), name="accord-services-controller")
        self._bg.spawn(self._node_promises.run(), name="accord-node-promises")

    async def stop(self) -> None:
        await self._bg.close()
        with contextlib.suppress(Exception):
            await self._ledger_sub.unsubscribe()
        await asyncio.gather(*(r.stop() for r in self.replicas.values()), return_exceptions=True)
        for r in self.replicas.values():
            with contextlib.suppress(AccordError):
                await self.store.drop_instance(r.inst)
        self.replicas.clear()

    # -- views ----------------------------------------------------------------------------------

    def current_specs(self) -> dict[str, ServiceSpec]:
        return self._specs_view.current()

    def current_placements(self) -> dict[str, Placement]:
        return self._placements_view.current()

    def current_instances(self) -> list[Instance]:
        return list(self._instances_view.current().values())

    def live_nodes(self) -> list[NodeView]:
        out = []
        for name in sorted(self.host.live()):
            info = self.host.info(name)
            if info is None or info.status != "up":
                continue
            out.append(NodeView(name, dict(info.labels), self.reputation.of(f"node/{name}")))
        return out

    def healthy(self, service: str) -> list[Instance]:
        """Healthy replicas of `service` on live nodes that the placement still assigns."""
        live = set(self.host.live())
        p = self.current_placements().get(service)
        assigned = {s.node for s in p.slots} if p is not None else set()
        return [
            i
            for i in self.current_instances()
            if i.service == service
            and i.status == "healthy"
            and i.node in live
            and i.node in assigned
            and i.port is not None
        ]

    def lost(self, service: str) -> list[Instance]:
        """Replicas of `service` last reported healthy by a node that is no longer alive (their
        records outlive the node by up to the instance TTL)."""
        live = set(self.host.live())
        return [
            i
            for i in self.current_instances()
            if i.service == service and i.status == "healthy" and i.node not in live
        ]

    # -- local reconciliation -----------------------------------------------------------------

    async def _local_loop(self) -> None:
        while True:
            try:
                await self._reconcile_local()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node agent reconcile failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25)
            self._wake.clear()

    async def _reconcile_local(self) -> None:
        specs = self.current_specs()
        wanted: dict[tuple[str, int], tuple[ServiceSpec, Slot]] = {}
        for name, p in self.current_placements().items():
            spec = specs.get(name)
            if spec is None:
                continue
            for slot in p.slots:
                if slot.node == self.name:
                    key = (name, -1) if spec.fenced else (name, slot.index)
                    if key not in wanted or slot.role == "primary":
                        wanted[key] = (spec, slot)
        for key, r in list(self.replicas.items()):
            target = wanted.get(key)
            if target is None or target[0] != r.spec:
                del self.replicas[key]
                await r.stop()
                with contextlib.suppress(AccordError):
                    await self.store.drop_instance(r.inst)
        for key, (spec, slot) in wanted.items():
            running = self.replicas.get(key)
            if running is not None:
                running.inst.role, running.inst.index = slot.role, slot.index
                continue
            self.replicas[key] = r = self._replica(spec, slot)
            r.start()

    def _replica(self, spec: ServiceSpec, slot: Slot) -> Replica:
        lease = None
        may_campaign = _always
        if spec.fenced:

            def lease() -> contextlib.AbstractAsyncContextManager[Any]:
                ttl = spec.lease_ttl
                return self.host.lease(f"svc.{spec.name}", ttl=ttl, timeout=ttl + 1.0)

            def may_campaign() -> bool:
                p = self.current_placements().get(spec.name)
                if p is None:
                    return False
                primary = next((s.node for s in p.slots if s.role == "primary"), None)
                return primary == self.name or primary not in self.host.live()

        return Replica(
            spec,
            slot.index,
            slot.role,
            self.name,
            self.address,
            self.store.put_instance,
            self._log,
            lease=lease,
            may_campaign=may_campaign,
            fenced=spec.fenced,
        )

    async def _log(self, line: LogLine) -> None:
        subject = f"{self.store.names.prefix}.logs.{line.service}"
        with contextlib.suppress(Exception):  # buffered by the client; lost only if NATS is away
            await self.host.publish(subject, msgspec.json.encode(line))

    async def _on_assessment(self, msg: Message) -> None:
        a = decoded(_ASSESSED, msg.data, "ledger")
        if a is not None:
            self.reputation.add(a)

    # -- the controller -----------------------------------------------------------------------

    async def _controller_loop(self) -> None:
        while True:
            try:
                async for term in self.host.election(CONTROLLER_LEASE, ttl=2):
                    log.info("%s leads the services controller (token %d)", self.name,
                             term.token)  # fmt: skip
                    promises = ServicePromises(self)
                    # A new leader's failure detector may be stale (it may just have rejoined):
                    # let it hear every live node's heartbeats before it moves anything.
                    settle = time.monotonic() + self.host.dead_after + 0.5
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(term.lost.wait(), settle - time.monotonic())
                    while term.valid:
                        try:
                            await self._control(term.token)
                            await promises.assess(term)
                        except Fenced:
                            break
                        except AccordError as exc:
                            log.warning("controller: %s", exc)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(term.lost.wait(), 0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("controller campaign failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _control(self, token: int) -> None:
        specs = self.current_specs()
        placements = self.current_placements()
        nodes = self.live_nodes()
        if not self.host.live():
            return
        used: dict[str, tuple[float, float]] = {}
        for name in sorted(specs):
            spec = specs[name]
            old = placements.get(name)
            running = frozenset(i.node for i in self.healthy(name))
            slots = place(spec, nodes, old.slots if old else [], used, running)
            for s in slots:
                if s.node is not None:
                    _take(used, s.node, spec)
            gen = zlib.crc32(self.specs._data.get(name, b""))
            if old is not None and old.generation == gen and _same(old.slots, slots):
                continue
            now = time.time()
            first = old.first_at or old.at if old is not None else now
            p = Placement(name, gen, slots, token, self.name, now, first)
            await self.store.write_placement(p, token)
            self.placements.set_local(name, msgspec.json.encode(p))
            await self._record_decision(p, old)
        for name in set(placements) - set(specs):
            await self.store.drop_placement(name)
            self.placements._data.pop(name, None)

    async def _record_decision(self, p: Placement, old: Placement | None) -> None:
        log.info("placement of %s: %s", p.service,
                 ", ".join(f"{s.index}->{s.node} ({s.reason})" for s in p.slots))  # fmt: skip
        event = {
            "kind": "placement",
            "service": p.service,
            "by": p.decided_by,
            "token": p.token,
            "at": p.at,
            "slots": [msgspec.to_builtins(s) for s in p.slots],
            "previous": [msgspec.to_builtins(s) for s in old.slots] if old else [],
        }
        with contextlib.suppress(AccordError, RequestTimeout, NoResponders, Refused):
            await self.store.js.append(
                self.store.names.events_subject("placement"), msgspec.json.encode(event)
            )


class _Decoded(Generic[T]):
    """A typed view of a watched bucket that decodes only the entries that changed."""

    def __init__(self, watched: WatchedKV, typ: type[T], what: str) -> None:
        self._watched = watched
        self._what = what  # names the source when a malformed entry is logged
        self._dec = msgspec.json.Decoder(typ)
        self._cache: dict[str, tuple[bytes, T]] = {}

    def current(self) -> dict[str, T]:
        data = self._watched._data
        out: dict[str, T] = {}
        for key, raw in data.items():
            hit = self._cache.get(key)
            if hit is not None and hit[0] is raw:
                out[key] = hit[1]
                continue
            value = decoded(self._dec, raw, self._what)
            if value is None:
                continue
            self._cache[key] = (raw, value)
            out[key] = value
        if len(self._cache) > len(out):
            self._cache = {k: v for k, v in self._cache.items() if k in out}
        return out


class _Assessed(msgspec.Struct):
    promiser: str
    outcome: str
    at: float


_ASSESSED = msgspec.json.Decoder(_Assessed)


def _always() -> bool:
    return True


def _same(a: list[Slot], b: list[Slot]) -> bool:
    return [(s.index, s.node, s.role) for s in a] == [(s.index, s.node, s.role) for s in b]
