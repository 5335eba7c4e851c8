"""What a node reports about itself and its view of the cluster (`accord status`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import NotConnected

if TYPE_CHECKING:
    from ._mesh import Mesh
    from ._node import Node


def node_status(node: Node) -> dict[str, Any]:
    members = node.membership.detector.members()
    infos = node.membership.infos
    return {
        "node": node.node_name,
        "pid": node.membership.me.pid,
        "cluster": node.names.cluster,
        "num_shards": node.config.num_shards,
        "lease_ttl": node.config.lease_ttl,
        "held": node.shards.held(),
        "activations": node.activation_count(),
        "agent_types": sorted(node.specs),
        "stats": msgspec.structs.asdict(node.stats),
        "members": {
            name: {
                "state": state.value,
                "shards": infos[name].shards if name in infos else 0,
                "pid": infos[name].pid if name in infos else None,
                "labels": infos[name].labels if name in infos else {},
            }
            for name, state in members.items()
        },
        "leases": {str(s): [v.node, v.epoch] for s, v in sorted(node.shards.table.items())},
        "history": [msgspec.structs.asdict(t) for t in list(node.membership.history)[-30:]],
    }


async def cluster_status(mesh: Mesh, timeout: float = 2.0) -> dict[str, Any]:
    """The cluster as one node sees it: nodes (alive, shards held), shard owners and epochs, and
    recent failure-detector transitions. Shape: {"nodes": [...], "shards": [...], "history": [...]}.

    Raises `NotConnected` when no node answers.
    """
    data = await mesh._transport_request(mesh.names.admin_subject, b"{}", timeout)
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
        "replication": await _replication(mesh),
    }


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
