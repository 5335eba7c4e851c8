"""`accord topology`: the learned communication graph, the cross-node share of agent->agent
traffic and the recent placement moves with their reasons."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from ._common import ClusterOpt, JsonOpt, NatsOpt, _existing_cluster, _run, app, out


@app.command()
def topology(
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    as_json: JsonOpt = False,
    dot: Annotated[bool, typer.Option("--dot", help="Print a Graphviz graph.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Edges to show.")] = 20,
) -> None:
    """Edges (source, destination, weight, messages/s, local or remote), the fraction of
    agent->agent traffic that crosses nodes, and recent moves with their reason."""
    from .._status import cluster_status
    from .._topology import to_dot
    from .._topology import topology as gather

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            st = await cluster_status(mesh)
            topo = await gather(mesh, [n["name"] for n in st["nodes"] if n["alive"]])
        if as_json:
            sys.stdout.write(json.dumps(topo) + "\n")
        elif dot:
            sys.stdout.write(to_dot(topo, limit))
        else:
            _print(topo, limit)

    _run(main())


def _print(topo: dict[str, Any], limit: int) -> None:
    edges = Table(title=f"agent->agent traffic: {topo['rate']:.1f} msg/s, "
                        f"{topo['cross_node_fraction']:.1%} across nodes")  # fmt: skip
    for col in ("source", "destination", "weight", "msg/s", "where", "sampled on"):
        edges.add_column(col)
    for e in topo["edges"][:limit]:
        edges.add_row(e["source"], e["destination"], f"{e['weight']:.2f}", f"{e['rate']:.2f}",
                      "local" if e["local"] else "[yellow]remote[/yellow]", e["node"])  # fmt: skip
    out.print(edges)
    if topo["moves"]:
        moves = Table(title="recent moves")
        for col in ("time", "agent", "from", "to", "reason"):
            moves.add_column(col)
        for m in topo["moves"][-limit:]:
            moves.add_row(time.strftime("%H:%M:%S", time.localtime(m["at"])), m["agent"],
                          m["source"], m["target"], m["reason"])  # fmt: skip
        out.print(moves)
    if topo["missing"]:
        out.print(f"[yellow]no answer from: {', '.join(topo['missing'])}[/yellow]")
