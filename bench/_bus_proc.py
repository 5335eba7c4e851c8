"""One process of `bench/bus.py`: a producer or a consumer, on the bus or on a raw client.

`python _bus_proc.py ROLE IMPL BACKEND URL TOPIC PARTITIONS [N RATE]`; ROLE `produce` or `consume`,
IMPL `bus` or `raw`, BACKEND `redis` or `jetstream`. A consumer prints `held <n>` when its
partitions change (`held 0` at once for raw), then obeys stdin lines: `mark` (zero its CPU
clock), `count` (prints its handled count), `quit` (prints one JSON report and exits). A producer
publishes N events (RATE 0: 32 in flight; else paced at RATE/s) and prints one JSON report.
$BENCH_NO_HIREDIS=1 hides hiredis, so redis-py parses replies in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if os.environ.get("BENCH_NO_HIREDIS") == "1":
    sys.modules["hiredis"] = None  # type: ignore[assignment]

import msgspec

BODY = "x" * 64  # with the other fields and JSON framing: ~100 bytes per event
INFLIGHT = 32


class Ev(msgspec.Struct):
    i: int
    at: float
    s: str = BODY


DECODE = msgspec.json.Decoder(Ev).decode


def cpu() -> float:
    t = os.times()
    return t.user + t.system


async def lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Tally:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.lat: list[float] = []
        self.last = 0.0
        self.cpu0 = cpu()

    def got(self, ev: Ev) -> None:
        now = time.time()
        self.seen.append(ev.i)
        self.lat.append(now - ev.at)
        self.last = now

    def report(self, cpu_run: float) -> str:
        """`cpu_run`: CPU seconds from `mark` to `quit` (not the stop that follows)."""
        return json.dumps({"seen": self.seen, "lat": self.lat, "last": self.last,
                           "cpu_run": cpu_run, "pid": os.getpid()})  # fmt: skip


async def control(tally: Tally, held: Any = None) -> None:
    """Serve `mark` / `count` / `quit` on stdin; report `held` changes (the bus's partitions)."""
    reader = await lines()
    shown = -1

    async def watch() -> None:
        nonlocal shown
        while True:
            n = len(held()) if held is not None else 0
            if n != shown:
                shown = n
                say(f"held {n}")
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "mark":
            tally.cpu0 = cpu()
            tally.seen.clear()
            tally.lat.clear()
        elif line == "count":
            say(f"count {len(tally.seen)}")
        elif line in ("quit", ""):
            watcher.cancel()
            return


async def serve(tally: Tally, loop: Any) -> float:
    """Run a raw consumer's `loop()` until `quit`; its CPU seconds since `mark`."""
    task = asyncio.create_task(loop())
    await control(tally)
    cpu_run = cpu() - tally.cpu0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return cpu_run


async def consume_bus(url: str, topic: str, partitions: int) -> None:
    import accord

    tally = Tally()

    async def h(msg: Ev) -> None:
        tally.got(msg)

    async with accord.bus.connect(url, partitions=partitions) as bus:
        sub = await bus.subscribe(topic, group="g", handler=h, min_idle=2)
        await control(tally, lambda: sub.partitions)
        cpu_run = cpu() - tally.cpu0
        await sub.stop()
    say(tally.report(cpu_run))


async def consume_raw_redis(url: str, topic: str, partitions: int) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url, socket_timeout=30)
    name = f"c{os.getpid()}"
    keys = [f"{topic}:{p}" for p in range(partitions)]
    for k in keys:
        try:
            await r.xgroup_create(k, "g", id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    tally = Tally()

    async def loop() -> None:
        while True:  # one read over every stream, one XACK per stream read: a careful raw loop
            reply = await r.xreadgroup("g", name, dict.fromkeys(keys, ">"), count=128, block=200)
            for stream, entries in reply or []:
                if entries:
                    await r.xack(stream, "g", *(eid for eid, _f in entries))
                    for _eid, fields in entries:
                        tally.got(DECODE(fields[b"body"]))

    cpu_run = await serve(tally, loop)
    await r.aclose()
    say(tally.report(cpu_run))


async def consume_raw_jetstream(url: str, topic: str, partitions: int) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe(f"{topic}.*", durable="g", stream=topic)
    tally = Tally()

    async def loop() -> None:
        while True:
            try:
                msgs = await psub.fetch(128, timeout=0.2)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for m in msgs:
                await m.ack()
                tally.got(DECODE(m.data))

    cpu_run = await serve(tally, loop)
    await nc.close()
    say(tally.report(cpu_run))


async def produce(impl: str, backend: str, url: str, topic: str, parts: int, n: int,
                  rate: float) -> None:  # fmt: skip
    publish: Any
    close: Any
    if impl == "bus":
        import accord

        cm = accord.bus.connect(url, partitions=parts)
        bus = await cm.__aenter__()

        async def publish(i: int) -> None:
            await bus.publish(topic, Ev(i, time.time()), key=f"k{i % 64}")

        async def close() -> None:
            await cm.__aexit__(None, None, None)
    elif backend == "redis":
        import zlib

        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, socket_timeout=30)
        r = aioredis.Redis(connection_pool=pool)  # like the bus: past 64, wait for a connection

        async def publish(i: int) -> None:
            k = f"k{i % 64}"
            body = msgspec.json.encode(Ev(i, time.time()))
            await r.xadd(f"{topic}:{zlib.crc32(k.encode()) % parts}", {"key": k, "body": body})

        async def close() -> None:
            await r.aclose()
    else:
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()

        async def publish(i: int) -> None:
            await js.publish(f"{topic}.{i % parts}", msgspec.json.encode(Ev(i, time.time())))

        async def close() -> None:
            await nc.close()

    acked: list[float] = []  # publish -> ack (the store's confirmation), seconds

    async def timed(i: int) -> None:
        at = time.perf_counter()
        await publish(i)
        acked.append(time.perf_counter() - at)

    cpu0, t0 = cpu(), time.time()
    if rate <= 0:
        sem = asyncio.Semaphore(INFLIGHT)

        async def one(i: int) -> None:
            async with sem:
                await timed(i)

        await asyncio.gather(*(one(i) for i in range(n)))
    else:
        pending: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(timed(i))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    t1 = time.time()
    used = cpu() - cpu0
    await close()
    say(json.dumps({"t0": t0, "t1": t1, "published": n, "cpu": used, "pid": os.getpid(),
                    "ack": acked}))  # fmt: skip


def main() -> None:
    role, impl, backend, url, topic, parts = sys.argv[1:7]
    where = os.environ.get("BENCH_PROFILE")
    if where:  # pyinstrument (if installed): where this process spends its time
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        try:
            run(role, impl, backend, url, topic, parts)
        finally:
            profiler.stop()
            name = f"{role}-{backend}-{os.getpid()}.txt"
            (Path(where) / name).write_text(profiler.output_text(show_all=False))
        return
    run(role, impl, backend, url, topic, parts)


def run(role: str, impl: str, backend: str, url: str, topic: str, parts: str) -> None:
    p = int(parts)
    if role == "produce":
        asyncio.run(produce(impl, backend, url, topic, p, int(sys.argv[7]), float(sys.argv[8])))
    elif impl == "bus":
        asyncio.run(consume_bus(url, topic, p))
    elif backend == "redis":
        asyncio.run(consume_raw_redis(url, topic, p))
    else:
        asyncio.run(consume_raw_jetstream(url, topic, p))


if __name__ == "__main__":
    main()
