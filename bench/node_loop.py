"""A node on uvloop against a node on asyncio's loop, same run: what `accord node --loop uvloop`
buys for cross-process asks.

Two one-node clusters run side by side, each on its own embedded nats-server, alike but for the
node's event loop (`--loop asyncio` / `--loop uvloop`); with `--secure` both are authenticated
TLS clusters (`Cluster(secure=True)`, what `accord up --tls` runs). One client process (this one:
asyncio, or uvloop with `--uvloop`) asks both. Rounds alternate between them, the side going
first alternating too; each round measures sequential asks to one agent (p50) and throughput
with 64 asks in flight over many agents. `throughput_ratio` is the median over rounds of each
round's uvloop/asyncio ratio; `node_cpu_ratio` compares the node's CPU per ask (asyncio/uvloop:
above 1 means the uvloop node spends less).

    python bench/node_loop.py [--rounds 10] [--secure] [--uvloop] [--json]

No target: a measurement for docs/operations.md ("The event loop").
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from _common import (
    COUNTER_APP,
    Cpu,
    add_round_options,
    alternating_rounds,
    emit,
    load_counter_app,
    median,
    parser,
    ratio,
    round_params,
    run_bench,
    side_summary,
)

from accord.testing import Cluster

SIDES = ("asyncio", "uvloop")
PROCESSES = ("client", "node", "server")


async def bench(args: Any) -> dict[str, Any]:
    inc = load_counter_app().Increment(1)
    agents = [f"counter/a{k}" for k in range(args.agents)]
    with contextlib.ExitStack() as clusters:
        sides = {
            s: clusters.enter_context(
                Cluster(
                    str(COUNTER_APP), 1, node_args={"node-1": ["--loop", s]}, secure=args.secure
                )
            )
            for s in SIDES
        }
        cpu = {}
        for s, c in sides.items():
            assert c.server is not None
            cpu[s] = Cpu(dict(zip(PROCESSES, [os.getpid(), c.nodes["node-1"].pid, c.server.pid],
                                  strict=True)))  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            meshes = {s: await stack.enter_async_context(c.connect()) for s, c in sides.items()}
            lat, tput, blocks = await alternating_rounds(meshes, cpu, args, agents, inc)
    res: dict[str, Any] = {"benchmark": "node_loop", "secure": args.secure}
    for name in SIDES:
        res[name] = side_summary(lat[name], tput[name], blocks[name])
    per_round = [ratio(u, a) for u, a in zip(tput["uvloop"], tput["asyncio"], strict=True)]
    res["throughput_ratio"] = median(per_round)
    res["throughput_ratio_rounds"] = [round(x, 2) for x in per_round]
    res["p50_ratio"] = ratio(res["uvloop"]["seq_p50_us"], res["asyncio"]["seq_p50_us"])
    res["node_cpu_ratio"] = ratio(res["asyncio"]["cpu_us_per_op_by_process"]["node"],
                                  res["uvloop"]["cpu_us_per_op_by_process"]["node"])  # fmt: skip
    res["params"] = round_params(args)
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_round_options(p)
    p.add_argument("--secure", action="store_true", help="both clusters with NKeys and TLS")
    res, args = run_bench(p, bench)
    lines = [
        f"node_loop  (node on uvloop vs on asyncio, same run{', auth+TLS' if args.secure else ''}"
        f", client on {res['env']['loop']})",
        *(
            f"  {name:<7}: p50 {r['seq_p50_us']:.0f} us  p99 {r['seq_p99_us']:.0f} us  "
            f"throughput {r['tput_ops_s']:.0f} ops/s  CPU per ask "
            "(client {client} / node {node} / server {server} us)".format(
                **r["cpu_us_per_op_by_process"]
            )
            for name, r in ((s, res[s]) for s in SIDES)
        ),
        f"  throughput ratio uvloop/asyncio {res['throughput_ratio']:.2f} (rounds "
        f"{res['throughput_ratio_rounds']}), p50 ratio {res['p50_ratio']:.2f}, "
        f"node CPU asyncio/uvloop {res['node_cpu_ratio']:.2f}",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
