"""Adaptive placement: every node samples its agents' agent->agent messages into a communication
graph (cluster/_graph.py); with `NodeSettings.adaptive`, one elected decider runs rounds that
gather every node's graph and agents, move chatty agents next to their partners when the gain
outweighs the cost and loads stay within the tolerance, and hand agents from an overloaded node
to the least loaded ones. Moves are live migrations (`_migrate.py`); `plan` is pure code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .._background import Background
from .._context import current_sender
from .._errors import AccordError
from .._ids import AgentId, shard_of
from .._spec import AgentSpec
from ..cluster._graph import CommGraph
from ..cluster._membership import Membership
from ._migrate import Ctl, Migrator
from ._placement import NodePlacement
from ._settings import PlacementSettings
from ._table import ActivationTable

log = logging.getLogger("accord.placement")


class Planned(msgspec.Struct, frozen=True):
    agent: str
    target: str
    gain: float
    reason: str


def plan(
    edges: list[tuple[str, str, float]],
    where: Mapping[str, str],
    nodes: list[str],
    movable: Callable[[str, str], bool],
    settings: PlacementSettings,
    recently_moved: set[str],
) -> list[Planned]:
    """One round's moves. `edges`: (a, b, messages/s) in either direction; `where`: agent ->
    node for every known agent (also those without edges: they count for load); `movable(agent,
    node)`: may that agent go there (type hosted, not `movable=False`).

    Co-location: an agent's gain for a node is its traffic with partners there minus its
    traffic with partners on its own node; moves with gain above `min_gain` are taken greedily,
    heaviest first, each to whichever side of the pair is less loaded, keeping every node at or
    below mean + max(tolerance x mean, slack) agents. Then rebalancing: a node above that bound
    hands its least-connected agents to the least loaded node. At most `max_move_fraction` of
    the agents move; none moved in the last `hold_rounds` rounds moves again (hysteresis).
    """
    loc = dict(where)
    if not nodes or not loc:
        return []
    adj: dict[str, dict[str, float]] = defaultdict(dict)
    for a, b, rate in edges:
        if a == b or a not in loc or b not in loc:
            continue
        adj[a][b] = adj[a].get(b, 0.0) + rate
        adj[b][a] = adj[b].get(a, 0.0) + rate
    count = dict.fromkeys(nodes, 0)
    for node in loc.values():
        if node in count:
            count[node] += 1
    mean = len(loc) / len(nodes)
    bound = mean + max(settings.tolerance * mean, settings.slack)
    budget = max(1, int(settings.max_move_fraction * len(loc)))
    out: list[Planned] = []
    moved: set[str] = set()

    def gain(agent: str, node: str) -> tuple[float, list[str]]:
        there = [(b, r) for b, r in adj[agent].items() if loc.get(b) == node]
        here = sum(r for b, r in adj[agent].items() if loc.get(b) == loc[agent])
        return sum(r for _, r in there) - here, [b for b, _ in there]

    def go(agent: str, node: str, g: float, why: str) -> None:
        count[loc[agent]] -= 1
        count[node] += 1
        loc[agent] = node
        moved.add(agent)
        out.append(Planned(agent, node, round(g, 3), why))

    candidates: list[tuple[float, str, str]] = []
    for agent in adj:
        best: tuple[float, str] | None = None
        for node in {loc[b] for b in adj[agent]} - {loc[agent]}:
            g, _ = gain(agent, node)
            if best is None or g > best[0]:
                best = (g, node)
        if best is not None and best[0] > settings.min_gain:
            candidates.append((best[0], agent, best[1]))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    for _, agent, _node in candidates:
        if len(out) >= budget:
            break
        if agent in moved or agent in recently_moved:
            continue
        options = []
        for node in {loc[b] for b in adj[agent]} - {loc[agent]}:  # recomputed: partners move
            g, partners = gain(agent, node)
            if g > settings.min_gain and movable(agent, node) and count[node] + 1 <= bound:
                options.append((g, -count[node], agent, node, partners))
            # The other way round: the partners come here, if that leaves loads more even.
            home = loc[agent]
            mates = [b for b in partners if b not in moved and b not in recently_moved]
            if mates and len(mates) == len(partners) and count[home] + len(mates) <= bound:
                pair_gain = sum(gain(b, home)[0] for b in mates) / len(mates)
                if pair_gain > settings.min_gain and all(movable(b, home) for b in mates):
                    options.append((g, -count[home], mates[0], home, [agent]))
        if not options:
            continue
        g, _, who, node, partners = max(options, key=lambda o: (o[0], o[1]))
        if who in moved:
            continue
        why = f"gain {g:.2f} msg/s: with {', '.join(sorted(partners)[:3])}"
        go(who, node, g, why)
    # Rebalancing: a node above the bound sheds its least-connected agents.
    for node in sorted(nodes, key=lambda n: -count[n]):
        while count[node] > bound and len(out) < budget:
            coldest = min(nodes, key=lambda n: count[n])
            if count[coldest] + 1 > bound or coldest == node:
                break
            mine = [a for a, n in loc.items() if n == node and a not in moved
                    and a not in recently_moved and movable(a, coldest)]  # fmt: skip
            if not mine:
                break
            agent = min(mine, key=lambda a: (sum(adj[a].values()), a))
            go(agent, coldest, 0.0, f"rebalance: {node} over {bound:.0f} agents")
    return out


class Colocation:
    """The node side: samples messages into the graph, answers the decider's `graph` request,
    decays the graph; with `adaptive`, campaigns to be the decider and runs its rounds."""

    def __init__(
        self,
        mesh: Any,
        migrator: Migrator,
        placement: NodePlacement,
        membership: Membership,
        table: ActivationTable,
        specs: Mapping[str, AgentSpec],
        num_shards: int,
        settings: PlacementSettings,
        adaptive: bool,
        bg: Background,
    ) -> None:
        self._mesh = mesh
        self._migrator = migrator
        self._p = placement
        self._members = membership
        self._table = table
        self._specs = specs
        self._n = num_shards
        self.settings = settings
        self._adaptive = adaptive
        self._bg = bg
        self.graph = CommGraph(settings.graph)
        self._round = 0
        self._moved_in: dict[str, int] = {}  # agent -> round it was last moved by a decision
        self._hosts: dict[str, list[str]] = {}  # agent type -> live hosts, for one round
        migrator.report = self.report

    def observe(self, destination: AgentId, local: bool) -> None:
        """An at-most-once message from this process to `destination` (the route hook)."""
        source = current_sender.get()
        if source is not None:
            self.graph.record(source, destination, local)

    def report(self) -> dict[str, Any]:
        agents = [
            str(a) for a, act in self._table.live.items()
            if act.spec.options.movable and not act.spec.stateless and not act.orphan
        ]  # fmt: skip
        moves = [msgspec.structs.asdict(m) for m in self._migrator.moves]
        return {"node": self._p.me, "edges": self.graph.export(), "agents": agents[:20_000],
                "moves": moves}  # fmt: skip

    def start(self) -> None:
        self._bg.spawn(self._decay(), name="accord-graph-decay")
        if self._adaptive:
            self._bg.spawn(self._decide(), name="accord-colocation")

    async def _decay(self) -> None:
        while True:
            await asyncio.sleep(self.settings.graph.decay_every)
            self.graph.tick()

    async def _decide(self) -> None:
        async for term in self._mesh.election("accord-placement", ttl=5):
            log.info("%s decides placement", self._p.me)
            while term.valid:
                await asyncio.sleep(self.settings.round_interval)
                if not term.valid:
                    break
                try:
                    await self.run_round()
                except AccordError as exc:
                    log.warning("placement round failed: %s", exc)
                except Exception:
                    log.exception("placement round failed")

    async def run_round(self) -> list[Planned]:
        """Gather every live node's graph and agents, plan, and move (bounded concurrency)."""
        self._round += 1
        nodes = self._members.live()
        answers = await asyncio.gather(
            *(self._migrator.ctl(n, Ctl("graph"), timeout=5.0) for n in nodes),
            return_exceptions=True,
        )
        edges: list[tuple[str, str, float]] = []
        where: dict[str, str] = {}
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, BaseException):
                continue
            for agent in answer.get("agents", ()):
                where[agent] = node
            edges.extend((e[0], e[1], float(e[3])) for e in answer.get("edges", ()))
        for a, b, _ in edges:  # partners not active now: where their shard or override puts them
            for agent in (a, b):
                if agent not in where:
                    at = self._locate(agent)
                    if at is not None and at in nodes:
                        where[agent] = at
        hold = self.settings.hold_rounds
        recent = {a for a, r in self._moved_in.items() if self._round - r < hold}
        self._hosts.clear()
        planned = plan(edges, where, nodes, self._movable, self.settings, recent)
        sem = asyncio.Semaphore(8)

        async def move(p: Planned) -> None:
            async with sem:
                with contextlib.suppress(AccordError):
                    await self._migrator.ctl(
                        "any", Ctl("migrate", p.agent, node=p.target, reason=p.reason),
                        timeout=30.0,
                    )  # fmt: skip
                    self._moved_in[p.agent] = self._round

        t0 = time.monotonic()
        await asyncio.gather(*(move(p) for p in planned))
        if planned:
            log.info("placement round %d: %d moves in %.2fs", self._round, len(planned),
                     time.monotonic() - t0)  # fmt: skip
        return planned

    def _locate(self, agent: str) -> str | None:
        placed = self._p.overrides.get(agent)
        if placed is not None:
            return placed.node
        lease = self._p.shards.table.get(shard_of(agent, self._n))
        return lease.node if lease is not None else None

    def _movable(self, agent: str, node: str) -> bool:
        agent_type = agent.split("/", 1)[0]
        spec = self._specs.get(agent_type)
        if spec is not None and (not spec.options.movable or spec.stateless):
            return False  # opted out, or a worker pool (served by every hosting node)
        hosts = self._hosts.get(agent_type)
        if hosts is None:
            hosts = self._hosts[agent_type] = self._migrator.hosts(agent_type)
        return node in hosts
