"""What a node reports about itself and its view of the cluster (`accord status`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
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
