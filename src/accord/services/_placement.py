"""Where each replica of a service runs: pure functions of the spec, the live nodes and the
current assignment, so the controller's decisions are reproducible and every slot carries the
reason it is where it is (`accord services explain`).

Stability first: a slot whose node is still alive and eligible stays there. Only empty slots (new
service, more replicas, node died) are filled, by policy:

- `horizontal`: distinct nodes, zones with fewest replicas of the service first;
- `failover`: slot 0 is the primary, slot 1 the standby, on distinct nodes; when the primary's node
  dies the standby is promoted and a new standby chosen;
- `cost`: cheapest node (label `cost`, default 1) with capacity left, packing replicas together;
- `geo`: like horizontal but only on the pinned zone, or spreading strictly over zones.

Ties are broken by reputation (kept-promise ratio of the node), then load, then name.
"""

from __future__ import annotations

import math

import msgspec

from ._spec import ServiceSpec


class NodeView(msgspec.Struct, frozen=True):
    name: str
    labels: dict[str, str] = {}
    reputation: float = 1.0

    @property
    def zone(self) -> str:
        return self.labels.get("zone", "")

    @property
    def cost(self) -> float:
        return _number(self.labels.get("cost"), 1.0)

    @property
    def cpu(self) -> float:
        return _number(self.labels.get("cpu"), math.inf)

    @property
    def memory(self) -> float:
        return _number(self.labels.get("memory"), math.inf)


class Slot(msgspec.Struct):
    index: int
    node: str | None
    role: str  # "replica" | "primary" | "standby"
    reason: str


