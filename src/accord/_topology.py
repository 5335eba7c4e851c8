"""The cluster's communication graph as `accord topology` shows it: every live node's sampled
agent->agent edges (runtime/_colocate.py answers `graph` on its placement control subject), the
share of that traffic crossing nodes, and the recent moves with the reason for each."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from ._errors import NotConnected
from .cluster._config import Names
from .engine._api import NoResponders, RequestTimeout, Transport


class _Client(Protocol):
    names: Names
    _transport: Transport


async def topology(mesh: _Client, nodes: list[str], timeout: float = 3.0) -> dict[str, Any]:
    """Edges (source, destination, weight, messages/s, messages, local, node), the fraction of
    agent->agent messages/s that crossed nodes, and moves, newest last. Nodes that do not answer
    within `timeout` are listed under "missing"; `NotConnected` if none answered."""
    edges: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    missing: list[str] = []
    for node in nodes:
        try:
            data = await mesh._transport.request(
                f"{mesh.names.prefix}.placectl.{node}", b'{"op":"graph"}', timeout
            )
        except (NoResponders, RequestTimeout):
            missing.append(node)
            continue
        answer = msgspec.json.decode(data)
        for src, dst, weight, rate, messages, local in answer.get("edges", ()):
            edges.append({"source": src, "destination": dst, "weight": weight, "rate": rate,
                          "messages": messages, "local": local, "node": node})  # fmt: skip
        moves.extend(answer.get("moves", ()))
    if missing and len(missing) == len(nodes):
        raise NotConnected("no node answered the topology request")
    edges.sort(key=lambda e: (-e["rate"], -e["weight"], e["source"], e["destination"]))
    total = sum(e["rate"] for e in edges)
    remote = sum(e["rate"] for e in edges if not e["local"])
    moves.sort(key=lambda m: m["at"])
    return {
        "edges": edges,
        "rate": round(total, 3),
        "cross_node_fraction": round(remote / total, 4) if total else 0.0,
        "moves": moves[-100:],
        "missing": missing,
    }


def to_dot(topo: dict[str, Any], limit: int = 200) -> str:
    """Graphviz: agents as nodes grouped by the node that sampled them, edges by rate."""
    lines = ["digraph accord {", "  rankdir=LR;"]
    by_node: dict[str, set[str]] = {}
    for e in topo["edges"][:limit]:
        by_node.setdefault(e["node"], set()).add(e["source"])
    for i, (node, agents) in enumerate(sorted(by_node.items())):
        lines.append(f'  subgraph cluster_{i} {{ label="{node}";')
        lines.extend(f'    "{a}";' for a in sorted(agents))
        lines.append("  }")
    for e in topo["edges"][:limit]:
        style = "solid" if e["local"] else "dashed"
        lines.append(f'  "{e["source"]}" -> "{e["destination"]}" '
                     f'[label="{e["rate"]:.1f}/s", style={style}];')  # fmt: skip
    lines.append("}")
    return "\n".join(lines) + "\n"
