"""The cluster as one node sees it (`accord status`), asked of any node over the admin subject;
the node side is `Node.status()`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import NotConnected

if TYPE_CHECKING:
    from ._mesh import Mesh


async def cluster_status(
    mesh: Mesh, timeout: float = 2.0, *, replication: bool = True
) -> dict[str, Any]:
    """The cluster as one node sees it: nodes (alive, shards held), shard owners and epochs, and
    recent failure-detector transitions, worker pools per node. Shape: {"nodes": [...],
    "shards": [...], "history": [...], "replication": {...}, "pools": {type: {node: {...}}}}.
    `replication=False` leaves out the replicas of every bucket and stream (many JetStream
    requests; "replication" is then None), for a caller that polls often.

    Raises `NotConnected` when no node answers.
    """
    data = await mesh._sender.transport_request(mesh.names.admin_subject, b"{}", timeout)
    view = msgspec.json.decode(data)
    owners: dict[str, int] = {}
    for owner, _epoch in view["leases"].values():
        owners[owner] = owners.get(owner, 0) + 1
    nodes = [
        {
            "name": name,
            "alive": m["state"] in ("alive", "suspect"),
            "state": m["state"],
            "shards": owners.get(name, 0),
            "pid": m["pid"],
            "labels": m["labels"],
            "metrics_url": m.get("metrics_url"),
            "types": m.get("types", []),
        }
        for name, m in sorted(view["members"].items())
    ]
    shards = [
        {"shard": int(s), "owner": owner, "epoch": epoch}
        for s, (owner, epoch) in sorted(view["leases"].items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "cluster": view["cluster"],
        "num_shards": view["num_shards"],
        "lease_ttl": view["lease_ttl"],
        "reporter": view["node"],
        "nodes": nodes,
        "shards": shards,
        "history": view["history"],
        "replication": await _replication(mesh) if replication else None,
        "pools": await _pools(mesh, view, [n["name"] for n in nodes if n["alive"]], timeout),
    }


async def _pools(
    mesh: Mesh, view: dict[str, Any], alive: list[str], timeout: float
) -> dict[str, dict[str, Any]]:
    """Worker pools: per type, per node, its `max_concurrency`, in-flight count and counters,
    asked of every live node (none asked when the reporter hosts no pool: nodes host the same
    types). A node that does not answer is left out."""
    if not view.get("pools"):
        return {}

    async def one(node: str) -> tuple[str, dict[str, Any]]:
        subject = f"{mesh.names.admin_subject}.{node}"
        try:
            data = await mesh._sender.transport_request(subject, b"{}", timeout)
        except NotConnected:
            return node, {}
        return node, msgspec.json.decode(data).get("pools") or {}

    pools: dict[str, dict[str, Any]] = {}
    for node, per_type in await asyncio.gather(*(one(n) for n in alive)):
        for agent_type, counts in per_type.items():
            pools.setdefault(agent_type, {})[node] = counts
    return pools


async def _replication(mesh: Mesh) -> dict[str, Any]:
    """Replicas of every bucket and stream against the stored factor, read from JetStream now
    (not from a node's last check); {"error": ...} when JetStream does not answer."""
    from .cluster._replication import replication_status
    from .engine._admin import NatsAdmin

    transport: Any = mesh._transport
    admin = NatsAdmin(transport.nc, transport.js, mesh.names.bucket("meta"))
    try:
        return await replication_status(admin, mesh.names.cluster)
    except NotConnected as exc:
        return {"error": str(exc)}