def _number(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default


def eligible(spec: ServiceSpec, nodes: list[NodeView]) -> list[NodeView]:
    """Nodes that may host a replica at all (zone pin, capacity labels)."""
    out = []
    for n in nodes:
        if spec.placement.policy == "geo" and spec.placement.zone and n.zone != spec.placement.zone:
            continue
        if n.cpu < spec.resources.cpu or n.memory < spec.resources.memory:
            continue
        out.append(n)
    return out


def conflicts(spec: ServiceSpec, nodes: list[NodeView], others: list[ServiceSpec]) -> list[str]:
    """Reasons the spec cannot be promised as written; empty when it can."""
    out: list[str] = []
    ok = eligible(spec, nodes)
    distinct = spec.placement.policy in ("horizontal", "geo")
    if distinct and spec.replicas > len(ok):
        where = f" in zone {spec.placement.zone!r}" if spec.placement.zone else ""
        out.append(
            f"{spec.replicas} replicas on distinct nodes promised, but only {len(ok)} live "
            f"node(s){where} are eligible ({', '.join(n.name for n in ok) or 'none'})"
        )
    if not ok:
        out.append("no live node is eligible (zone pin or resources exceed every node's labels)")
    for other in others:
        if other.name == spec.name:
            continue
        if spec.port and other.port == spec.port and (spec.single_instance or other.single_instance
                                                      or spec.slots + other.slots > 1):  # fmt: skip
            out.append(f"port {spec.port} is already promised to service {other.name!r}")
        if spec.host and other.host == spec.host and spec.path_prefix == other.path_prefix:
            out.append(f"route host={spec.host} prefix={spec.path_prefix} is {other.name!r}'s")
        if (
            spec.path_prefix
            and not spec.host
            and not other.host
            and spec.path_prefix == other.path_prefix
        ):
            out.append(f"path prefix {spec.path_prefix!r} is already routed to {other.name!r}")
    return out


def place(
    spec: ServiceSpec,
    nodes: list[NodeView],
    current: list[Slot],
    used: dict[str, tuple[float, float]] | None = None,
    running: frozenset[str] = frozenset(),
) -> list[Slot]:
    """The new assignment of every slot of `spec`. `used` is (cpu, memory) already taken per node
    by other services' replicas (for capacity checks); `running` names the nodes where the
    service is healthy now (a failover standby that took the lease becomes the primary)."""
    used = dict(used or {})
    ok = {n.name: n for n in eligible(spec, nodes)}
    live = {n.name for n in nodes}
    old = {s.index: s for s in current}
    slots: list[Slot | None] = [None] * spec.slots

    if spec.placement.policy == "failover":
        _failover_keep(spec, old, ok, live, slots, running)
    else:
        for i in range(spec.slots):
            s = old.get(i)
            if s is not None and s.node in ok:
                slots[i] = Slot(i, s.node, "replica", s.reason)
        _spread_again(spec, slots, ok)
    for s in slots:
        if s is not None and s.node is not None:
            _take(used, s.node, spec)

    for i in range(spec.slots):
        if slots[i] is not None:
            continue
        role = _role(spec, i)
        taken = {s.node for s in slots if s is not None and s.node is not None}
        prev = old.get(i)
        why_moved = (
            f" (node {prev.node} is gone)" if prev is not None and prev.node not in live else ""
        )
        node, reason = _choose(spec, list(ok.values()), taken, slots, used)
        if node is not None:
            _take(used, node, spec)
        slots[i] = Slot(i, node, role, reason + why_moved)
    return [s for s in slots if s is not None]


def _spread_again(spec: ServiceSpec, slots: list[Slot | None], ok: dict[str, NodeView]) -> None:
    """Once there are enough nodes again, free slots that share a node so they spread out."""
    if spec.placement.policy == "cost":
        return
    seen: set[str] = set()
    used = {s.node for s in slots if s is not None}
    spare = len([n for n in ok if n not in used])
    for i, s in enumerate(slots):
        if s is None or s.node is None:
            continue
        if s.node in seen and spare > 0:
            slots[i] = None
            spare -= 1
        seen.add(s.node)


def _role(spec: ServiceSpec, i: int) -> str:
    if spec.placement.policy != "failover":
        return "replica"
    return "primary" if i == 0 else "standby"


def _failover_keep(
    spec: ServiceSpec,
    old: dict[int, Slot],
    ok: dict[str, NodeView],
    live: set[str],
    slots: list[Slot | None],
    running: frozenset[str],
) -> None:
    primary, standby = old.get(0), old.get(1)
    if (
        primary is not None
        and standby is not None
        and standby.node in running
        and primary.node not in running
        and standby.node in ok
    ):  # the standby took over while the primary was cut off: record what is true
        why = f"standby took over the lease from {primary.node}"
        slots[0] = Slot(0, standby.node, "primary", why)
        if primary.node in ok:
            slots[1] = Slot(1, primary.node, "standby", "former primary, back without its lease")
        return
    if primary is not None and primary.node in ok:
        slots[0] = Slot(0, primary.node, "primary", primary.reason)
        if standby is not None and standby.node in ok and standby.node != primary.node:
            slots[1] = Slot(1, standby.node, "standby", standby.reason)
    elif standby is not None and standby.node in ok:
        gone = primary.node if primary is not None else None
        slots[0] = Slot(0, standby.node, "primary", f"promoted standby: primary node {gone} gone")


def _take(used: dict[str, tuple[float, float]], node: str, spec: ServiceSpec) -> None:
    cpu, mem = used.get(node, (0.0, 0.0))
    used[node] = (cpu + spec.resources.cpu, mem + spec.resources.memory)


def _fits(n: NodeView, spec: ServiceSpec, used: dict[str, tuple[float, float]]) -> bool:
    cpu, mem = used.get(n.name, (0.0, 0.0))
    return cpu + spec.resources.cpu <= n.cpu and mem + spec.resources.memory <= n.memory


def _choose(
    spec: ServiceSpec,
    nodes: list[NodeView],
    taken: set[str],
    slots: list[Slot | None],
    used: dict[str, tuple[float, float]],
) -> tuple[str | None, str]:
    fits = [n for n in nodes if _fits(n, spec, used)]
    if spec.placement.policy == "cost":
        if not fits:
            return None, "no eligible node has capacity left"
        best = min(fits, key=lambda n: (n.cost, -n.reputation, n.name))
        return best.name, f"cheapest node with capacity (cost {best.cost:g})"
    free = [n for n in fits if n.name not in taken]
    if not free:
        if not fits or spec.placement.policy == "failover":
            return None, "no eligible node left with capacity"
        # Fewer live nodes than replicas (a node died): keep the count, share the least-used node.
        mine = {n.name: sum(1 for s in slots if s is not None and s.node == n.name) for n in fits}
        best = min(fits, key=lambda n: (mine[n.name], -n.reputation, n.name))
        return best.name, (
            f"fewer eligible nodes than replicas: sharing {best.name}, which ran "
            f"{mine[best.name]} replica(s) of this service"
        )
    per_zone: dict[str, int] = {}
    zone_of = {n.name: n.zone for n in nodes}
    for s in slots:
        if s is not None and s.node is not None:
            z = zone_of.get(s.node, "")
            per_zone[z] = per_zone.get(z, 0) + 1
    load = {n.name: used.get(n.name, (0.0, 0.0))[0] for n in nodes}
    best = min(
        free,
        key=lambda n: (per_zone.get(n.zone, 0), -n.reputation, load.get(n.name, 0.0), n.name),
    )
    parts = []
    if best.zone:
        parts.append(f"zone {best.zone} had {per_zone.get(best.zone, 0)} replica(s)")
    parts.append(f"reputation {best.reputation:.2f}")
    if spec.placement.policy == "geo" and spec.placement.zone:
        parts.insert(0, f"pinned to zone {spec.placement.zone}")
    return best.name, "spread over distinct nodes: " + ", ".join(parts)
