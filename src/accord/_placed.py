"""A client's copy of the placement overrides (cluster/_overrides.py), so that its asks and
tells for an agent placed by override go straight to that agent's node instead of through the
shard's owner, which would relay them (one hop more). A node does the same with its own table
(runtime/_placement.py)."""

from __future__ import annotations

from typing import Any

from ._ids import AgentId
from .cluster._overrides import Overrides, Placed, place_subject


def route_placed(mesh: Any) -> None:
    """Watch the overrides of `mesh`'s cluster and route by them (a plain client's `Mesh`).

    A node that went away leaves its override until its shard's owner places the agent anew;
    meanwhile the sender's first attempt draws "no responders" and it falls back to the
    shard's subject, as it does for a node's table."""
    buckets = mesh._buckets
    if buckets is None:
        return
    overrides = Overrides(buckets.leases, mesh._bg)
    prefix = mesh.names.prefix
    by_id: dict[AgentId, str] = {}

    def changed(agent: str, placed: Placed | None) -> None:
        try:
            aid = AgentId.parse(agent)
        except Exception:
            return
        if placed is None:
            by_id.pop(aid, None)
        else:
            by_id[aid] = placed.node

    def place(agent_id: AgentId, shard: int) -> str | None:
        node = by_id.get(agent_id) if by_id else None
        return None if node is None else place_subject(prefix, node, shard)

    overrides.on_change = changed
    overrides.start()
    mesh._sender.place = place
