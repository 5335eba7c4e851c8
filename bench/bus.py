"""The event bus against raw clients of its stores, in one run (docs/benchmarks.md, "Event bus").

Throughput: 1 producer (32 publishes in flight) and 2 consumers of one group, 100-byte events,
publish + handle + ack of N events; the bus vs a raw redis-py XADD / XREADGROUP / XACK loop, and
vs raw nats-py JetStream publish / pull / ack. Latency: publish -> handler at a paced 1,000
events/s (p50/p99). Everything runs in this one process, servers started here (redis-server with
`appendfsync always`, or `--appendfsync everysec`; nats-server with its defaults).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
import nats
import redis.asyncio as aioredis
from _common import emit, environment, parser, percentile, ratio, run

import accord
from accord.testing.redis import RedisServer

BODY = "x" * 80  # with the field name and JSON framing: ~100 bytes per event
INFLIGHT = 32
PARTITIONS = [8]  # --partitions
APPENDFSYNC = ["always"]  # --appendfsync


class Ev(msgspec.Struct):
    s: str
    at: float = 0.0


async def _settled(subs: list[Any]) -> None:
    """Until the consumers share the partitions (the second one joined after the first took
    them all): the clock measures the steady state, not the hand-over."""
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        held = [len(s.partitions) for s in subs]
        if sum(held) == PARTITIONS[0] and max(held) - min(held) <= 1:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"partitions not shared after 30 s: {held}")


async def _pump(n: int, publish: Any) -> None:
    sem = asyncio.Semaphore(INFLIGHT)

    async def one(i: int) -> None:
        async with sem:
            await publish(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def bus_throughput(url: str, n: int) -> float:
    topic = f"bench{uuid.uuid4().hex[:6]}"
    done = asyncio.Event()
    count = 0

    async def h(msg: Ev, d: accord.bus.Delivery) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    async with accord.bus.connect(url, partitions=PARTITIONS[0]) as bus:
        subs = [await bus.subscribe(topic, group="g", handler=h, min_idle=2) for _ in range(2)]
        await _settled(subs)
        t0 = time.perf_counter()
        await _pump(n, lambda i: bus.publish(topic, Ev(BODY), key=f"k{i % 64}"))
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - t0
        for s in subs:
            await s.stop()
    return n / elapsed


async def raw_redis(url: str, n: int) -> float:
    r = aioredis.Redis.from_url(url, socket_timeout=30)
    key = f"raw{uuid.uuid4().hex[:6]}"
    await r.xgroup_create(key, "g", id="0", mkstream=True)
    count = 0
    done = asyncio.Event()

    async def consumer(name: str) -> None:
        nonlocal count
        while not done.is_set():
            reply = await r.xreadgroup("g", name, {key: ">"}, count=128, block=200)
            for _s, entries in reply or []:
                if entries:  # one XACK per read: what a careful hand-written loop does
                    await r.xack(key, "g", *(eid for eid, _fields in entries))
                    count += len(entries)
            if count >= n:
                done.set()

    body = msgspec.json.encode(Ev(BODY))
    tasks = [asyncio.create_task(consumer(f"c{i}")) for i in range(2)]
    t0 = time.perf_counter()
    await _pump(n, lambda i: r.xadd(key, {"key": f"k{i % 64}", "body": body}))
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    await r.aclose()
    return n / elapsed


async def raw_jetstream(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"raw{uuid.uuid4().hex[:6]}"
    await js.add_stream(name=name, subjects=[f"{name}.*"])
    body = msgspec.json.encode(Ev(BODY))
    count = 0
    done = asyncio.Event()
    psub = await js.pull_subscribe(f"{name}.*", durable="g", stream=name)

    async def consumer() -> None:
        nonlocal count
        while not done.is_set():
            try:
                msgs = await psub.fetch(128, timeout=0.2)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for m in msgs:
                await m.ack()
                count += 1
            if count >= n:
                done.set()

    tasks = [asyncio.create_task(consumer()) for _ in range(2)]
    t0 = time.perf_counter()
    await _pump(n, lambda i: js.publish(f"{name}.{i % 8}", body))
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    await js.delete_stream(name)
    await nc.close()
    return n / elapsed


async def bus_latency(url: str, rate: int, seconds: float) -> tuple[float, float, int, int]:
    topic = f"lat{uuid.uuid4().hex[:6]}"
    lat: list[float] = []

    async def h(msg: Ev) -> None:
        lat.append(time.time() - msg.at)

    async with accord.bus.connect(url, partitions=PARTITIONS[0]) as bus:
        subs = [await bus.subscribe(topic, group="g", handler=h, min_idle=2) for _ in range(2)]
        await _settled(subs)
        total = int(rate * seconds)
        start = time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(bus.publish(topic, Ev(BODY, time.time()), key=f"k{i % 64}"))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        deadline = time.perf_counter() + 30
        while len(lat) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        for s in subs:
            await s.stop()
    return percentile(lat, 50), percentile(lat, 99), len(lat), total


async def main(n: int) -> tuple[dict[str, Any], list[str]]:
    redis = RedisServer(appendfsync=APPENDFSYNC[0])
    nats_server = accord.EmbeddedServer()
    rurl, nurl = redis.start(), nats_server.start()
    try:
        out: dict[str, Any] = {}
        for kind, url, raw in (("redis", rurl, raw_redis), ("jetstream", nurl, raw_jetstream)):
            base = await raw(url, n)
            mine = await bus_throughput(url, n)
            p50, p99, got, total = await bus_latency(url, 1000, 3.0)
            out[kind] = {"raw_per_s": base, "bus_per_s": mine, "ratio": ratio(mine, base),
                         "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "delivered": got,
                         "published": total}  # fmt: skip
    finally:
        redis.cleanup()
        nats_server.stop()
    lines = [f"{n} events of ~100 bytes, 1 producer ({INFLIGHT} in flight), 2 consumers, "
             f"{PARTITIONS[0]} partitions, redis appendfsync {APPENDFSYNC[0]}"]  # fmt: skip
    for kind, r in out.items():
        lines.append(
            f"{kind:9s} bus {r['bus_per_s']:7.0f}/s  raw {r['raw_per_s']:7.0f}/s  "
            f"ratio {r['ratio']:.2f}x  latency at 1000/s p50 {r['p50_ms']:.1f} ms "
            f"p99 {r['p99_ms']:.1f} ms  delivered {r['delivered']}/{r['published']}"
        )
    return out, lines


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="always")
    args = p.parse_args()
    PARTITIONS[0] = args.partitions
    APPENDFSYNC[0] = args.appendfsync
    (result, lines), loop_name = run(lambda: main(args.events), args.uvloop)
    result["environment"] = environment(loop_name)
    emit(result, args.json, lines)
