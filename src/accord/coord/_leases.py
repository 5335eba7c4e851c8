"""Named leases and leader election with fencing tokens.

A lease is a key in the bucket `accord_<cluster>_locks`, taken with create-if-absent and a
per-key TTL and renewed by compare-and-set with a fresh TTL (`KV.create`, `KV.update`). Its
**fencing token** is the revision of the taking write: it grows with every new holder, so a side
effect made conditional on the token (`fenced_write`) can never be applied by a deposed holder
after its successor. The holder judges validity on its own monotonic clock from the send time of
its last successful renewal and gives the lease up `margin` before the server can expire it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import msgspec

from .._clock import Clock, LoopClock
from .._errors import (
    ConfigurationError,
    Contention,
    Fenced,
    LeaseLost,
    LeaseNotAcquired,
    NotConnected,
)
from .._retry import Backoff
from ..cluster._config import ENGINE_FAILURES
from ..engine._api import KV, NoResponders, NotFound, Refused, RequestTimeout, WrongRevision

log = logging.getLogger("accord.leases")

P = ParamSpec("P")
R = TypeVar("R")


def engine_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """The engine's signals that are not an answer (`Refused`, `NotFound`: a bucket limit or a
    bucket gone) reach the caller as `NotConnected`, like the engine not answering: never as an
    internal signal."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (Refused, NotFound, RequestTimeout, NoResponders) as exc:
            raise NotConnected(f"{fn.__name__}: {exc}") from None

    return call


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

    def __init__(
        self, name: str, token: int, holder: str, ttl: int, clock: Clock | None = None
    ) -> None:
        self.name = name
        self.token = token
        self.holder = holder
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.valid_until = 0.0  # on `clock` (monotonic)
        self._clock = clock or LoopClock()

    @property
    def valid(self) -> bool:
        return not self.lost.is_set() and self._clock.now() < self.valid_until

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is still validly held."""
        if not self.valid:
            raise LeaseLost(f"lease {self.name!r} (token {self.token}) is no longer held")

    async def wait_lost(self) -> None:
        await self.lost.wait()


class LeaseKeeper:
    """Takes, renews and releases named leases of one cluster (bucket `kv`) for one holder.

    Validity and the renewal pauses run on `clock`.
    """

    def __init__(self, kv: KV, holder: str, clock: Clock | None = None) -> None:
        self._kv = kv
        self.holder = holder
        self._clock = clock or LoopClock()

    async def acquire(self, name: str, ttl: int, timeout: float | None) -> tuple[Lease, Any]:
        """Take lease `name`, waiting while it is held; return it with its renewal task.

        Raises `LeaseNotAcquired` when it was still held at `timeout` (None: wait forever), or
        `NotConnected` when the engine did not answer until then. On cancellation the lease may
        have been taken; nobody renews it, so it expires after `ttl`.
        """
        validate_name(name)
        if not 1 <= ttl <= 3600:
            raise ConfigurationError(f"lease ttl must be 1..3600 whole seconds, got {ttl}")
        clock = self._clock
        deadline = None if timeout is None else clock.now() + timeout
        backoff = Backoff(min(0.05, ttl / 4), min(0.25, ttl / 4))
        while True:
            sent = clock.now()
            value = msgspec.json.encode(LeaseInfo(name, self.holder, 0, ttl, time.time()))
            try:
                token = await self._kv.create(name, value, ttl=ttl, timeout=_io_timeout(ttl))
                break
            except WrongRevision:
                error: Exception | None = None
            except ENGINE_FAILURES as exc:
                error = exc  # JetStream busy or electing a leader: keep trying until the deadline
            if deadline is not None and clock.now() >= deadline:
                if error is not None:
                    raise NotConnected(f"cannot take lease {name!r}: {error}") from None
                raise LeaseNotAcquired(f"lease {name!r} not acquired within {timeout}s: it is held")
            await clock.sleep(backoff.next())
        lease = Lease(name, token, self.holder, ttl, clock)
        lease.valid_until = sent + ttl - _margin(ttl)
        renewer = asyncio.create_task(self._renew(lease, token), name=f"accord-lease-{name}")
        return lease, renewer

    async def _renew(self, lease: Lease, revision: int) -> None:
        clock = self._clock
        value = msgspec.json.encode(
            LeaseInfo(lease.name, self.holder, lease.token, lease.ttl, time.time())
        )
        try:
            while clock.now() < lease.valid_until:
                await clock.sleep(min(lease.ttl / 4, max(0.0, lease.valid_until - clock.now())))
                if clock.now() >= lease.valid_until:
                    break
                sent = clock.now()
                try:
                    # A renewal still unanswered when validity ends cannot save the lease: the
                    # holder must know it lost it then, not when the request gives up.
                    async with asyncio.timeout(max(0.0, lease.valid_until - sent)):
                        revision = await self._kv.update(
                            lease.name,
                            value,
                            revision,
                            ttl=lease.ttl,
                            timeout=_io_timeout(lease.ttl),
                        )
                except WrongRevision:
                    break
                except (*ENGINE_FAILURES, TimeoutError) as exc:
                    log.debug("renewal of lease %s failed: %s", lease.name, exc)
                    continue
                lease.valid_until = sent + lease.ttl - _margin(lease.ttl)
        finally:
            lease.lost.set()
            lease.valid_until = 0.0
            if revision:  # let the next holder in now, not after the TTL
                with contextlib.suppress(WrongRevision, *ENGINE_FAILURES):
                    await self._kv.delete(lease.name, last=revision)

    @engine_errors
    async def list(self) -> list[LeaseInfo]:
        """Every lease now held (`NotConnected` if the engine does not answer)."""
        out = []
        for key in await self._kv.keys():
            entry = await self._kv.get(key)
            if entry is None:  # released or expired since the listing
                continue
            try:
                info = msgspec.json.decode(entry.value, type=LeaseInfo)
            except msgspec.DecodeError:
                continue
            info.token = info.token or entry.revision
            out.append(info)
        return out


def _io_timeout(ttl: int) -> float:
    # A lease write unanswered for half a TTL cannot help any more (validity runs out).
    return max(0.5, ttl / 2)


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


@engine_errors
async def fenced_write(kv: KV, key: str, data: bytes, token: int) -> int:
    """Write `data` under `key` unless a holder with a newer token already wrote it.

    Returns the new revision once the write is stored. Raises `Fenced` if the stored token is
    greater than `token` (nothing written); `Contention` (a `Fenced`) when 50 compare-and-set
    rounds in a row lost a race with other writers (nothing written by this call; retry later);
    `NotConnected` when the engine did not answer (the write may or may not have been applied: a
    retry with the same token is safe, since an equal token is accepted). On cancellation the
    write may or may not have been applied.
    """
    validate_name(key)
    enc = msgspec.msgpack.encode(FencedValue(token, data))
    for _ in range(50):
        entry = await kv.get(key)
        if entry is not None:
            current = msgspec.msgpack.decode(entry.value, type=FencedValue)
            if current.token > token:
                raise Fenced(f"{key!r} was written with token {current.token} > {token}")
        try:
            if entry is None:
                return await kv.create(key, enc)
            return await kv.update(key, enc, entry.revision)
        except WrongRevision:
            continue  # raced with another writer: read again and re-check the token
    raise Contention(f"{key!r}: too much contention")


@engine_errors
async def fenced_read(kv: KV, key: str) -> tuple[int, bytes] | None:
    """The (token, data) last stored by `fenced_write` under `key`, or None."""
    entry = await kv.get(key)
    if entry is None:
        return None
    value = msgspec.msgpack.decode(entry.value, type=FencedValue)
    return value.token, value.data
