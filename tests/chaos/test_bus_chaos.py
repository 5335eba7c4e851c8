"""The event bus under faults, on both backends, with real processes.

3,000 events over 30 keys go to two consumer processes of one group; one consumer is SIGKILLed
and restarted mid-stream, and the store itself (redis-server with `appendfsync always`, or
nats-server with `sync_interval: always`) is SIGKILLed and restarted mid-stream. Every
acknowledged publish must be handled at least once, each key's events first handled in publish
order; duplicates are counted and printed. Then: routing to an `exactly_once` agent keeps exact
totals through consumer kills.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

import accord
from accord.testing import Cluster
from accord.testing.redis import RedisServer

from ._support import eventually

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("bus_worker.py"))
EVENTS, KEYS = 3000, 30


class Step(msgspec.Struct):
    n: int


class Worker:
    """One consumer process, stopped by PID."""

    def __init__(self, mode: str, url: str, topic: str, log: Path, env: dict[str, str]) -> None:
        self.args = [sys.executable, WORKER, mode, url, topic, "g", str(log)]
        self.log = log
        self.env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL)
        return self

    async def ready(self) -> None:
        ready = Path(f"{self.log}.ready")
        pid = str(self.proc.pid if self.proc else "")

        def pids() -> list[str]:
            return ready.read_text().split() if ready.exists() else []

        async def probe() -> bool | None:
            return True if pid in await asyncio.to_thread(pids) else None

        await eventually(probe, 30, f"worker {pid} consuming")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _handled(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1])))
    return out


async def _scenario(
    url: str, tmp_path: Path, restart_store: Callable[[], Awaitable[None]], what: str
) -> None:
    log = tmp_path / "handled.log"
    workers = [Worker("record", url, "chaos", log, {}).start() for _ in range(2)]
    try:
        for w in workers:
            await w.ready()
        acked: list[tuple[str, int]] = []
        unconfirmed = 0
        async with accord.bus.connect(url, partitions=6) as bus:

            async def publisher() -> None:
                nonlocal unconfirmed
                for i in range(EVENTS):
                    key, n = f"k{i % KEYS}", i // KEYS
                    while True:  # an unconfirmed publish is published again (maybe twice)
                        try:
                            await bus.publish("chaos", Step(n), key=key)
                            break
                        except (accord.bus.PublishUnconfirmed, accord.bus.BusUnavailable):
                            unconfirmed += 1
                            await asyncio.sleep(0.2)
                    acked.append((key, n))
                    if i % 10 == 0:
                        await asyncio.sleep(0.01)  # ~1,000 events/s: the faults land mid-stream

            async def chaos() -> None:
                await eventually(lambda: _at_least(log, 600), 60, "600 handled")
                workers[0].kill()
                workers[0].start()
                await workers[0].ready()
                await eventually(lambda: _at_least(log, 1500), 60, "1500 handled")
                await restart_store()

            await asyncio.gather(publisher(), chaos())

            async def all_handled() -> bool | None:
                return set(acked) <= set(_handled(log)) or None

            await eventually(all_handled, 90, "every acknowledged event handled", interval=0.25)
        handled = _handled(log)
        firsts: dict[str, list[int]] = {}
        seen: set[tuple[str, int]] = set()
        for key, n in handled:
            if (key, n) not in seen:
                seen.add((key, n))
                firsts.setdefault(key, []).append(n)
        duplicates = len(handled) - len(seen)
        print(f"{what}: {len(acked)} acknowledged, {unconfirmed} unconfirmed publishes retried, "
              f"{len(handled)} handlings, {duplicates} duplicates")  # fmt: skip
        for key, ns in firsts.items():
            assert ns == sorted(ns), f"key {key} first handled out of publish order"
        assert len(acked) == EVENTS
    finally:
        for w in workers:
            w.stop()


async def _at_least(log: Path, n: int) -> bool | None:
    return True if len(_handled(log)) >= n else None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_redis_consumer_sigkill_and_server_restart_lose_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def restart() -> None:
        redis_server.kill()
        await asyncio.to_thread(redis_server.start)

    await _scenario(redis_server.url, tmp_path, restart, "redis")


async def test_jetstream_consumer_and_server_sigkill_lose_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "js.conf"
    conf.write_text("jetstream {\n  sync_interval: always\n}\n")
    server = accord.EmbeddedServer(tmp_path / "nats", extra_args=["-c", str(conf)])
    url = server.start()
    try:

        async def restart() -> None:
            pid = server.pid
            assert pid is not None
            os.kill(pid, 9)
            await asyncio.to_thread(server.wait)
            await asyncio.to_thread(server.start)

        await _scenario(url, tmp_path, restart, "jetstream")
    finally:
        server.stop()


class Add(msgspec.Struct):
    n: int = 1
    id: str = ""
    pause: float = 0.0


class Read(msgspec.Struct):
    pass


async def test_route_to_an_exactly_once_agent_counts_each_event_once(tmp_path: Path) -> None:
    """Events routed to `ledger/<key>` (exactly_once) while the routing consumer is SIGKILLed
    twice: every ledger's total equals the number of its events."""
    app = str(ROOT / "examples" / "durable_app.py")
    per_key, keys = 40, [f"c{i}" for i in range(8)]
    with Cluster(app, 1, log_dir=tmp_path / "logs") as cluster:
        env = {"ACCORD_NATS": cluster.url}
        log = tmp_path / "route.log"
        worker = Worker("route", cluster.url, "ledger-feed", log, env).start()
        try:
            await worker.ready()
            async with accord.bus.connect(cluster.url, partitions=6) as bus:
                for i in range(per_key * len(keys)):
                    await bus.publish("ledger-feed", Add(1), key=keys[i % len(keys)])
                    if i in (100, 200):  # mid-stream, with events in flight
                        worker.kill()
                        worker.start()
                        await worker.ready()
                    await asyncio.sleep(0.005)
            async with cluster.connect() as mesh:

                async def totals() -> dict[str, int] | None:
                    out = {}
                    for k in keys:
                        try:
                            out[k] = await mesh.ask(f"ledger/{k}", Read(), timeout=5)
                        except accord.AccordError:
                            return None
                    return out if all(v >= per_key for v in out.values()) else None

                final = await eventually(totals, 60, "every ledger's total", interval=0.5)
        finally:
            worker.stop()
    assert final == dict.fromkeys(keys, per_key)
