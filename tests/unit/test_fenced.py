"""Fenced writes (`coord/_leases.fenced_write`) over an in-memory KV: a write with an older token
than the stored one is refused, an equal or newer one is stored, and a writer that keeps losing
the compare-and-set race gives up with `Contention`."""

from __future__ import annotations

from typing import Any

import pytest

import accord
from accord._errors import Contention
from accord.coord._leases import fenced_read, fenced_write
from accord.engine._api import WrongRevision

from ._fake_kv import FakeKV


async def test_fenced_read_returns_the_token_and_data_last_written() -> None:
    kv = FakeKV()
    assert await fenced_read(kv, "report") is None
    await fenced_write(kv, "report", b"v1", 3)
    assert await fenced_read(kv, "report") == (3, b"v1")


async def test_an_older_token_is_refused_and_leaves_the_newer_write_in_place() -> None:
    kv = FakeKV()
    await fenced_write(kv, "report", b"from 5", 5)
    with pytest.raises(accord.Fenced):
        await fenced_write(kv, "report", b"stale", 4)
    assert await fenced_read(kv, "report") == (5, b"from 5")


async def test_the_same_or_a_newer_token_overwrites() -> None:
    kv = FakeKV()
    first = await fenced_write(kv, "report", b"a", 5)
    again = await fenced_write(kv, "report", b"b", 5)  # a retry of the same holder
    newer = await fenced_write(kv, "report", b"c", 9)
    assert first < again < newer
    assert await fenced_read(kv, "report") == (9, b"c")


class AlwaysRaced(FakeKV):
    """Every conditional write finds that another writer came first."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def create(self, key: str, value: bytes, **_: Any) -> int:
        self.attempts += 1
        raise WrongRevision(key)

    async def update(self, key: str, value: bytes, last: int, **_: Any) -> int:
        self.attempts += 1
        raise WrongRevision(key)


async def test_endless_races_give_up_with_contention_not_a_raw_signal() -> None:
    kv = AlwaysRaced()
    with pytest.raises(Contention) as caught:
        await fenced_write(kv, "report", b"x", 1)
    assert isinstance(caught.value, accord.Fenced)  # what callers caught before it had a name
    assert kv.attempts == 50


async def test_an_unreachable_engine_surfaces_as_not_connected() -> None:
    kv = FakeKV()
    kv.fail = True
    with pytest.raises(accord.NotConnected):
        await fenced_write(kv, "report", b"x", 1)
    with pytest.raises(accord.NotConnected):
        await fenced_read(kv, "report")
