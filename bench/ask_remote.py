"""Cross-process ask: a Mesh client asking counter agents hosted by one `accord node` process.

Baseline, same run, same nats-server: a bare nats-py responder process (bench/_raw_responder.py)
answered with raw `nc.request`. Accord and raw blocks are interleaved in rounds so machine noise
hits both alike.

    python bench/ask_remote.py [--uvloop] [--json] [--metrics]

Reports sequential p50/p99 latency to one agent and throughput with 64 asks in flight over many
agents, and the ratios accord/raw (targets: throughput >= 0.7, p50 <= 1.3). Diagnostics: the
raw responder spread over 64 subjects (one subscription each, like a node's 64 shard
subscriptions), and CPU microseconds per op of every process during the throughput blocks; on a
machine where all processes share the cores, throughput_ratio tends to cpu_bound_ratio
(total raw CPU per op / total accord CPU per op).

With `--metrics`, a second cluster on the same nats-server has its node serve Prometheus metrics
(`--metrics-port 0`). Its throughput block and the one of the node without metrics run back to
back in every round, in alternating order (off-on, on-off, ...: drift hits both alike), and
`metrics_tput_ratio` is the median over rounds of that round's on/off ratio, with its range
(target: >= 0.95); `metrics_p50_ratio` compares sequential p50s. Each round also runs both nodes
at once, half the in-flight asks each (`metrics_together_ratio`: on/off throughput under exactly
the same noise; `metrics_together_cpu_ratio`: node CPU per op off/on in that interval).
`--metrics-only` skips the raw baselines, so more rounds fit in the same time; `--aa` runs the
second node without metrics too (an A/A control: the spread is the machine's noise):

    python bench/ask_remote.py --metrics --metrics-only --rounds 12
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from typing import Any

import nats
from _common import (
    BENCH_DIR,
    COUNTER_APP,
    Cpu,
    activate,
    cpu_seconds,
    emit,
    load_counter_app,
    median,
    parser,
    percentile,
    ratio,
    run_bench,
    sequential,
    throughput,
    verdict,
)

from accord.testing import Cluster, wait_for_placement

RAW_SUBJECT = "bench.raw.echo"
FANOUT = 64  # raw_fanout: one subscription per subject, like a node's 64 shard subscriptions
REQUEST_PAYLOAD = b"\x86\xa1v\x01\xa4kind\xa3ask" + b"y" * 48  # about an accord ask envelope


ASK_TIMEOUT = 60.0  # a loaded shared machine stalls for seconds: a bench must not die of it


def start_responder(url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "_raw_responder.py"), "--nats", url,
         "--subject", RAW_SUBJECT, "--fanout", str(FANOUT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("raw responder did not start")
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bench(args: Any) -> dict[str, Any]:
    app = load_counter_app()
    inc = app.Increment(1)
    n_agents = args.agents
    agents = [f"counter/a{k}" for k in range(n_agents)]
    with contextlib.ExitStack() as clusters:
        cluster = clusters.enter_context(Cluster(app=str(COUNTER_APP), nodes=1))
        metered = None
        if args.metrics:
            metered = clusters.enter_context(Cluster(
                app=str(COUNTER_APP), nodes=1, url=cluster.url, cluster="metered",
                node_args={"node-1": [] if args.aa else ["--metrics-port", "0"]},
            ))  # fmt: skip
        responder = start_responder(cluster.url)
        try:
            async with contextlib.AsyncExitStack() as meshes:
                mesh = await meshes.enter_async_context(cluster.connect())
                await wait_for_placement(mesh, {"node-1"}, timeout=30)
                mmesh = mesh
                if metered is not None:
                    mmesh = await meshes.enter_async_context(metered.connect())
                    await wait_for_placement(mmesh, {"node-1"}, timeout=30)
                    await activate(mmesh, agents, inc)
                nc = await nats.connect(cluster.url, name="bench-raw-client")
                try:

                    async def accord_one() -> Any:
                        return await mesh.ask("counter/x", inc)

                    async def raw_one() -> Any:
                        return await nc.request(RAW_SUBJECT, REQUEST_PAYLOAD, timeout=10)

                    async def accord_many(i: int) -> Any:
                        return await mesh.ask(agents[i % n_agents], inc, timeout=ASK_TIMEOUT)

                    async def metered_one() -> Any:
                        return await mmesh.ask("counter/x", inc)

                    async def metered_many(i: int) -> Any:
                        return await mmesh.ask(agents[i % n_agents], inc, timeout=ASK_TIMEOUT)

                    async def raw_many(i: int) -> Any:
                        return await nc.request(RAW_SUBJECT, REQUEST_PAYLOAD, timeout=10)

                    fan_subjects = [f"{RAW_SUBJECT}.{k}" for k in range(FANOUT)]

                    async def raw_fanout(i: int) -> Any:
                        subject = fan_subjects[i % FANOUT]
                        return await nc.request(subject, REQUEST_PAYLOAD, timeout=10)

                    # warm-up: activate every agent, warm both paths
                    reply = await accord_one()
                    assert reply.value >= 1, reply
                    await throughput(accord_many, 0.5, args.inflight)
                    await activate(mesh, agents, inc)
                    await sequential(accord_one, 300)
                    await sequential(raw_one, 300)
                    await throughput(raw_many, 0.5, args.inflight)
                    await throughput(raw_fanout, 0.3, args.inflight)

                    pids = {
                        "client": os.getpid(),
                        "server": cluster.server.pid if cluster.server else None,
                        "node": cluster.nodes["node-1"].pid,
                        "responder": responder.pid,
                    }
                    only = metered is not None and args.metrics_only
                    kinds: tuple[str, ...] = ("accord",)
                    lat: dict[str, list[float]] = {"accord": []}
                    if not only:
                        kinds += ("raw", "raw_fanout")
                        lat["raw"] = []
                    if metered is not None:
                        kinds += ("metrics",)
                        lat["metrics"] = []
                        pids["metered_node"] = metered.nodes["node-1"].pid
                        await sequential(metered_one, 300)
                        await throughput(metered_many, 0.5, args.inflight)
                    tput: dict[str, list[float]] = {k: [] for k in kinds}
                    cpu = {k: Cpu({w: p for w, p in pids.items() if p}) for k in kinds}
                    ops = dict.fromkeys(kinds, 0)
                    together: list[float] = []  # on/off throughput, both running at once
                    together_cpu: list[float] = []  # node CPU per op off/on, same interval
                    pair: list[tuple[str, Any]] = [("accord", accord_many)]
                    if metered is not None:
                        pair.append(("metrics", metered_many))
                    baselines = [] if only else [("raw", raw_many), ("raw_fanout", raw_fanout)]
                    for rnd in range(args.rounds):
                        if not only:
                            lat["raw"] += await sequential(raw_one, args.n)
                        # off/on back to back, the order alternating: A B, B A, A B, ...
                        order = pair if rnd % 2 == 0 else pair[::-1]
                        seq = {"accord": accord_one, "metrics": metered_one}
                        for name, _ in order:
                            lat[name] += await sequential(seq[name], args.n)
                        for name, fn in [*order, *baselines]:
                            cpu[name].start()
                            done, elapsed = await throughput(fn, args.duration, args.inflight)
                            cpu[name].stop()
                            ops[name] += done
                            tput[name].append(done / elapsed)
                        if metered is not None:  # both at once: the same noise, exactly
                            node, mnode = pids["node"], pids["metered_node"]
                            before = {p: cpu_seconds(p) for p in (node, mnode)}
                            (off, _), (on, _) = await asyncio.gather(
                                throughput(accord_many, args.duration, args.inflight // 2),
                                throughput(metered_many, args.duration, args.inflight // 2),
                            )
                            together.append(ratio(on, off))
                            cpu_off = (cpu_seconds(node) - before[node]) / max(off, 1)
                            cpu_on = (cpu_seconds(mnode) - before[mnode]) / max(on, 1)
                            together_cpu.append(ratio(cpu_off, cpu_on))
                finally:
                    await nc.close()
        finally:
            stop_process(responder)

    res: dict[str, Any] = {"benchmark": "ask_remote"}
    for name in kinds:
        res[name] = (
            {}
            if name not in lat
            else {
                "seq_p50_us": percentile(lat[name], 50) * 1e6,
                "seq_p99_us": percentile(lat[name], 99) * 1e6,
                "seq_samples": len(lat[name]),
            }
        )
        res[name] |= {
            "tput_ops_s": median(tput[name]),
            "tput_rounds_ops_s": [round(x) for x in tput[name]],
            # CPU microseconds per op during the throughput blocks, per process
            "cpu_us_per_op": cpu[name].per_op_us(ops[name]),
        }
    a = res["accord"]
    if "raw" in res:
        r = res["raw"]
        res["throughput_ratio"] = ratio(a["tput_ops_s"], r["tput_ops_s"])
        res["p50_ratio"] = ratio(a["seq_p50_us"], r["seq_p50_us"])
        res["p99_ratio"] = ratio(a["seq_p99_us"], r["seq_p99_us"])
        # diagnostic, not the target: against a raw responder spread over 64 subscriptions
        res["throughput_ratio_vs_fanout"] = ratio(a["tput_ops_s"],
                                                  res["raw_fanout"]["tput_ops_s"])  # fmt: skip
        a_cpu, r_cpu = a["cpu_us_per_op"], r["cpu_us_per_op"]
        res["cpu_bound_ratio"] = ratio(
            r_cpu["client"] + r_cpu["server"] + r_cpu["responder"],
            a_cpu["client"] + a_cpu["server"] + a_cpu["node"],
        )
        res["throughput_target_met"] = res["throughput_ratio"] >= 0.7
        res["p50_target_met"] = res["p50_ratio"] <= 1.3
    if "metrics" in res:
        m = res["metrics"]
        # per round: on/off of two blocks run back to back (the same noise, mostly)
        rounds = [ratio(on, off) for on, off in zip(tput["metrics"], tput["accord"], strict=True)]
        res["metrics_round_ratios"] = [round(x, 3) for x in rounds]
        res["metrics_tput_ratio"] = median(rounds)
        res["metrics_tput_ratio_range"] = [min(rounds), max(rounds)]
        res["metrics_tput_ratio_of_medians"] = ratio(m["tput_ops_s"], a["tput_ops_s"])
        res["metrics_p50_ratio"] = ratio(m["seq_p50_us"], a["seq_p50_us"])
        res["metrics_cpu_ratio"] = ratio(a["cpu_us_per_op"]["node"],
                                         m["cpu_us_per_op"]["metered_node"])  # fmt: skip
        res["metrics_together_ratios"] = [round(x, 3) for x in together]
        res["metrics_together_ratio"] = median(together)
        res["metrics_together_cpu_ratios"] = [round(x, 3) for x in together_cpu]
        res["metrics_together_cpu_ratio"] = median(together_cpu)
        res["metrics_target_met"] = res["metrics_tput_ratio"] >= 0.95
    res["params"] = {
        "rounds": args.rounds,
        "seq_per_round": args.n,
        "inflight": args.inflight,
        "duration_s": args.duration,
        "agents": n_agents,
        "metrics_only": bool(args.metrics and args.metrics_only),
        "aa_control": bool(args.metrics and args.aa),
    }
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved accord/raw rounds")
    p.add_argument("--n", type=int, default=2000, help="sequential asks per round")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per throughput block")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--agents", type=int, default=1000, help="agents for the throughput phase")
    p.add_argument("--metrics", action="store_true",
                   help="also measure a node serving Prometheus metrics (interleaved)")  # fmt: skip
    p.add_argument(
        "--aa",
        action="store_true",
        help="with --metrics: an A/A control, the second node without metrics too",
    )
    p.add_argument("--metrics-only", action="store_true",
                   help="with --metrics: only the on/off pairs, no raw baselines")  # fmt: skip
    res, args = run_bench(p, bench)
    loop_name = res["env"]["loop"]
    a = res["accord"]
    lines = (
        [f"ask_remote --metrics-only  (client loop: {loop_name})"]
        if "raw" not in res
        else _raw_lines(res, args, loop_name)
    )
    if "metrics" in res:
        m = res["metrics"]
        lo, hi = res["metrics_tput_ratio_range"]
        lines += [
            f"  metrics off: throughput {a['tput_ops_s']:8.0f} ops/s, p50 {a['seq_p50_us']:7.0f} us"
            f"; node CPU {a['cpu_us_per_op']['node']:.1f} us/op",
            f"  metrics on:  throughput {m['tput_ops_s']:8.0f} ops/s, p50 {m['seq_p50_us']:7.0f} us"
            f"; node CPU {m['cpu_us_per_op']['metered_node']:.1f} us/op",
            f"  metrics_tput_ratio on/off, median of {len(res['metrics_round_ratios'])} rounds = "
            f"{res['metrics_tput_ratio']:.3f} (range {lo:.3f}-{hi:.3f}) "
            f"{verdict(res['metrics_tput_ratio'], 0.95, True)}; p50 on/off = "
            f"{res['metrics_p50_ratio']:.3f}; node CPU off/on = {res['metrics_cpu_ratio']:.3f}",
            "  per round: " + " ".join(f"{x:.3f}" for x in res["metrics_round_ratios"]),
            f"  both at once ({args.inflight // 2} in flight each): throughput on/off median "
            f"{res['metrics_together_ratio']:.3f} (range {min(res['metrics_together_ratios']):.3f}-"
            f"{max(res['metrics_together_ratios']):.3f}); node CPU per op off/on median "
            f"{res['metrics_together_cpu_ratio']:.3f}",
        ]
    emit(res, args.json, lines)


def _raw_lines(res: dict[str, Any], args: Any, loop_name: str) -> list[str]:
    a, r = res["accord"], res["raw"]
    return [
        f"ask_remote  (client loop: {loop_name}; node and raw responder: asyncio)",
        f"  sequential ask to one agent   accord p50 {a['seq_p50_us']:7.0f} us  "
        f"p99 {a['seq_p99_us']:7.0f} us",
        f"  raw nc.request baseline       raw    p50 {r['seq_p50_us']:7.0f} us  "
        f"p99 {r['seq_p99_us']:7.0f} us",
        f"  throughput, {args.inflight} in flight       accord {a['tput_ops_s']:8.0f} ops/s  "
        f"raw {r['tput_ops_s']:8.0f} ops/s",
        f"  raw, {FANOUT} subjects/subscriptions (diagnostic)  "
        f"raw_fanout {res['raw_fanout']['tput_ops_s']:8.0f} ops/s  "
        f"accord/raw_fanout = {res['throughput_ratio_vs_fanout']:.2f}",
        f"  throughput_ratio accord/raw = {res['throughput_ratio']:.2f}  "
        f"{verdict(res['throughput_ratio'], 0.7, True)}",
        f"  p50_ratio        accord/raw = {res['p50_ratio']:.2f}  "
        f"{verdict(res['p50_ratio'], 1.3, False)}",
        f"  p99_ratio        accord/raw = {res['p99_ratio']:.2f}",
        "  CPU us per op in the throughput phase (client / nats-server / node or responder);"
        f" CPU-bound ratio {res['cpu_bound_ratio']:.2f}:",
        "    accord {client:6.1f} / {server:6.1f} / {node:6.1f}".format(**a["cpu_us_per_op"]),
        "    raw    {client:6.1f} / {server:6.1f} / {responder:6.1f}".format(**r["cpu_us_per_op"]),
        "    fanout {client:6.1f} / {server:6.1f} / {responder:6.1f}".format(
            **res["raw_fanout"]["cpu_us_per_op"]
        ),
    ]


if __name__ == "__main__":
    main()
