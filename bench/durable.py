"""Durable delivery: at-least-once tell throughput vs raw JetStream, and what exactly-once and
strong state cost an ask compared with a plain at-most-once ask.

    python bench/durable.py [--uvloop] [--json]

Part 1, `tell`: one `accord node` process hosting examples/durable_app.py on an embedded
nats-server. The bench process sends N `mesh.tell("tally/a{i%50}", Add(1, id=...), msg_id=...)`
with 64 senders (`tally` is at_least_once: each tell returns after the mailbox stream's PubAck);
the clock stops when the node has processed all N (the tally handler appends one line per
processing to $ACCORD_PROCESS_LOG, which the bench process tails). Baseline, same run, same
nats-server: a work-queue file stream with a duplicate window (the shape of accord's mailbox),
`js.publish` with `Nats-Msg-Id` and an awaited PubAck, same concurrency and payload size, and a
pull consumer (`fetch` batch 128, `ack()` each) in a separate OS process (this script again,
`_raw_consumer` mode). Accord and raw blocks alternate in rounds. Target: accord/raw >= 0.7.

Part 2, `ask`: sequential p50 to one agent and 64-in-flight throughput over 200 agents for
(a) `ledger` (exactly_once, strong state), (b) `slow_ledger` (strong state, at_most_once,
pause=0) and (c) `counter` (examples/counter_app.py: at_most_once, no state), the last on a
second accord cluster on the same nats-server. Reports (a)/(c) and (b)/(c). No target.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import nats
import nats.errors
from _common import (
    COUNTER_APP,
    ROOT,
    Cpu,
    emit,
    environment,
    load_counter_app,
    median,
    parser,
    percentile,
    ratio,
    run,
    sequential,
    throughput,
    verdict,
)
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from accord import _codec as codec
from accord._ids import AgentId
from accord.testing import Cluster, wait_for_placement

DURABLE_APP = ROOT / "examples" / "durable_app.py"
RAW_STREAM = "benchraw"
RAW_CONSUMER = "benchraw-consumer"
TALLY_AGENTS = 50
COUNTER_CLUSTER = "benchcnt"


def load_durable_app() -> ModuleType:
    """Import examples/durable_app.py under the name `accord node --app <file>` gives it."""
    name = "accord_app_durable_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DURABLE_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- raw JetStream consumer process ------------------------------------------------------------


async def raw_consumer(url: str, step: int) -> None:
    """Fetch (batch 128) and ack every message; print `done <total>` at every multiple of step."""
    nc = await nats.connect(url, name="bench-raw-js-consumer")
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(RAW_CONSUMER, RAW_STREAM)
    print("ready", flush=True)
    got = 0
    try:
        while True:
            try:
                msgs = await psub.fetch(128, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for m in msgs:
                await m.ack()
                got += 1
                if got % step == 0:
                    print(f"done {got}", flush=True)
    finally:
        await nc.close()


# -- helpers -----------------------------------------------------------------------------------


async def fan_out(send: Callable[[int], Awaitable[Any]], n: int, inflight: int) -> None:
    """Call send(0..n-1) with `inflight` concurrent senders."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await send(i)

    await asyncio.gather(*(worker() for _ in range(inflight)))


