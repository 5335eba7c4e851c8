"""Shard ownership on the node side (`ShardHost`), above the engine seam: a lease lost while its
shard's subscription was being made leaves no subscription behind, so when the shard comes back
its messages reach the node once, not twice."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from accord._background import Background
from accord.cluster._config import Names
from accord.engine.memory import MemoryEngine
from accord.runtime._ownership import ShardHost


class GatedEngine:
    """The in-memory engine, whose `subscribe_direct` waits for `gate` (a slow server)."""

    def __init__(self, engine: MemoryEngine) -> None:
        self.engine = engine
        self.gate = asyncio.Event()
        self.gate.set()

    async def subscribe_direct(self, subject: str, fn: Any) -> Any:
        await self.gate.wait()
        return await self.engine.subscribe_direct(subject, fn)


class Shards:
    def __init__(self) -> None:
        self.leases: dict[int, int] = {}

    def held(self) -> dict[int, int]:
        return dict(self.leases)


class Inbound:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_request(self, shard: int, msg: Any) -> None:
        self.seen.append(shard)


class CutOff:
    async def acquired(self, shard: int) -> None:
        pass


async def test_a_lease_lost_while_subscribing_leaves_no_subscription() -> None:
    engine = MemoryEngine()
    gated = GatedEngine(engine)
    table = SimpleNamespace(in_shard=lambda shard, keep=None: [])
    host = ShardHost(Names("c"), [], gated, table, None, SimpleNamespace(shards=0),  # type: ignore[arg-type]
                     needs_mailbox=False, drain_timeout=1.0, sends=Background(),
                     running=lambda: True)  # fmt: skip
    shards, inbound = Shards(), Inbound()
    host.attach(shards, inbound, CutOff())  # type: ignore[arg-type]
    subject = Names("c").shard_subject(3)

    shards.leases[3] = 5
    gated.gate.clear()
    acquiring = asyncio.create_task(host.shard_acquired(3, 5))
    await asyncio.sleep(0)  # it waits for its subscription
    del shards.leases[3]  # the lease is lost meanwhile; its release finds nothing to end
    await host.shard_released(3, graceful=False)
    gated.gate.set()
    await asyncio.wait_for(acquiring, 5)
    await engine.publish(subject, b"m1")
    await _settle()
    assert inbound.seen == [], "a subscription of a lost lease stayed"

    shards.leases[3] = 6  # the shard comes back
    await host.shard_acquired(3, 6)
    await engine.publish(subject, b"m2")
    await _settle()
    assert inbound.seen == [3], "a message must reach the node once"


async def _settle() -> None:
    """Let the in-memory engine hand over what was published (it delivers on later ticks)."""
    for _ in range(20):
        await asyncio.sleep(0)
