"""Failover after SIGKILL: 3 `accord node` processes, 500 counter agents answering, kill one node.

Measures, from the instant before the SIGKILL:
  (a) shards_s: seconds until every shard is owned by a live node (polling accord._status),
  (b) agents_s: seconds until every one of the agents has answered an ask after the kill
      (each agent retried on accord.AccordError with a short per-ask timeout).
Baseline, same run: the cluster's lease TTL (status["lease_ttl"]); ratio = agents_s / (TTL + 1),
target <= 1. Runs are repeated on one cluster: after each kill a fresh node joins and placement
settles before the next kill.

    python bench/failover.py [--runs 3] [--agents 500] [--json]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _common import COUNTER_APP, emit, environment, load_counter_app, median, parser, run, verdict

from accord import AccordError
from accord._ids import shard_of
from accord._status import cluster_status
from accord.testing import Cluster, wait_for_placement

TARGET = 1.0


async def shards_recovered(mesh: Any, live: set[str], t0: float, timeout: float) -> float:
    """Seconds from t0 until every shard has a live owner (as the answering node sees it)."""
    while time.perf_counter() - t0 < timeout:
        try:
            st = await cluster_status(mesh, timeout=1.0)
        except AccordError:
            await asyncio.sleep(0.05)
            continue
        owners = {s["owner"] for s in st["shards"]}
        if len(st["shards"]) == st["num_shards"] and owners <= live:
            return time.perf_counter() - t0
        await asyncio.sleep(0.05)
    raise TimeoutError(f"shards not all owned by {sorted(live)} within {timeout}s")


async def answered(mesh: Any, agent: str, msg: Any, t0: float, ask_timeout: float) -> float:
    """Seconds from t0 until `agent` answers an ask; retries on AccordError."""
    while True:
        try:
            await mesh.ask(agent, msg, timeout=ask_timeout)
            return time.perf_counter() - t0
        except AccordError:
            await asyncio.sleep(0.02)


async def one_run(
    cluster: Cluster, mesh: Any, victim: str, agents: list[str], msg: Any, args: Any
) -> dict[str, Any]:
    live = {n for n, p in cluster.nodes.items() if p.alive()}
    st = await wait_for_placement(mesh, live, timeout=60)
    await asyncio.gather(*(mesh.ask(a, msg, timeout=5) for a in agents))  # all answering
    await asyncio.sleep(args.settle)  # steady state: leases renewed, detector quiet
    st = await cluster_status(mesh)
    victim_shards = {s["shard"] for s in st["shards"] if s["owner"] == victim}
    n = st["num_shards"]
    affected = [a for a in agents if shard_of(a, n) in victim_shards]

    t0 = time.perf_counter()
    cluster.nodes[victim].kill()
    survivors = live - {victim}
    shard_task = asyncio.create_task(shards_recovered(mesh, survivors, t0, args.timeout))
    times = await asyncio.wait_for(
        asyncio.gather(*(answered(mesh, a, msg, t0, args.ask_timeout) for a in agents)),
        args.timeout,
    )
    shards_s = await shard_task
    by_agent = dict(zip(agents, times, strict=True))
    aff = [by_agent[a] for a in affected]
    return {
        "victim": victim,
        "victim_shards": len(victim_shards),
        "affected_agents": len(affected),
        "shards_s": shards_s,
        "agents_s": max(times),
        "affected_p50_s": median(aff) if aff else 0.0,
        "unaffected_max_s": max((t for a, t in by_agent.items() if a not in affected), default=0),
        "lease_ttl": st["lease_ttl"],
    }


async def bench(args: Any) -> dict[str, Any]:
    app = load_counter_app()
    msg = app.Increment(1)
    agents = [f"counter/f{k}" for k in range(args.agents)]
    runs: list[dict[str, Any]] = []
    with Cluster(app=str(COUNTER_APP), nodes=3) as cluster:
        async with cluster.connect() as mesh:
            next_id = 4
            for i in range(args.runs):
                victim = f"node-{i + 1}"  # the oldest node: each run kills a different process
                runs.append(await one_run(cluster, mesh, victim, agents, msg, args))
                if i + 1 < args.runs:
                    cluster.add_node(f"node-{next_id}")  # back to 3 live nodes
                    next_id += 1
    ttl = runs[0]["lease_ttl"]
    for r in runs:
        r["ratio"] = r["agents_s"] / (r["lease_ttl"] + 1)
    res: dict[str, Any] = {
        "benchmark": "failover",
        "lease_ttl_s": ttl,
        "runs": runs,
        "median_shards_s": median([r["shards_s"] for r in runs]),
        "median_agents_s": median([r["agents_s"] for r in runs]),
        "params": {
            "agents": args.agents,
            "runs": args.runs,
            "ask_timeout_s": args.ask_timeout,
            "settle_s": args.settle,
        },
    }
    res["ratio"] = res["median_agents_s"] / (ttl + 1)
    res["worst_ratio"] = max(r["ratio"] for r in runs)
    res["target_met"] = res["ratio"] <= TARGET
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--ask-timeout", type=float, default=1.0, help="per-ask timeout while retrying")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of steady state before kill")
    p.add_argument("--timeout", type=float, default=30.0, help="give up on a run after this")
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    ttl = res["lease_ttl_s"]
    lines = [f"failover  (3 nodes, {args.agents} agents, SIGKILL one node; lease TTL {ttl} s)"]
    lines.append(
        f"  {'run':<4}{'victim':<8}{'shards':>7}{'agents hit':>11}{'all shards s':>13}"
        f"{'all agents s':>13}{'hit p50 s':>10}{'ratio':>7}"
    )
    for i, r in enumerate(res["runs"], 1):
        lines.append(
            f"  {i:<4}{r['victim']:<8}{r['victim_shards']:>7}{r['affected_agents']:>11}"
            f"{r['shards_s']:>13.2f}{r['agents_s']:>13.2f}{r['affected_p50_s']:>10.2f}"
            f"{r['ratio']:>7.2f}"
        )
    lines += [
        f"  median: all shards owned {res['median_shards_s']:.2f} s, "
        f"all agents answering {res['median_agents_s']:.2f} s",
        f"  ratio failover/(TTL+1) = {res['median_agents_s']:.2f}/{ttl + 1} = {res['ratio']:.2f}  "
        f"{verdict(res['ratio'], TARGET, False)}  (worst run {res['worst_ratio']:.2f})",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
