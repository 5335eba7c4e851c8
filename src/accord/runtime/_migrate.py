"""Live migration and type-aware placement, run by the owner of an agent's shard (the one node
that writes that agent's override, so moves of one agent never race). A move holds the agent's
new messages, drains and deactivates its activation where it runs (its state is persisted by its
turns and its graceful deactivation), writes the override by compare-and-set (the new epoch),
has the target activate it, then lets the held messages go to the target.

Control requests (JSON) go to `<prefix>.placectl.<node>`, or `.any` (any node; forwarded to the
shard's owner): `migrate`, `release`, `adopt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .._background import Background
from .._errors import AccordError, AgentTypeNotFound, ConfigurationError, Contention
from .._ids import AgentId
from .._spec import AgentSpec
from ..cluster._config import Names
from ..cluster._detector import State
from ..cluster._membership import Membership
from ..cluster._overrides import Placed
from ..cluster._placement import assign
from ..engine._api import Delivery, Engine, Message, NoResponders, RequestTimeout, WrongRevision
from ._placement import NodePlacement
from ._table import ActivationTable

log = logging.getLogger("accord.placement")


class Move(msgspec.Struct, frozen=True):
    """One move, as `accord topology` shows it."""

    at: float  # wall clock
    agent: str
    source: str
    target: str
    reason: str
    epoch: int


class Ctl(msgspec.Struct, frozen=True, omit_defaults=True):
    op: str  # "migrate" | "release" | "adopt" | "graph"
    agent: str = ""
    node: str = ""
    rev: int = 0
    reason: str = ""
    forwarded: bool = False


def ctl_subject(names: Names, node: str) -> str:
    return f"{names.prefix}.placectl.{node}"


def pick_host(agent: str, nodes: list[str]) -> str:
    """Rendezvous choice of a node for `agent` among `nodes` (each node picks the same)."""
    return max(
        nodes, key=lambda n: hashlib.blake2b(f"{agent}:{n}".encode(), digest_size=8).digest()
    )


class Migrator:
    def __init__(
        self,
        placement: NodePlacement,
        names: Names,
        transport: Engine,
        membership: Membership,
        table: ActivationTable,
        specs: Mapping[str, AgentSpec],
        resolve: Callable[[str], tuple[AgentId, int]],
        drain_timeout: float,
        sends: Background,
    ) -> None:
        self._p = placement
        self.me = placement.me
        self._names = names
        self._transport = transport
        self._members = membership
        self._table = table
        self._specs = specs
        self._resolve = resolve
        self._drain = drain_timeout
        self._sends = sends
        self.moves: deque[Move] = deque(maxlen=200)
        self._gone_since: dict[str, float] = {}  # node -> when first seen gone (compaction)
        # What `graph` answers (the communication graph and this node's agents, _colocate.py).
        self.report: Callable[[], dict[str, Any]] = lambda: {"edges": [], "agents": []}
        placement.foreign = self.foreign
        placement.host_gone = self._host_gone
        placement.on_moved_away = self._moved_away

    # -- control subject --------------------------------------------------------------------

    async def on_ctl(self, msg: Message) -> None:
        try:
            ctl = msgspec.json.decode(msg.data, type=Ctl)
            result = await self._handle(ctl)
            answer: dict[str, Any] = {"ok": True, **result}
        except AccordError as exc:
            answer = {"ok": False, "code": exc.code, "error": str(exc)}
        except (msgspec.DecodeError, ValueError) as exc:
            answer = {"ok": False, "code": "bad_request", "error": str(exc)}
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._transport.publish(msg.reply, msgspec.json.encode(answer))

    async def _handle(self, ctl: Ctl) -> dict[str, Any]:
        if ctl.op == "graph":
            return self.report()
        aid, shard = self._resolve(ctl.agent)
        if ctl.op == "migrate":
            if self._p.shards.held_epoch(shard) is None:
                owner = self._p.shards.table.get(shard)
                if ctl.forwarded or owner is None:
                    raise Contention(f"shard {shard} of {aid} has no owner right now; retry")
                fwd = msgspec.structs.replace(ctl, forwarded=True)
                return await self.ctl(owner.node, fwd, timeout=self._drain + 10.0)
            epoch = await self.move(aid, ctl.node, ctl.reason or "migrate")
            return {"node": ctl.node, "epoch": epoch}
        if ctl.op == "release":
            await self.release_here(aid, ctl.rev)
            return {}
        if ctl.op == "adopt":  # also: a move that released it here failed, serve it again
            self._p.released.discard(ctl.rev)
            self._p.overrides.set_local(str(aid), Placed(self.me, ctl.rev))
            self._activate(aid, shard, ctl.rev)
            return {}
        raise ConfigurationError(f"unknown placement request {ctl.op!r}")

    async def ctl(self, node: str, ctl: Ctl, timeout: float = 15.0) -> dict[str, Any]:
        try:
            data = await self._transport.request(
                ctl_subject(self._names, node), msgspec.json.encode(ctl), timeout
            )
        except (NoResponders, RequestTimeout):
            raise Contention(f"node {node} did not answer a placement request") from None
        answer = msgspec.json.decode(data)
        if not answer.get("ok"):
            cls = AgentTypeNotFound if answer.get("code") == AgentTypeNotFound.code else Contention
            raise cls(f"{node}: {answer.get('error')}")
        return dict(answer)

    # -- moves ----------------------------------------------------------------------------------

    def hosts(self, agent_type: str) -> list[str]:
        """Live nodes that host `agent_type`."""
        infos = self._members.infos
        out = []
        for n in self._members.live():
            hosted = self._specs if n == self.me else (infos[n].types if n in infos else ())
            if agent_type in hosted:
                out.append(n)
        return out

    async def move(self, aid: AgentId, target: str, reason: str, held: bool = False) -> int:
        """Move `aid` to `target` (this node owns its shard); return its new epoch once it is
        active there. Raises `AgentTypeNotFound` if `target` is not a live host of its type,
        `Contention` if another move of it is under way or a node did not answer (nothing moved,
        or the move completed without the target's confirmation: it then activates on the next
        message). Its messages wait meanwhile (`held`: the caller holds them already); none is
        lost or run twice."""
        if target not in self.hosts(aid.type):
            raise AgentTypeNotFound(f"node {target} is not a live host of {aid.type!r}")
        spec = self._specs.get(aid.type)
        if spec is not None and spec.stateless:
            raise ConfigurationError(f"{aid.type!r} is a worker pool: every hosting node serves it")
        p = self._p
        if aid in p.moving and not held:
            raise Contention(f"{aid} is being moved already")
        agent = str(aid)
        current = p.overrides.get(agent)
        source = current.node if current is not None else self.me
        if current is not None and current.node == target and target in self._members.live():
            return current.revision
        p.hold(aid)
        try:
            if current is None:
                await self._deactivate(aid)
                last = 0
            else:
                last = current.revision
                if current.node == self.me:
                    await self._release(aid, current.revision)
                else:
                    await self._release_remote(agent, current)
            try:
                rev = await p.overrides.write(agent, target, last, reason, timeout=5.0)
            except (WrongRevision, AccordError) as exc:
                if current is not None:  # released for nothing: its node serves it again
                    await self._readopt(agent, current)
                if isinstance(exc, WrongRevision):
                    raise Contention(f"the placement of {aid} changed meanwhile") from None
                raise
            shard = self._resolve(agent)[1]
            if target == self.me:
                self._activate(aid, shard, rev)
            else:
                with contextlib.suppress(Contention):
                    await self.ctl(target, Ctl("adopt", agent, rev=rev))
            self.moves.append(Move(time.time(), agent, source, target, reason, rev))
            log.info("moved %s from %s to %s (epoch %d): %s", aid, source, target, rev, reason)
            return rev
        finally:
            p.unhold(aid)

    async def _release_remote(self, agent: str, current: Placed) -> None:
        """Have the node serving `agent` release it; one that does not answer and is not live
        any more stops on its own within a lease TTL of its last confirmed heartbeat. A live
        one that did not answer may have released it: it is told to serve it again."""
        try:
            await self.ctl(current.node, Ctl("release", agent, rev=current.revision),
                           timeout=self._drain + 5.0)  # fmt: skip
        except Contention:
            if current.node in self._members.live():
                await self._readopt(agent, current)
                raise
            await asyncio.sleep(self._p.ttl)

    async def _readopt(self, agent: str, current: Placed) -> None:
        if current.node == self.me:
            self._p.released.discard(current.revision)
            return
        with contextlib.suppress(Contention):
            await self.ctl(current.node, Ctl("adopt", agent, rev=current.revision), timeout=5.0)

    async def release_here(self, aid: AgentId, rev: int) -> None:
        """Stop serving `aid` under `rev` here (its owner moves it): drain, deactivate."""
        p = self._p
        p.hold(aid)
        try:
            await self._release(aid, rev)
        finally:
            p.unhold(aid)

    async def _release(self, aid: AgentId, rev: int) -> None:
        await self._deactivate(aid)
        self._p.released.add(rev)

    async def _deactivate(self, aid: AgentId) -> None:
        act = self._table.live.get(aid)
        if act is None:
            return
        act.close()
        done, _ = await asyncio.wait({act.task}, timeout=self._drain)
        if not done:
            act.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await act.task

    def _activate(self, aid: AgentId, shard: int, rev: int) -> None:
        spec = self._specs.get(aid.type)
        if spec is not None and self._p.valid(rev):
            self._table.get_or_create(aid, spec, shard, rev)

    def _moved_away(self, aid: AgentId, rev: int) -> None:
        act = self._table.live.get(aid)
        if act is not None and act.epoch == rev:
            act.close()

    # -- a clean stop, and compaction --------------------------------------------------------

    async def hand_back(self, num_shards: int, timeout: float) -> int:
        """This node is stopping: move every agent placed here by override to another live
        host of its type (the node its shard will hash to once this one is gone, when that
        node hosts it), through its shard's owner, as `migrate` does: its turns drain here and
        it is served there at once, not one lease TTL later. Returns how many moved; gives up
        after `timeout` (the rest are re-placed once this node is gone)."""
        mine = [aid for aid, placed in self._p.by_id.items() if placed.node == self.me]
        others = [n for n in self._members.live() if n != self.me]
        if not mine or not others:
            return 0
        owners = assign(num_shards, others)
        sem = asyncio.Semaphore(16)
        moved = 0

        async def one(aid: AgentId) -> None:
            nonlocal moved
            hosts = [n for n in self.hosts(aid.type) if n != self.me]
            if not hosts:
                return
            owner = owners.get(self._resolve(str(aid))[1])
            target = owner if owner in hosts else pick_host(str(aid), hosts)
            ctl = Ctl("migrate", str(aid), node=target, reason="its node stopped")
            async with sem:
                with contextlib.suppress(AccordError):
                    await self.ctl("any", ctl, timeout=timeout)
                    moved += 1

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(a) for a in mine)), timeout)
        log.info("%s handed back %d of %d agents placed on it", self.me, moved, len(mine))
        return moved

    async def compact(self, limit: int) -> int:
        """Remove up to `limit` overrides of shards held here that say no more than the hash:
        those naming this node (the shard's owner, hosting the type), and those naming a node
        long gone (seen dead or left, its membership entry gone, for over 3 lease TTLs: it has
        stopped serving on its own clock; a node this one never saw is not judged). Only when
        the shard's epoch here is above the override's revision, so the agent goes on under a
        higher epoch than any its state was written with (a lower one would be fenced). An
        agent active here under the override drains first (its messages wait), then comes
        back under the shard's epoch."""
        p = self._p
        now = time.monotonic()
        done = 0
        for aid, placed in list(p.by_id.items()):
            if done >= limit:
                break
            here = placed.node == self.me
            gone = self._gone_for(placed.node, now) > 3 * p.ttl
            if not (here or gone) or aid in p.moving or aid.type not in self._specs:
                continue
            epoch = p.shards.serving(self._resolve(str(aid))[1])
            if epoch is None or epoch <= placed.revision:
                continue
            p.hold(aid)
            try:
                if here:
                    await self._release(aid, placed.revision)
                await p.overrides.delete(str(aid), placed.revision, timeout=5.0)
                done += 1
            except WrongRevision:
                pass  # moved meanwhile: the new override stands
            except AccordError:
                if here:
                    p.released.discard(placed.revision)  # not removed: serve it again
                raise
            finally:
                p.unhold(aid)
        if done:
            log.info("%s removed %d placement overrides equal to the hash", self.me, done)
        return done

    def _gone_for(self, node: str, now: float) -> float:
        """Seconds since `node` was first seen here dead or left with no membership entry."""
        state = self._members.state(node)
        if node in self._members.infos or state not in (State.DEAD, State.LEFT):
            self._gone_since.pop(node, None)
            return 0.0
        return now - self._gone_since.setdefault(node, now)

    # -- agents of types not hosted everywhere ----------------------------------------------

    def foreign(self, shard: int, msg: Message | None, dd: Delivery | None, epoch: int) -> bool:
        """A message for an agent whose type this node does not host. The shard's owner places
        the agent on a live node that hosts it (and the message follows it); False when no
        live node hosts it."""
        from .. import _codec as codec

        data = msg.data if msg is not None else dd.data if dd is not None else b""
        try:
            req, _ = codec.decode_request(data)
            aid, _ = self._resolve(req.target)
        except AccordError:
            return False
        p = self._p
        placed = p.by_id.get(aid)
        if (placed is not None and placed.node in self._members.live()) or aid in p.moving:
            if msg is not None:
                p.route(shard, aid, msg, False)
            elif dd is not None:
                p.route_durable(shard, aid, dd, epoch)
            return True
        if p.shards.held_epoch(shard) is None:
            if msg is None:
                return False
            p.relay(msg, self._names.shard_subject(shard))  # the shard's owner places it
            return True
        hosts = self.hosts(aid.type)
        if not hosts:
            return False
        p.hold(aid)
        if msg is not None:
            p.moving[aid].append(lambda: p.redispatch(shard, msg, False))
        elif dd is not None:
            p.moving[aid].append(lambda: p._again(shard, epoch, dd))
        self._sends.spawn(self._place(aid, pick_host(str(aid), hosts), "type hosted there"))
        return True

    def _host_gone(self, aid: AgentId) -> None:
        """`aid` (of a type hosted here) is placed on a node that is gone: place it anew."""
        hosts = self.hosts(aid.type)
        target = self.me if self.me in hosts or not hosts else pick_host(str(aid), hosts)
        self._sends.spawn(self._place(aid, target, "its node left"))

    async def _place(self, aid: AgentId, target: str, reason: str) -> None:
        try:
            await self.move(aid, target, reason, held=True)
        except AccordError as exc:
            log.warning("placing %s on %s failed: %s", aid, target, exc)
            await asyncio.sleep(0.2)  # its held messages come back here: not in a tight loop
            self._p.unhold(aid)


async def start_placement(
    names: Names,
    transport: Engine,
    leases: Any,
    membership: Membership,
    shards: Any,
    table: ActivationTable,
    specs: Mapping[str, AgentSpec],
    resolve: Callable[[str], tuple[AgentId, int]],
    inbound: Any,
    lease_ttl: int,
    drain_timeout: float,
    sends: Background,
    bg: Background,
) -> tuple[NodePlacement, Migrator, list[Any]]:
    """Wire per-agent placement into a node: the watched overrides, the placement subject
    (`<prefix>.place.<node>.<shard>`) and the control subjects. Returns the parts and the
    subscriptions to close."""
    from ..cluster._overrides import Overrides
    from ._placement import place_subject

    overrides = Overrides(leases, bg)
    placement = NodePlacement(membership.me.name, names, transport, overrides, membership,
                              shards, lease_ttl, sends)  # fmt: skip
    migrator = Migrator(placement, names, transport, membership, table, specs, resolve,
                        drain_timeout, sends)  # fmt: skip
    placement.redispatch = inbound.on_request
    placement.redispatch_durable = inbound.on_mailbox
    inbound.placement = placement
    overrides.start()

    def on_placed(msg: Message) -> None:
        try:
            shard = int(msg.subject.rsplit(".", 1)[-1])
        except ValueError:
            return
        inbound.on_request(shard, msg, placed=True)

    me = membership.me.name
    subs = [
        await transport.subscribe_direct(place_subject(names, me, "*"), on_placed),
        await transport.subscribe(ctl_subject(names, me), _spawning(migrator.on_ctl, sends)),
        await transport.subscribe(
            ctl_subject(names, "any"), _spawning(migrator.on_ctl, sends), queue="placectl"
        ),
    ]
    return placement, migrator, subs


def _spawning(fn: Callable[[Message], Any], sends: Background) -> Callable[[Message], Any]:
    """Control requests wait on other nodes: each runs on its own, not in the subscription's
    one-at-a-time loop (a forwarded request would wait behind the one that forwarded it)."""

    async def handler(msg: Message) -> None:
        sends.spawn(fn(msg), name="accord-placectl")

    return handler
