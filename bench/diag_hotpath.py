"""Diagnostic: CPU cost of accord's own code per ask, with the network stubbed out.

Not one of the headline benchmarks: it uses private internals (`Mesh._transport`,
`Node._on_request`, `Node._nc.publish`) to take NATS and the other processes out of the picture,
so its numbers are stable on a noisy machine and point at regressions in accord's hot paths.

  client: `mesh.ask()` against a transport that answers instantly with a canned reply;
          baseline: the minimum any client does (msgspec-encode the message, await the same stub,
          msgspec-decode the reply).
  node:   request envelopes fed straight into `Node._on_request` (64 per batch over 1000 agents),
          replies captured by a stubbed publish; baseline: a minimal actor runtime (decode, one
          asyncio.Queue + task per agent, the same Counter handler, encode, await the same stub).

    python bench/diag_hotpath.py [--uvloop] [--json]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from _common import emit, environment, load_counter_app, median, parser, ratio, run

import accord
from accord import _codec as codec
from accord._ids import shard_of
from accord.testing import wait_for_placement

AGENTS = 1000
BATCH = 64


class _Stub:
    name = "stub"

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        return self.reply


class _FakeMsg:
    __slots__ = ("data", "reply")

    def __init__(self, data: bytes, reply: str) -> None:
        self.data = data
        self.reply = reply


def _cpu_per_op(samples: list[tuple[float, int]]) -> float:
    return median([c / n * 1e6 for c, n in samples])


async def client_cost(mesh: Any, app: Any, n: int, reps: int) -> tuple[float, float]:
    reply = codec.ok_reply(codec.encode(app.Count("counter/a1", 1, 1)), "msgpack", 1, "n")
    stub = _Stub(reply)
    real, mesh._transport = mesh._transport, stub
    inc = app.Increment(1)
    agents = [f"counter/a{k}" for k in range(AGENTS)]
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(app.Count)
    raw_reply = enc.encode(app.Count("counter/a1", 1, 1))
    stub_raw = _Stub(raw_reply)

    async def accord_block() -> None:
        for i in range(n):
            await mesh.ask(agents[i % AGENTS], inc)

    async def raw_block() -> None:
        for i in range(n):
            data = enc.encode(inc)
            dec.decode(await stub_raw.request(agents[i % AGENTS], data, 1.0))

    out: dict[str, list[tuple[float, int]]] = {"accord": [], "raw": []}
    try:
        await accord_block()
        await raw_block()
        for _ in range(reps):
            for name, block in (("accord", accord_block), ("raw", raw_block)):
                c0 = time.process_time()
                await block()
                out[name].append((time.process_time() - c0, n))
    finally:
        mesh._transport = real
    return _cpu_per_op(out["accord"]), _cpu_per_op(out["raw"])


async def node_cost(node: Any, app: Any, n: int, reps: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    state = {"done": 0, "target": 0}
    batch_done = asyncio.Event()

    async def stub_publish(subject: str, data: bytes) -> None:
        state["done"] += 1
        if state["done"] >= state["target"]:
            batch_done.set()

    body = codec.encode(app.Increment(1))
    msgs = []
    for k in range(AGENTS):
        target = f"counter/a{k}"
        req = codec.Request(v=1, kind="ask", target=target, type="Increment",
                            body=msgspec.Raw(body), timeout_ms=10_000)  # fmt: skip
        msgs.append((shard_of(target, node.config.num_shards), _FakeMsg(codec.encode(req), "r")))

    # the minimal actor runtime
    req_dec = msgspec.msgpack.Decoder(codec.Request)
    inc_dec = msgspec.msgpack.Decoder(app.Increment)
    enc = msgspec.msgpack.Encoder()
    queues: dict[str, asyncio.Queue[tuple[Any, str]]] = {}
    tasks: list[asyncio.Task[None]] = []

    async def actor(agent: Any, q: asyncio.Queue[tuple[Any, str]]) -> None:
        while True:
            m, reply_to = await q.get()
            result = await app.Counter.increment(agent, m)
            await stub_publish(reply_to, enc.encode(result))

    def raw_on_request(shard: int, msg: _FakeMsg) -> None:
        req = req_dec.decode(msg.data)
        q = queues.get(req.target)
        if q is None:
            agent = app.Counter()
            agent.id = accord.AgentId.parse(req.target)
            q = queues[req.target] = asyncio.Queue()
            tasks.append(loop.create_task(actor(agent, q)))
        q.put_nowait((inc_dec.decode(req.body), msg.reply))

    async def drive(on_request: Any, count: int) -> None:
        i = 0
        while i < count:
            state["target"] = state["done"] + BATCH
            batch_done.clear()
            for j in range(BATCH):
                shard, msg = msgs[(i + j) % AGENTS]
                on_request(shard, msg)
            i += BATCH
            await batch_done.wait()

    real = node._nc.publish
    node._nc.publish = stub_publish
    out: dict[str, list[tuple[float, int]]] = {"accord": [], "raw": []}
    try:
        await drive(node._on_request, 5 * AGENTS)
        await drive(raw_on_request, 5 * AGENTS)
        for _ in range(reps):
            for name, fn in (("accord", node._on_request), ("raw", raw_on_request)):
                c0 = time.process_time()
                await drive(fn, n)
                out[name].append((time.process_time() - c0, n))
    finally:
        node._nc.publish = real
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return _cpu_per_op(out["accord"]), _cpu_per_op(out["raw"])


async def bench(args: Any) -> dict[str, Any]:
    app = load_counter_app()
    server = accord.EmbeddedServer()
    url = await asyncio.to_thread(server.start)
    try:
        settings = accord.NodeSettings(cluster="diag")
        async with accord.Node([app.Counter], nats=url, name="diag", settings=settings) as node:
            await wait_for_placement(node, {"diag"}, timeout=30)
            async with accord.connect(url, cluster="diag") as mesh:
                await mesh.ask("counter/a0", app.Increment(1))  # warm caches and watchers
                c_acc, c_raw = await client_cost(mesh, app, args.n, args.reps)
            n_acc, n_raw = await node_cost(node, app, args.n, args.reps)
    finally:
        await asyncio.to_thread(server.stop)
    return {
        "benchmark": "diag_hotpath",
        "client_us_per_ask": c_acc,
        "client_baseline_us": c_raw,
        "client_ratio": ratio(c_acc, c_raw),
        "node_us_per_msg": n_acc,
        "node_baseline_us": n_raw,
        "node_ratio": ratio(n_acc, n_raw),
        "params": {"n": args.n, "reps": args.reps, "agents": AGENTS, "batch": BATCH},
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32_000, help="operations per measured block")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    lines = [
        f"diag_hotpath  (loop: {loop_name}; network stubbed; CPU us per op, median of {args.reps})",
        f"  client mesh.ask       accord {res['client_us_per_ask']:6.2f}  minimal client "
        f"{res['client_baseline_us']:6.2f}  ratio {res['client_ratio']:5.2f}",
        f"  node _on_request+turn accord {res['node_us_per_msg']:6.2f}  minimal actors "
        f"{res['node_baseline_us']:6.2f}  ratio {res['node_ratio']:5.2f}",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
