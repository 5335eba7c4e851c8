"""Cross-process ask with authentication and TLS on, against the same cluster without, same run.

Two one-node clusters run side by side: one on a plain embedded nats-server, one on a server with
NKey users (the node and the client hold `node` credentials) and TLS from a generated CA (what
`accord up --tls` runs). Rounds alternate between them so machine noise hits both alike (and which
side goes first alternates too); each round measures sequential asks to one agent (p50/p99) and
throughput with 64 asks in flight. `throughput_ratio` is the median over rounds of each round's
secure/plain ratio (its range is reported); `cpu_ratio` compares the CPU all three processes
(client, node, nats-server) spend per ask, plain/secure — on a machine shared with other work
the steadier figure, since a CPU-bound 2-core run's throughput ratio tends to it.

    python bench/ask_secure.py [--rounds 10] [--only tls|auth] [--json]

`--only tls` / `--only auth` turn on one of the two on the secure side, to split the cost.

Target (issue 15): secure throughput >= 0.9x plain; p50 reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
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

import accord
from accord.engine._auth import UserRegistry
from accord.engine._server import EmbeddedServer
from accord.engine._serverconf import ServerSecurity
from accord.engine._tls import TlsFiles, issue_cert
from accord.testing import Cluster

SIDES = ("plain", "secure")
PROCESSES = ("client", "node", "server")


def secure_server(
    home: Path, only: str | None = None
) -> tuple[EmbeddedServer, Path | None, TlsFiles | None]:
    """An embedded server with NKey users and TLS from a generated CA (`accord up --tls`), and
    a `node` credential for it; `only` ("tls" or "auth"): just that one."""
    registry, creds, tls = None, None, None
    if only != "tls":
        registry = UserRegistry(home / "auth")
        creds = registry.issue("bench", "node", "*")
    if only != "auth":
        tls = issue_cert(home / "tls", "server", ["127.0.0.1", "localhost"])
    server = EmbeddedServer(home / "data", security=ServerSecurity(registry=registry, tls=tls))
    return server, creds, tls


async def bench(args: Any) -> dict[str, Any]:
    inc = load_counter_app().Increment(1)
    agents = [f"counter/a{k}" for k in range(args.agents)]
    home = Path(tempfile.mkdtemp(prefix="accord-bench-secure-"))
    server, creds, tls = secure_server(home, args.only)
    secure_url = await asyncio.to_thread(server.start)
    env = {"ACCORD_CREDS": str(creds)} if creds is not None else {}
    if tls is not None:
        env["ACCORD_TLS_CA"] = str(tls.ca)
    try:
        with (
            Cluster(str(COUNTER_APP), 1) as plain,
            Cluster(str(COUNTER_APP), 1, url=secure_url, env=env) as secure,
        ):
            assert plain.server is not None
            pids = {
                "plain": [os.getpid(), plain.nodes["node-1"].pid, plain.server.pid],
                "secure": [os.getpid(), secure.nodes["node-1"].pid, server.pid],
            }
            cpu = {s: Cpu(dict(zip(PROCESSES, pids[s], strict=True))) for s in SIDES}
            async with contextlib.AsyncExitStack() as stack:
                meshes = {
                    "plain": await stack.enter_async_context(accord.connect(plain.url)),
                    "secure": await stack.enter_async_context(
                        accord.connect(secure_url, creds=creds, tls_ca=tls.ca if tls else None)
                    ),
                }
                lat, tput, blocks = await alternating_rounds(meshes, cpu, args, agents, inc)
    finally:
        await asyncio.to_thread(server.stop)
    res: dict[str, Any] = {"benchmark": "ask_secure", "mode": args.only or "auth+tls"}
    for name in SIDES:
        res[name] = side_summary(lat[name], tput[name], blocks[name])
    per_round = [ratio(s_, p_) for s_, p_ in zip(tput["secure"], tput["plain"], strict=True)]
    res["throughput_ratio"] = median(per_round)
    res["throughput_ratio_rounds"] = [round(x, 2) for x in per_round]
    res["cpu_ratio"] = ratio(res["plain"]["cpu_us_per_op"], res["secure"]["cpu_us_per_op"])
    res["p50_ratio"] = ratio(res["secure"]["seq_p50_us"], res["plain"]["seq_p50_us"])
    res["throughput_target_met"] = res["throughput_ratio"] >= 0.9
    res["params"] = round_params(args)
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_round_options(p)
    p.add_argument("--only", choices=("tls", "auth"), help="secure side: only TLS or only auth")
    res, args = run_bench(p, bench)
    pl, se = res["plain"], res["secure"]
    lines = [
        f"ask_secure  ({res['mode']} vs plain, same run, interleaved rounds)",
        *(
            f"  {name:<6}: p50 {r['seq_p50_us']:.0f} us  p99 {r['seq_p99_us']:.0f} us  "
            f"throughput {r['tput_ops_s']:.0f} ops/s  CPU per ask {r['cpu_us_per_op']:.0f} us "
            "(client {client} / node {node} / server {server})".format(
                **r["cpu_us_per_op_by_process"]
            )
            for name, r in (("plain", pl), ("secure", se))
        ),
        f"  throughput ratio {res['throughput_ratio']:.2f} (target >= 0.9; rounds "
        f"{res['throughput_ratio_rounds']}), p50 ratio {res['p50_ratio']:.2f}, "
        f"CPU ratio plain/secure {res['cpu_ratio']:.2f}",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
