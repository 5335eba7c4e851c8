"""Footprint of one idle `accord node` process: start-up time, resident memory, idle CPU.

Start-up = process spawn -> the node answers the cluster status subject owning every shard
(a fresh cluster per repetition, so the node also creates the cluster's buckets). Then the node
idles for --idle seconds and VmRSS is read from /proc/<pid>/status; idle CPU (the process and
nats-server) is then measured over the next --cpu-window seconds.

Baseline, same run, same nats-server: a bare `python` process that imports nats-py, connects and
prints `ready` (start-up = spawn -> ready), idle for the same window. Repetitions are interleaved.

    python bench/node_footprint.py [--reps 3] [--idle 2] [--json]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import msgspec
import nats
from _common import (
    COUNTER_APP,
    cpu_seconds,
    emit,
    environment,
    median,
    parser,
    ratio,
    rss_kib,
    run,
)

from accord import EmbeddedServer
from accord.testing import NodeProcess

BARE = """
import asyncio, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def idle_cpu(pid: int, server: EmbeddedServer, window: float) -> tuple[float, float]:
    """CPU % of one core used by `pid` and by nats-server over `window` idle seconds."""
    c_proc, c_srv = cpu_seconds(pid), cpu_seconds(server.pid or 0)
    await asyncio.sleep(window)
    return (
        (cpu_seconds(pid) - c_proc) / window * 100,
        (cpu_seconds(server.pid or 0) - c_srv) / window * 100,
    )


async def node_rep(server: EmbeddedServer, rep: int, args: Any) -> dict[str, Any]:
    cluster = f"footprint{rep}"
    subject = f"accord.{cluster}.admin.status"
    nc = await nats.connect(server.url, name="bench-footprint")
    node = NodeProcess(server.url, str(COUNTER_APP), f"fp-{rep}", cluster=cluster)
    first = placed = None
    try:
        t0 = time.perf_counter()
        node.start()
        deadline = t0 + args.timeout
        while time.perf_counter() < deadline:
            try:
                reply = await nc.request(subject, b"{}", timeout=0.5)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.01)
                continue
            now = time.perf_counter() - t0
            first = first if first is not None else now
            st = msgspec.json.decode(reply.data)
            if len(st["held"]) == st["num_shards"]:
                placed = now
                break
            await asyncio.sleep(0.01)
        if placed is None:
            raise TimeoutError(f"node did not own all shards within {args.timeout}s")
        await asyncio.sleep(args.idle)
        rss = rss_kib(node.pid)
        cpu, srv_cpu = await idle_cpu(node.pid, server, args.cpu_window)
        return {
            "startup_s": placed,
            "first_status_s": first,
            "rss_mib": rss / 1024,
            "idle_cpu_pct": cpu,
            "server_idle_cpu_pct": srv_cpu,
        }
    finally:
        node.stop()
        await nc.close()


async def bare_rep(server: EmbeddedServer, args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # noqa: ASYNC220 - timing the spawn itself, like NodeProcess.start
        [sys.executable, "-c", BARE, server.url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        startup = time.perf_counter() - t0
        if line.strip() != b"ready":
            raise RuntimeError("bare process did not start")
        await asyncio.sleep(args.idle)
        rss = rss_kib(proc.pid)
        cpu, srv_cpu = await idle_cpu(proc.pid, server, args.cpu_window)
        return {
            "startup_s": startup,
            "rss_mib": rss / 1024,
            "idle_cpu_pct": cpu,
            "server_idle_cpu_pct": srv_cpu,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bench(args: Any) -> dict[str, Any]:
    server = EmbeddedServer()
    await asyncio.to_thread(server.start)
    reps: dict[str, list[dict[str, Any]]] = {"node": [], "bare": []}
    try:
        for i in range(args.reps):
            reps["bare"].append(await bare_rep(server, args))
            reps["node"].append(await node_rep(server, i, args))
    finally:
        await asyncio.to_thread(server.stop)
    res: dict[str, Any] = {"benchmark": "node_footprint", "reps": reps}
    for name, items in reps.items():
        res[name] = {k: median([r[k] for r in items]) for k in items[0]}
    n, b = res["node"], res["bare"]
    res["rss_ratio"] = ratio(n["rss_mib"], b["rss_mib"])
    res["startup_ratio"] = ratio(n["startup_s"], b["startup_s"])
    res["params"] = {"reps": args.reps, "idle_s": args.idle, "cpu_window_s": args.cpu_window}
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--idle", type=float, default=2.0, help="idle seconds before reading RSS")
    p.add_argument("--cpu-window", type=float, default=2.0, help="idle CPU window after RSS read")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    n, b = res["node"], res["bare"]
    lines = [
        f"node_footprint  (medians of {args.reps}; idle window {args.idle:g} s)",
        f"  {'':<28}{'accord node':>12}{'bare nats-py':>14}{'ratio':>7}",
        f"  {'start-up s':<28}{n['startup_s']:>12.2f}{b['startup_s']:>14.2f}"
        f"{res['startup_ratio']:>7.2f}",
        f"  {'idle RSS MiB':<28}{n['rss_mib']:>12.1f}{b['rss_mib']:>14.1f}{res['rss_ratio']:>7.2f}",
        f"  {'idle CPU % (the process)':<28}{n['idle_cpu_pct']:>12.1f}{b['idle_cpu_pct']:>14.1f}",
        f"  {'idle CPU % (nats-server)':<28}{n['server_idle_cpu_pct']:>12.1f}"
        f"{b['server_idle_cpu_pct']:>14.1f}",
        f"  node: first status answer after {n['first_status_s']:.2f} s, all shards owned after "
        f"{n['startup_s']:.2f} s",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
