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
from .._observe import Kind, Observer, Outcome
from .._spec import AgentSpec
from ..cluster._graph import AgentLoad, CommGraph
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


class Loads(msgspec.Struct, frozen=True):
    """What load-aware rebalancing reads: an agent's load is its messages/s plus
    `turn_weight` x its handlers' turn milliseconds/s (`load_of`); a node's is the load of
    the agents on it plus `base`, the load it reported that no movable agent accounts for."""

    agents: dict[str, float]
    base: dict[str, float] = msgspec.field(default_factory=dict)


def load_of(turns_per_s: float, turn_seconds_per_s: float, settings: PlacementSettings) -> float:
    return turns_per_s + settings.turn_weight * 1000.0 * turn_seconds_per_s


def plan(
    edges: list[tuple[str, str, float]],
    where: Mapping[str, str],
    nodes: list[str],
    movable: Callable[[str, str], bool],
    settings: PlacementSettings,
    recently_moved: set[str],
    loads: Loads | None = None,
) -> list[Planned]:
    """One round's moves. `edges`: (a, b, messages/s) in either direction; `where`: agent ->
    node for every known agent (also those without edges: they count for load); `movable(agent,
    node)`: may that agent go there (type hosted, not `movable=False`); `loads`: the measured
    load per agent and per node (None: counts only).

    Co-location: an agent's gain for a node is its traffic with partners there minus its
    traffic with partners on its own node; moves with gain above `min_gain` are taken greedily,
    heaviest first, each to whichever side of the pair is less loaded, keeping every node at or
    below mean + max(tolerance x mean, slack) agents and (when it adds load) mean +
    max(load_tolerance x mean, load_slack) load. Then rebalancing by count: a node above the
    count bound hands its least-connected agents to the least loaded node; then by load: a
    node above the load bound hands its least-connected agents, heaviest first, to the least
    loaded node, each only if it narrows the gap between the two (no agent whose load is above
    half the gap moves: that would only move the hot spot, nor one whose traffic with partners
    on its node exceeds `min_gain`: co-location would bring it back). At most
    `max_move_fraction` of the agents move; none moved in the last `hold_rounds` rounds moves
    again (hysteresis).
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
    aload = loads.agents if loads is not None else {}
    load = {n: loads.base.get(n, 0.0) if loads is not None else 0.0 for n in nodes}
    for agent, node in loc.items():
        if node in load:
            load[node] += aload.get(agent, 0.0)
    lmean = sum(load.values()) / len(nodes)
    lbound = lmean + max(settings.load_tolerance * lmean, settings.load_slack)
    budget = max(1, int(settings.max_move_fraction * len(loc)))
    out: list[Planned] = []
    moved: set[str] = set()

    def gain(agent: str, node: str) -> tuple[float, list[str]]:
        there = [(b, r) for b, r in adj[agent].items() if loc.get(b) == node]
        here = sum(r for b, r in adj[agent].items() if loc.get(b) == loc[agent])
        return sum(r for _, r in there) - here, [b for b, _ in there]

    def fits(agents: list[str], node: str) -> bool:
        """Room for `agents` on `node`: the count bound, and the load bound if they add load."""
        extra = sum(aload.get(a, 0.0) for a in agents)
        return count[node] + len(agents) <= bound and (extra <= 0.0 or load[node] + extra <= lbound)

    def go(agent: str, node: str, g: float, why: str) -> None:
        r = aload.get(agent, 0.0)
        count[loc[agent]] -= 1
        load[loc[agent]] -= r
        count[node] += 1
        load[node] += r
        loc[agent] = node
        moved.add(agent)
        out.append(Planned(agent, node, round(g, 3), why))

    def free(agent: str) -> bool:
        return agent not in moved and agent not in recently_moved

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
        if not free(agent):
            continue
        options = []
        for node in {loc[b] for b in adj[agent]} - {loc[agent]}:  # recomputed: partners move
            g, partners = gain(agent, node)
            if g > settings.min_gain and movable(agent, node) and fits([agent], node):
                options.append((g, -count[node], agent, node, partners))
            # The other way round: the partners come here, if that leaves loads more even.
            home = loc[agent]
            mates = [b for b in partners if free(b)]
            if mates and len(mates) == len(partners) and fits(mates, home):
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

    def ties(agent: str) -> float:  # its traffic with partners on its node: lost by a move
        return sum(r for b, r in adj[agent].items() if loc.get(b) == loc[agent])

    # Rebalancing by count: a node above the bound sheds its least-connected, idlest agents.
    for node in sorted(nodes, key=lambda n: -count[n]):
        while count[node] > bound and len(out) < budget:
            coldest = min(nodes, key=lambda n: count[n])
            if coldest == node:
                break
            mine = [a for a, n in loc.items() if n == node and free(a)
                    and movable(a, coldest) and fits([a], coldest)]  # fmt: skip
            if not mine:
                break
            agent = min(mine, key=lambda a: (ties(a), aload.get(a, 0.0), a))
            go(agent, coldest, 0.0, f"rebalance: {node} over {bound:.0f} agents")
    # Rebalancing by load: the hottest node hands agents to the least loaded one.
    for node in sorted(nodes, key=lambda n: -load[n]):
        while load[node] > lbound and len(out) < budget:
            coldest = min(nodes, key=lambda n: load[n])
            room = (load[node] - load[coldest]) / 2
            if coldest == node or count[coldest] + 1 > bound:
                break
            # Not an agent tied to partners here: co-location would bring it back (thrash).
            mine = [a for a, n in loc.items() if n == node and free(a)
                    and 0.0 < aload.get(a, 0.0) <= room and ties(a) <= settings.min_gain
                    and movable(a, coldest)]  # fmt: skip
            if not mine:
                break
            agent = min(mine, key=lambda a: (ties(a), -aload[a], a))
            go(agent, coldest, 0.0,
               f"rebalance: {node} load {load[node]:.0f} over {lbound:.0f}")  # fmt: skip
    return out


def movable_types(
    own: Mapping[str, AgentSpec], reported: list[Mapping[str, bool]]
) -> dict[str, bool]:
    """Agent type -> may the decider move its agents: known from this node's specs and from
    every node's report (`types`: its hosted types and whether each is movable). A type
    marked `movable=False` (or a worker pool) anywhere is not moved; a type no answer names is
    absent, and the decider does not move an agent of a type it knows nothing of."""
    out = {t: spec.options.movable and not spec.stateless for t, spec in own.items()}
    for types in reported:
        for t, ok in types.items():
            out[t] = out.get(t, True) and bool(ok)
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
        self.load = AgentLoad()
        self.turns = _TurnLoad(self.load)  # the observer that feeds `load` (node registers it)
        self._round = 0
        self._moved_in: dict[str, int] = {}  # agent -> round it was last moved by a decision
        self._hosts: dict[str, list[str]] = {}  # agent type -> live hosts, for one round
        self._types: dict[str, bool] = {}  # agent type -> movable, for one round
        migrator.report = self.report

    def observe(self, destination: AgentId, local: bool) -> None:
        """An at-most-once message from this process to `destination` (the route hook)."""
        source = current_sender.get()
        if source is not None:
            self.graph.record(source, destination, local)
            self.load.sent(source)

    def report(self) -> dict[str, Any]:
        agents = [
            str(a) for a, act in self._table.live.items()
            if act.spec.options.movable and not act.spec.stateless and not act.orphan
        ]  # fmt: skip
        moves = [msgspec.structs.asdict(m) for m in self._migrator.moves]
        rows, turns, busy = self.load.export()
        types = {t: s.options.movable and not s.stateless for t, s in self._specs.items()}
        return {"node": self._p.me, "edges": self.graph.export(), "agents": agents[:20_000],
                "moves": moves, "types": types,
                "load": {"agents": rows, "turns": turns, "busy": busy}}  # fmt: skip

    def start(self) -> None:
        self._bg.spawn(self._decay(), name="accord-graph-decay")
        if self._adaptive:
            self._bg.spawn(self._decide(), name="accord-colocation")

    async def _decay(self) -> None:
        while True:
            await asyncio.sleep(self.settings.graph.decay_every)
            self.graph.tick()
            self.load.tick()
            try:
                await self._migrator.compact(self.settings.compact_per_round)
            except AccordError as exc:
                log.info("override compaction deferred: %s", exc)

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
        types: list[Mapping[str, bool]] = []
        measured: dict[str, tuple[float, list[list[Any]]]] = {}  # node -> (total, per agent)
        s = self.settings
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, BaseException):
                continue
            for agent in answer.get("agents", ()):
                where[agent] = node
            edges.extend((e[0], e[1], float(e[3])) for e in answer.get("edges", ()))
            types.append(answer.get("types", {}))
            load = answer.get("load", {})
            total = load_of(float(load.get("turns", 0.0)), float(load.get("busy", 0.0)), s)
            measured[node] = (total, load.get("agents", []))
        loads = _loads(measured, where, s)
        for a, b, _ in edges:  # partners not active now: where their shard or override puts them
            for agent in (a, b):
                if agent not in where:
                    at = self._locate(agent)
                    if at is not None and at in nodes:
                        where[agent] = at
        hold = self.settings.hold_rounds
        recent = {a for a, r in self._moved_in.items() if self._round - r < hold}
        self._hosts.clear()
        self._types = movable_types(self._specs, types)
        planned = plan(edges, where, nodes, self._movable, self.settings, recent, loads)
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
        if not self._types.get(agent_type, False):
            return False  # opted out, a worker pool, or a type no node told the decider of
        hosts = self._hosts.get(agent_type)
        if hosts is None:
            hosts = self._hosts[agent_type] = self._migrator.hosts(agent_type)
        return node in hosts


class _TurnLoad(Observer):
    """Every turn of this node, by agent: an activation's turns run in its own task, where
    `current_sender` names the agent (`_activation.py`), so the observer needs no agent id."""

    def __init__(self, load: AgentLoad) -> None:
        self._load = load

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        agent = current_sender.get()
        if agent is not None:
            self._load.record(agent, seconds)


def _loads(
    measured: Mapping[str, tuple[float, list[list[Any]]]],
    where: Mapping[str, str],
    settings: PlacementSettings,
) -> Loads:
    """Per agent: the sum of what every node measured of it (an agent that moved within the
    window is counted by both nodes, each for its part). Per node: its total less the agents
    it reported that the decider may move (the rest: pools, pinned types, agents beyond the
    report's limit) stays as its base load wherever the movable agents go."""
    agents: dict[str, float] = {}
    base: dict[str, float] = {}
    for node, (total, rows) in measured.items():
        own = 0.0
        for agent, turns, busy in rows:
            r = load_of(float(turns), float(busy), settings)
            if agent in where:
                agents[agent] = agents.get(agent, 0.0) + r
                own += r
        base[node] = max(0.0, total - own)
    return Loads(agents, base)
