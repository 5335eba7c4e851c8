"""`open_cluster` over the in-memory engine: it opens every bucket as one typed `Buckets`, stores
the configuration once (the first creator wins, the shard count cannot change), retries while the
engine does not answer and fails at once when the engine refuses."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

import accord
from accord.cluster._config import Buckets, Names, open_cluster
from accord.engine._api import Refused
from accord.engine.memory import MemoryEngine


async def test_every_bucket_is_opened_by_name_and_the_config_is_stored() -> None:
    engine = MemoryEngine()
    config, buckets = await open_cluster(engine, Names("c1"), num_shards=8, lease_ttl=3)
    assert (config.num_shards, config.lease_ttl) == (8, 3)
    fields = [f.name for f in dataclasses.fields(Buckets)]
    assert [getattr(buckets, f).name for f in fields] == [f"accord_c1_{f}" for f in fields]
    assert await engine.stream_state("accord_c1_events") is not None


async def test_the_first_configuration_stands_and_the_shard_count_is_fixed() -> None:
    engine = MemoryEngine()
    (first, _), (second, _) = await asyncio.gather(
        open_cluster(engine, Names("c2"), num_shards=16, lease_ttl=2),
        open_cluster(engine, Names("c2"), num_shards=16, lease_ttl=5),
    )
    assert first == second  # both read back the one that was created
    later, _ = await open_cluster(engine, Names("c2"))
    assert later == first
    with pytest.raises(accord.ConfigurationError, match="fixed at creation"):
        await open_cluster(engine, Names("c2"), num_shards=32)


async def test_an_engine_not_answering_yet_is_retried() -> None:
    engine = MemoryEngine()
    engine.fail_next("bucket", times=2)  # NotConnected twice (a leader election, say)
    config, _ = await open_cluster(engine, Names("c3"))
    assert config.num_shards == 64


async def test_an_engine_refusal_fails_at_once_as_not_connected() -> None:
    engine = MemoryEngine()
    engine.fail_next("bucket", Refused("insufficient resources (injected)"))
    with pytest.raises(accord.NotConnected, match="insufficient resources"):
        await open_cluster(engine, Names("c4"), replicas=3)