class LogTail:
    """Counts the lines appended to the process log by the node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._f: Any = None

    def poll(self) -> int:
        if self._f is None:
            if not self.path.exists():
                return 0
            self._f = open(self.path, "rb")  # noqa: SIM115
        self.lines += self._f.read().count(b"\n")
        return self.lines

    async def wait_for(self, lines: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while self.poll() < lines:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {self.lines} of {lines} processings logged")
            await asyncio.sleep(0.002)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def logged_ids(log: Path, prefix: str) -> list[str]:
    """The message ids of the processings logged by the tally agents, starting with prefix."""
    ids = (json.loads(x)["id"] for x in log.read_text().splitlines())
    return [i for i in ids if i.startswith(prefix)]


async def start_raw_consumer(url: str, step: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_raw_consumer", url, str(step),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    if line.strip() != b"ready":
        await stop_proc(proc)
        raise RuntimeError("raw consumer did not start")
    return proc


async def stop_proc(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- part 1: at-least-once tell vs raw JetStream ------------------------------------------------


async def part_tell(args: Any, cluster: Cluster, mesh: Any, app: ModuleType, log: Path) -> dict:
    n, inflight = args.n, args.inflight
    nc = await nats.connect(cluster.url, name="bench-raw-js-publisher")
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM, subjects=[f"{RAW_STREAM}.mbox.*"],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )  # fmt: skip
    await js.add_consumer(
        RAW_STREAM,
        ConsumerConfig(
            durable_name=RAW_CONSUMER, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, max_ack_pending=4096,
        ),
    )  # fmt: skip
    # The raw payload has the size of the envelope accord stores for one tell.
    sample = codec.Request(
        v=codec.PROTOCOL_VERSION, kind="tell", target="tally/a49", type="Add",
        body=msgspec.Raw(codec.encode(app.Add(1, id="r0m4999"))), id="r0m4999",
        delivery="at_least_once",
    )  # fmt: skip
    payload = b"x" * len(codec.encode(sample))
    tail = LogTail(log)
    # the consumer prints one `done` line per block of n (warm-up and every round send n)
    consumer = await start_raw_consumer(cluster.url, n)
    assert consumer.stdout is not None
    try:
        tally = [f"tally/a{k}" for k in range(TALLY_AGENTS)]
        subjects = [f"{RAW_STREAM}.mbox.{k}" for k in range(TALLY_AGENTS)]

        async def accord_block(tag: str, count: int) -> tuple[float, float]:
            target = tail.lines + count

            async def send(i: int) -> None:
                mid = f"{tag}m{i}"
                await mesh.tell(tally[i % TALLY_AGENTS], app.Add(1, id=mid), msg_id=mid)

            t0 = time.perf_counter()
            await fan_out(send, count, inflight)
            t_pub = time.perf_counter() - t0
            await tail.wait_for(target, 60)
            return t_pub, time.perf_counter() - t0

        async def raw_block(tag: str, count: int) -> tuple[float, float]:
            async def send(i: int) -> None:
                await js.publish(
                    subjects[i % TALLY_AGENTS], payload, headers={"Nats-Msg-Id": f"{tag}m{i}"}
                )

            t0 = time.perf_counter()
            await fan_out(send, count, inflight)
            t_pub = time.perf_counter() - t0
            line = await asyncio.wait_for(consumer.stdout.readline(), 60)
            if not line.startswith(b"done"):
                raise RuntimeError(f"raw consumer: {line!r}")
            return t_pub, time.perf_counter() - t0

        # warm-up: activate all tally agents and run both paths once (n messages each)
        await accord_block("w", n)
        await raw_block("w", n)

        pids = {
            "client": os.getpid(),
            "server": cluster.server.pid if cluster.server else 0,
            "node": cluster.nodes["node-1"].pid,
            "consumer": consumer.pid,
        }
        cpu = {"accord": Cpu(pids), "raw": Cpu(pids)}
        res: dict[str, dict[str, list[float]]] = {
            k: {"pub": [], "done": []} for k in ("accord", "raw")
        }
        for r in range(args.rounds):
            for name, block in (("accord", accord_block), ("raw", raw_block)):
                cpu[name].start()
                t_pub, t_done = await block(f"r{r}", n)
                cpu[name].stop()
                res[name]["pub"].append(n / t_pub)
                res[name]["done"].append(n / t_done)
    finally:
        await stop_proc(consumer)
        await nc.close()
        tail.close()

    measured = logged_ids(log, "r")
    out: dict[str, Any] = {"n": n, "payload_bytes": len(payload)}
    for name in ("accord", "raw"):
        out[name] = {
            "msgs_s": median(res[name]["done"]),
            "rounds_msgs_s": [round(x) for x in res[name]["done"]],
            "publish_msgs_s": median(res[name]["pub"]),
            "cpu_us_per_msg": cpu[name].per_op_us(n * args.rounds),
        }
    out["accord"]["processed_unique"] = len(set(measured))
    out["accord"]["duplicates"] = len(measured) - len(set(measured))
    out["ratio"] = ratio(out["accord"]["msgs_s"], out["raw"]["msgs_s"])
    pairs = zip(res["accord"]["done"], res["raw"]["done"], strict=True)
    out["rounds_ratio"] = [round(ratio(a, b), 2) for a, b in pairs]
    out["publish_ratio"] = ratio(out["accord"]["publish_msgs_s"], out["raw"]["publish_msgs_s"])
    out["target_met"] = out["ratio"] >= 0.7
    return out


# -- part 2: exactly-once / strong state vs at-most-once ask -------------------------------------


async def part_ask(args: Any, cluster: Cluster, mesh: Any, app: ModuleType) -> dict:
    counter_app = load_counter_app()
    inc = counter_app.Increment(1)
    add = app.Add(1)
    n_agents = args.agents
    with Cluster(app=str(COUNTER_APP), nodes=1, url=cluster.url, cluster=COUNTER_CLUSTER) as cc:
        async with cc.connect() as cmesh:
            await wait_for_placement(cmesh, {"node-1"}, timeout=30)
            modes = {
                t: await mesh._directory.mode(AgentId.parse(f"{t}/x"), None)
                for t in ("ledger", "slow_ledger")
            }
            modes["counter"] = await cmesh._directory.mode(AgentId.parse("counter/x"), None)
            assert modes == {
                "ledger": "exactly_once",
                "slow_ledger": "at_most_once",
                "counter": "at_most_once",
            }, modes
            kinds: dict[str, tuple[Any, Any, str]] = {
                "ledger": (mesh, add, "ledger"),
                "slow_ledger": (mesh, add, "slow_ledger"),
                "counter": (cmesh, inc, "counter"),
            }

            def one(kind: str) -> Callable[[], Awaitable[Any]]:
                m, msg, t = kinds[kind]
                target = f"{t}/x"
                return lambda: m.ask(target, msg)

            def many(kind: str) -> Callable[[int], Awaitable[Any]]:
                m, msg, t = kinds[kind]
                targets = [f"{t}/t{k}" for k in range(n_agents)]
                return lambda i: m.ask(targets[i % n_agents], msg)

            for kind in kinds:  # warm-up: activate every agent, warm both paths
                await fan_out(many(kind), n_agents, args.inflight)
                await sequential(one(kind), 100)
                await throughput(many(kind), 0.3, args.inflight)

            pids = {
                "client": os.getpid(),
                "server": cluster.server.pid if cluster.server else 0,
                "durable_node": cluster.nodes["node-1"].pid,
                "counter_node": cc.nodes["node-1"].pid,
            }
            lat: dict[str, list[float]] = {k: [] for k in kinds}
            tput: dict[str, list[float]] = {k: [] for k in kinds}
            ops = dict.fromkeys(kinds, 0)
            cpu = {k: Cpu(pids) for k in kinds}
            for _ in range(args.rounds):
                for kind in kinds:
                    lat[kind] += await sequential(one(kind), args.seq)
                for kind in kinds:
                    cpu[kind].start()
                    done, elapsed = await throughput(many(kind), args.duration, args.inflight)
                    cpu[kind].stop()
                    ops[kind] += done
                    tput[kind].append(done / elapsed)
    out: dict[str, Any] = {}
    for kind in kinds:
        out[kind] = {
            "delivery": modes[kind],
            "seq_p50_us": percentile(lat[kind], 50) * 1e6,
            "seq_p99_us": percentile(lat[kind], 99) * 1e6,
            "tput_ops_s": median(tput[kind]),
            "tput_rounds_ops_s": [round(x) for x in tput[kind]],
            "cpu_us_per_op": cpu[kind].per_op_us(ops[kind]),
        }
    c = out["counter"]
    for kind in ("ledger", "slow_ledger"):
        out[f"{kind}_vs_counter"] = {
            "p50_ratio": ratio(out[kind]["seq_p50_us"], c["seq_p50_us"]),
            "tput_ratio": ratio(out[kind]["tput_ops_s"], c["tput_ops_s"]),
        }
    return out


async def bench(args: Any) -> dict[str, Any]:
    app = load_durable_app()
    with tempfile.TemporaryDirectory(prefix="accord-bench-durable-") as tmp:
        log = Path(tmp) / "process.log"
        env = {"ACCORD_PROCESS_LOG": str(log)}
        with Cluster(app=str(DURABLE_APP), nodes=1, env=env) as cluster:
            async with cluster.connect() as mesh:
                await wait_for_placement(mesh, {"node-1"}, timeout=30)
                tell = await part_tell(args, cluster, mesh, app, log)
                ask = await part_ask(args, cluster, mesh, app)
    return {
        "benchmark": "durable",
        "tell": tell,
        "ask": ask,
        "params": {
            "rounds": args.rounds,
            "tell_n": args.n,
            "inflight": args.inflight,
            "tally_agents": TALLY_AGENTS,
            "ask_seq_per_round": args.seq,
            "ask_duration_s": args.duration,
            "ask_agents": args.agents,
        },
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_raw_consumer":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(raw_consumer(sys.argv[2], int(sys.argv[3])))
        return
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--n", type=int, default=5000, help="tells per block (part 1)")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--seq", type=int, default=300, help="sequential asks per kind and round")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per ask throughput block")
    p.add_argument("--agents", type=int, default=200, help="agents per kind, ask throughput")
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    t, a = res["tell"], res["ask"]
    lines = [
        f"durable  (client loop: {loop_name}; nodes and raw consumer: asyncio)",
        f"  part 1: {t['n']} tells, {args.inflight} senders, {TALLY_AGENTS} tally agents "
        f"(at_least_once), until all processed",
        f"    accord tell + agent turn   {t['accord']['msgs_s']:8.0f} msgs/s  "
        f"(publish phase {t['accord']['publish_msgs_s']:8.0f} msgs/s)",
        f"    raw js.publish + fetch/ack {t['raw']['msgs_s']:8.0f} msgs/s  "
        f"(publish phase {t['raw']['publish_msgs_s']:8.0f} msgs/s)",
        f"    ratio accord/raw = {t['ratio']:.2f}  {verdict(t['ratio'], 0.7, True)}; "
        f"per round {t['rounds_ratio']}; publish phase only {t['publish_ratio']:.2f}",
        f"    accord processed {t['accord']['processed_unique']} unique, "
        f"{t['accord']['duplicates']} duplicates",
        "    CPU us per msg (client / nats-server / node / raw consumer):",
        "      accord {client:6.1f} / {server:6.1f} / {node:6.1f} / {consumer:6.1f}".format(
            **t["accord"]["cpu_us_per_msg"]
        ),
        "      raw    {client:6.1f} / {server:6.1f} / {node:6.1f} / {consumer:6.1f}".format(
            **t["raw"]["cpu_us_per_msg"]
        ),
        f"  part 2: ask, sequential p50/p99 to one agent; {args.inflight} in flight over "
        f"{args.agents} agents",
    ]
    for kind in ("ledger", "slow_ledger", "counter"):
        k = a[kind]
        lines.append(
            f"    {kind:<12} {k['delivery']:<13} p50 {k['seq_p50_us']:7.0f} us  "
            f"p99 {k['seq_p99_us']:7.0f} us  {k['tput_ops_s']:8.0f} ops/s  "
            f"CPU us/op client {k['cpu_us_per_op']['client']:.0f} "
            f"server {k['cpu_us_per_op']['server']:.0f} "
            f"node {k['cpu_us_per_op']['durable_node'] + k['cpu_us_per_op']['counter_node']:.0f}"
        )
    for kind in ("ledger", "slow_ledger"):
        r = a[f"{kind}_vs_counter"]
        lines.append(
            f"    {kind}/counter: p50 ratio {r['p50_ratio']:.2f}, "
            f"throughput ratio {r['tput_ratio']:.2f}"
        )
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
