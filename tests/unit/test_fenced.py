"""Fenced writes (`coord/_leases.fenced_write`) over the in-memory engine: a write with an older
token than the stored one is refused, an equal or newer one is stored, and a writer that keeps
losing the compare-and-set race gives up with `Contention`."""

from __future__ import annotations

import pytest

import accord
from accord._errors import Contention
from accord.coord._leases import fenced_read, fenced_write
from accord.engine._api import KV, BucketSpec, WrongRevision
from accord.engine.memory import MemoryEngine


@pytest.fixture
def engine() -> MemoryEngine:
    return MemoryEngine()


@pytest.fixture
async def kv(engine: MemoryEngine) -> KV:
    return await engine.bucket(BucketSpec(name="coord"))


async def test_fenced_read_returns_the_token_and_data_last_written(kv: KV) -> None:
    assert await fenced_read(kv, "report") is None
    await fenced_write(kv, "report", b"v1", 3)
    assert await fenced_read(kv, "report") == (3, b"v1")


async def test_an_older_token_is_refused_and_leaves_the_newer_write_in_place(kv: KV) -> None:
    await fenced_write(kv, "report", b"from 5", 5)
    with pytest.raises(accord.Fenced):
        await fenced_write(kv, "report", b"stale", 4)
    assert await fenced_read(kv, "report") == (5, b"from 5")


async def test_the_same_or_a_newer_token_overwrites(kv: KV) -> None:
    first = await fenced_write(kv, "report", b"a", 5)
    again = await fenced_write(kv, "report", b"b", 5)  # a retry of the same holder
    newer = await fenced_write(kv, "report", b"c", 9)
    assert first < again < newer
    assert await fenced_read(kv, "report") == (9, b"c")


async def test_endless_races_give_up_with_contention_not_a_raw_signal(
    engine: MemoryEngine, kv: KV
) -> None:
    await fenced_write(kv, "report", b"a", 1)
    # Every compare-and-set finds that another writer came first.
    engine.fail_next("kv.update", WrongRevision("raced (injected)"), times=50)
    with pytest.raises(Contention) as caught:
        await fenced_write(kv, "report", b"x", 2)
    assert isinstance(caught.value, accord.Fenced)  # what callers caught before it had a name
    assert await fenced_read(kv, "report") == (1, b"a")
    assert await fenced_write(kv, "report", b"x", 2)  # the 51st attempt would have won


async def test_an_unreachable_engine_surfaces_as_not_connected(
    engine: MemoryEngine, kv: KV
) -> None:
    engine.down()
    with pytest.raises(accord.NotConnected):
        await fenced_write(kv, "report", b"x", 1)
    with pytest.raises(accord.NotConnected):
        await fenced_read(kv, "report")
