"""Co-location: the pairs workload on 3 `accord node` processes, with `--adaptive` off, then on,
in one run; and the cost of sampling agent->agent messages into the communication graph.

    python bench/colocation.py [--pairs 300] [--seconds 10] [--json]

Each `pinger/i` asks its `ponger/i` `--inner` times per client ask (examples/placement_app.py);
the client keeps one ask in flight per pair. Reported per cluster: agent->agent asks/s (pair
throughput), p99 of the client's ask (which contains the inner asks) and the cross-node fraction
of agent->agent traffic (`accord topology`). Clusters, same run and server binary:
  off       hash placement, sampling on (the default node)
  on        --adaptive, rounds every 3 s, measured once placement converged
  nosample  hash placement, --no-sampling: the sampling overhead is off / nosample
`off` runs first and last (its mean is used: the drift of a shared machine shows between them).
Each cluster also reports the CPU of every process (3 nodes, the server, this client) per inner
ask over the measured interval, and `failed` client asks; `cpu_bound_ratio` (CPU per inner ask
off/on) is the throughput ratio the workload allows when all processes share busy cores, the
stable figure on a noisy machine (wall-clock ratios follow the other users of the cores).
Targets: cross-node <= 10 % on, throughput on/off >= 2, p99 on/off <= 0.5, sampling <= 3 %.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _common import (
    ROOT,
    cpu_seconds,
    emit,
    environment,
    load_app,
    parser,
    percentile,
    ratio,
    run,
    verdict,
)

from accord._status import cluster_status
from accord._topology import topology
from accord.testing import Cluster, wait_for_placement

APP = ROOT / "examples" / "placement_app.py"


async def measure(args: Any, node_args: list[str], adaptive: bool) -> dict[str, Any]:
    app = load_app(APP)
    with Cluster(str(APP), 3, node_args={f"node-{i}": node_args for i in (1, 2, 3)}) as c:
        async with c.connect() as mesh:
            await wait_for_placement(mesh, set(c.nodes))
            stop = asyncio.Event()
            lat: list[float] = []
            done = failed = 0
            recording = False

            async def pair(i: int) -> None:
                nonlocal done, failed
                msg = app.Ping(n=args.inner)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        await mesh.ask(f"pinger/{i}", msg, timeout=30)
                    except Exception:
                        failed += recording
                        continue
                    if recording:
                        lat.append(time.perf_counter() - t0)
                        done += 1

            tasks = [asyncio.create_task(pair(i)) for i in range(args.pairs)]
            names = sorted(c.nodes)
            converged_after = None
            t_start = time.monotonic()
            await asyncio.sleep(8.0)  # warm-up: activations, and a first decay period
            if adaptive:  # until the rounds settle (or give up after 90 s)
                while time.monotonic() - t_start < 90:
                    topo = await topology(mesh, names)
                    if topo["rate"] and topo["cross_node_fraction"] <= 0.10:
                        converged_after = round(time.monotonic() - t_start, 1)
                        break
                    await asyncio.sleep(3.0)
            # CPU of every process of the run (3 nodes, the server, this client) per inner ask:
            # the stable measure on a shared machine, where throughput follows total CPU.
            nodes = [n.pid for n in c.nodes.values()]
            server = c.server.pid if c.server and c.server.pid else None

            def cpu_now() -> tuple[float, float, float]:
                srv = cpu_seconds(server) if server else 0.0
                return sum(cpu_seconds(p) for p in nodes), srv, time.process_time()

            cpu0 = cpu_now()
            recording = True
            t0 = time.monotonic()
            await asyncio.sleep(args.seconds)
            recording = False
            elapsed = time.monotonic() - t0
            cpu = [b - a for a, b in zip(cpu0, cpu_now(), strict=True)]
            topo = await topology(mesh, names)
            status = await cluster_status(mesh)
            stop.set()
            await asyncio.gather(*tasks)
    return {
        "inner_asks_per_s": round(done * args.inner / elapsed, 1),
        "cpu_us_per_inner_ask": round(sum(cpu) / max(1, done * args.inner) * 1e6, 1),
        "cpu_us_nodes_server_client": [round(x / max(1, done * args.inner) * 1e6, 1) for x in cpu],
        "failed": failed,
        "p99_ms": round(percentile(lat, 99) * 1000, 2) if lat else float("nan"),
        "cross_node_fraction": topo["cross_node_fraction"],
        "moves": len(topo["moves"]),
        "converged_after_s": converged_after,
        "nodes": len(status["nodes"]),
    }


async def bench(args: Any) -> dict[str, Any]:
    # off twice, first and last: the machine's drift over the run shows as their difference,
    # and the ratios use their mean.
    off1 = await measure(args, [], adaptive=False)
    on = await measure(args, ["--adaptive", "--placement-round", "3"], adaptive=True)
    nosample = await measure(args, ["--no-sampling"], adaptive=False)
    off2 = await measure(args, [], adaptive=False)
    mean = ("inner_asks_per_s", "p99_ms", "cross_node_fraction", "cpu_us_per_inner_ask")
    off = {k: (off1[k] + off2[k]) / 2 if k in mean else off1[k] for k in off1}
    return {
        "off": off,
        "off_first": off1,
        "off_last": off2,
        "on": on,
        "nosample": nosample,
        "throughput_ratio": round(ratio(on["inner_asks_per_s"], off["inner_asks_per_s"]), 3),
        "p99_ratio": round(ratio(on["p99_ms"], off["p99_ms"]), 3),
        # The throughput ratio CPU allows when every process shares the cores (off/on CPU).
        "cpu_bound_ratio": round(ratio(off["cpu_us_per_inner_ask"], on["cpu_us_per_inner_ask"]), 3),
        "sampling_overhead": round(
            1 - ratio(off["inner_asks_per_s"], nosample["inner_asks_per_s"]), 4
        ),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--inner", type=int, default=10, help="agent->agent asks per client ask")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    result, loop_name = run(lambda: bench(args), args.uvloop)
    result["env"] = environment(loop_name)
    result["pairs"] = args.pairs
    lines = [
        f"pairs {args.pairs}, {args.inner} inner asks per client ask, {args.seconds:g} s each",
        *(f"  {k:9s} {result[k]}" for k in ("off_first", "on", "nosample", "off_last")),
        f"cross-node on: {result['on']['cross_node_fraction']:.1%} "
        + verdict(result["on"]["cross_node_fraction"], 0.10, False),
        f"throughput on/off: {result['throughput_ratio']} "
        + verdict(result["throughput_ratio"], 2.0, True),
        f"p99 on/off: {result['p99_ratio']} " + verdict(result["p99_ratio"], 0.5, False),
        f"CPU per inner ask off/on (the throughput ratio CPU allows): {result['cpu_bound_ratio']}",
        f"sampling overhead: {result['sampling_overhead']:.1%} "
        + verdict(result["sampling_overhead"], 0.03, False),
    ]
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
