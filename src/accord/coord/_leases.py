"""Named leases and leader election with fencing tokens.

A lease is a key in the bucket `accord_<cluster>_locks`, taken with create-if-absent and a
per-message TTL and renewed by compare-and-set (`cluster/_leasekv.py`). Its **fencing token** is
the revision of the taking write: it grows with every new holder, so a side effect made
conditional on the token (`fenced_write`) can never be applied by a deposed holder after its
successor. The holder judges validity on its own monotonic clock from the send time of its last
successful renewal and gives the lease up `margin` before the server can expire it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .._errors import (
    ConfigurationError,
    Contention,
    Fenced,
    LeaseLost,
    LeaseNotAcquired,
    NotConnected,
)
from ..cluster._leasekv import LeaseKV, Taken
from ..engine._nats import translated

log = logging.getLogger("accord.leases")


class LeaseInfo(msgspec.Struct):
    """The stored value of a named lease (also what `accord leases` shows)."""

    name: str
    holder: str
    token: int = 0  # 0 in the taking write: the token is that write's revision
    ttl: int = 0
    renewed_at: float = 0.0  # holder's wall clock, informational only


def validate_name(name: str) -> str:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigurationError(f"lease names are 1-200 of [A-Za-z0-9-_.], got {name!r}")
    return name


class Lease:
    """A held lease. `token` is its fencing token; `lost` is set once it is no longer held."""

    def __init__(self, name: str, token: int, holder: str, ttl: int) -> None:
        self.name = name
        self.token = token
        self.holder = holder
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.valid_until = 0.0

    @property
    def valid(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.valid_until

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is still validly held."""
        if not self.valid:
            raise LeaseLost(f"lease {self.name!r} (token {self.token}) is no longer held")

    async def wait_lost(self) -> None:
        await self.lost.wait()


class LeaseKeeper:
    """Takes, renews and releases named leases of one cluster for one holder."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, holder: str) -> None:
        self._js = js
        self._kv = kv
        self.holder = holder

    async def acquire(self, name: str, ttl: int, timeout: float | None) -> tuple[Lease, Any]:
        validate_name(name)
        if not 1 <= ttl <= 3600:
            raise ConfigurationError(f"lease ttl must be 1..3600 whole seconds, got {ttl}")
        keys = LeaseKV(self._js, self._kv, ttl)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sent = time.monotonic()
            value = msgspec.json.encode(LeaseInfo(name, self.holder, 0, ttl, time.time()))
            try:
                token = await keys.create(name, value)
                break
            except Taken:
                error: BaseException | None = None
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                error = exc  # JetStream busy or electing a leader: keep trying until the deadline
            if deadline is not None and time.monotonic() >= deadline:
                if error is not None:
                    raise NotConnected(f"cannot take lease {name!r}: {error}") from None
                raise LeaseNotAcquired(f"lease {name!r} not acquired within {timeout}s: it is held")
            await asyncio.sleep(min(0.25, ttl / 4) * (0.5 + random.random()))
        lease = Lease(name, token, self.holder, ttl)
        lease.valid_until = sent + ttl - _margin(ttl)
        renewer = asyncio.create_task(self._renew(lease, keys, token), name=f"accord-lease-{name}")
        return lease, renewer

    async def _renew(self, lease: Lease, keys: LeaseKV, revision: int) -> None:
        value = msgspec.json.encode(
            LeaseInfo(lease.name, self.holder, lease.token, lease.ttl, time.time())
        )
        try:
            while time.monotonic() < lease.valid_until:
                await asyncio.sleep(
                    min(lease.ttl / 4, max(0.0, lease.valid_until - time.monotonic()))
                )
                if time.monotonic() >= lease.valid_until:
                    break
                sent = time.monotonic()
                try:
                    # A renewal still unanswered when validity ends cannot save the lease: the
                    # holder must know it lost it then, not when the request gives up.
                    async with asyncio.timeout(max(0.0, lease.valid_until - sent)):
                        revision = await keys.renew(lease.name, value, revision)
                except Taken:
                    break
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                    log.debug("renewal of lease %s failed: %s", lease.name, exc)
                    continue
                lease.valid_until = sent + lease.ttl - _margin(lease.ttl)
        finally:
            lease.lost.set()
            lease.valid_until = 0.0
            if revision:
                with contextlib.suppress(Exception):
                    await keys.release(lease.name, revision)  # let the next holder in now

    async def list(self) -> list[LeaseInfo]:
        try:
            return await self._list()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"cannot list leases: {exc}") from None

    async def _list(self) -> builtins.list[LeaseInfo]:
        out = []
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        for key in keys:
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            try:
                info = msgspec.json.decode(entry.value or b"", type=LeaseInfo)
            except msgspec.DecodeError:
                continue
            info.token = info.token or int(entry.revision or 0)
            out.append(info)
        return out


def _margin(ttl: int) -> float:
    return max(0.25, 0.15 * ttl)


@contextlib.asynccontextmanager
async def hold(
    keeper: LeaseKeeper, name: str, ttl: int, timeout: float | None
) -> AsyncIterator[Lease]:
    lease, renewer = await keeper.acquire(name, ttl, timeout)
    try:
        yield lease
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer


async def elect(keeper: LeaseKeeper, name: str, ttl: int) -> AsyncIterator[Lease]:
    """Terms of leadership: each yielded lease lasts until lost or until the caller moves on."""
    while True:
        async with hold(keeper, name, ttl, None) as lease:
            yield lease


class FencedValue(msgspec.Struct):
    token: int
    data: bytes


@translated
async def fenced_write(kv: KeyValue, key: str, data: bytes, token: int) -> int:
    """Write `data` under `key` unless a holder with a newer token already wrote it.

    Raises `Fenced` if the stored token is greater than `token`. Returns the new revision.
    """
    validate_name(key)
    enc = msgspec.msgpack.encode(FencedValue(token, data))
    for _ in range(50):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        if entry is not None:
            current = msgspec.msgpack.decode(entry.value or b"", type=FencedValue)
            if current.token > token:
                raise Fenced(f"{key!r} was written with token {current.token} > {token}")
        try:
            if entry is None:
                return int(await kv.create(key, enc))
            return int(await kv.update(key, enc, last=entry.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # raced with another writer: read again and re-check the token
    raise Contention(f"{key!r}: too much contention")


@translated
async def fenced_read(kv: KeyValue, key: str) -> tuple[int, bytes] | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    value = msgspec.msgpack.decode(entry.value or b"", type=FencedValue)
    return value.token, value.data
