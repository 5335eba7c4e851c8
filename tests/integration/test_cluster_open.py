"""Opening one new cluster from several connections at once, on a real nats-server.

The first opener probes how much storage JetStream can reserve, with a stream that reserves
nearly all of it for a moment; a bucket created by another opener meanwhile was refused
(StorageFull, error 10047). Only the holder of the meta bucket's probe key probes now.
"""

from __future__ import annotations

import asyncio

from accord.cluster._config import PROBE_KEY, Names, open_cluster
from accord.engine._nats import NatsTransport


async def test_openers_at_once_all_succeed_with_one_budget(fresh_nats_url: str) -> None:
    engines = [await NatsTransport.connect([fresh_nats_url], f"opener-{i}") for i in range(4)]
    try:
        names = Names("together")
        opened = await asyncio.gather(*(open_cluster(e, names) for e in engines))
        budgets = {config.data_bytes for config, _ in opened}
        assert len(budgets) == 1 and budgets.pop() > 0, [c for c, _ in opened]
        meta = opened[0][1].meta
        assert await meta.get(PROBE_KEY, leader=True) is None, "the probe key was left behind"
        assert await meta.get("config", leader=True) is not None
        streams = await engines[0].api_call("STREAM.NAMES", b"{}", 5.0)
        assert not [s for s in streams["streams"] or [] if s.startswith("accordprobe_")]
    finally:
        for e in engines:
            await e.close()
