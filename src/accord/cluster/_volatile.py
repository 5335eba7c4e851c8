"""Buckets on memory storage (leases, membership, named leases), re-created when they vanish.

A full data store cannot starve a memory bucket, but a memory bucket of a single server is lost
when that server restarts (the supervised embedded engine restarts it). Lease epochs and named-
lease fencing tokens are the bucket's revisions, already recorded in agent state and fenced
values, so a re-created bucket must hand out revisions above every earlier one: it starts at
`first_seq` = the wall clock in microseconds (see `fresh_first_seq`). `VolatileKV` wraps such a
bucket: when a call fails and the bucket is found missing, it is re-created (at most once a
second) and the caller's retry, which every lease and heartbeat loop does, finds it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from .._errors import AccordError
from ..engine._api import (
    KV,
    BucketSpec,
    Entry,
    JetStream,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    Watch,
)

log = logging.getLogger("accord.cluster")

T = TypeVar("T")

#: What makes `VolatileKV` look whether its bucket still exists (WrongRevision is an answer).
_FAILURES = (AccordError, Refused, NotFound, RequestTimeout, NoResponders)
CHECK_EVERY = 1.0  # seconds between two existence checks of one bucket


def fresh_first_seq() -> int:
    """The first revision of a (re-)created memory bucket: the wall clock in microseconds.

    Above every revision an earlier incarnation handed out as long as that one averaged fewer
    than a million writes a second since it was created (leases and heartbeats write a few per
    second) and the wall clock did not step back by more than the time between the two.
    """
    return time.time_ns() // 1000


class VolatileKV:
    """A `KV` whose bucket is re-created (from `spec`, with a fresh `first_seq`) when found
    missing after a failed call. The call itself still raises: callers retry as they do after
    any engine failure."""

    def __init__(self, js: JetStream, kv: KV, spec: BucketSpec) -> None:
        self._js = js
        self._kv = kv
        self._spec = spec
        self.name = kv.name
        self._checked = -CHECK_EVERY
        self._lock = asyncio.Lock()
        self._healing: asyncio.Task[bool] | None = None
        self.recreated = 0  # how many times this node re-created the bucket

    async def _guard(self, op: Callable[[KV], Awaitable[T]]) -> T:
        try:
            return await op(self._kv)
        except _FAILURES:
            # Checked aside, so that the failure reaches the caller (a lease renewal on a
            # deadline) without waiting for the check.
            idle = self._healing is None or self._healing.done()
            if idle and time.monotonic() - self._checked >= CHECK_EVERY:
                self._healing = asyncio.create_task(self.heal(), name=f"heal-{self.name}")
            raise

    async def heal(self) -> bool:
        """Re-create the bucket if it is missing; True if this call did. Never raises: an
        engine that does not answer is left to the next check."""
        async with self._lock:
            self._checked = time.monotonic()
            try:
                await self._js.bucket(self._spec, create=False, timeout=2.0)
                return False
            except NotFound:
                pass
            except _FAILURES:
                return False
            spec = msgspec.structs.replace(self._spec, first_seq=fresh_first_seq())
            try:
                self._kv = await self._js.bucket(spec, timeout=2.0)
            except _FAILURES as exc:
                log.warning("bucket %s is gone and could not be re-created yet: %s", self.name, exc)
                return False
            self.recreated += 1
            log.warning("bucket %s was gone (memory storage lost with a server restart): "
                        "re-created, revisions from %d", self.name, spec.first_seq)  # fmt: skip
            return True

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        return await self._guard(lambda kv: kv.get(key, timeout=timeout, leader=leader))

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        return await self._guard(lambda kv: kv.put(key, value, timeout=timeout, ttl=ttl))

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        return await self._guard(lambda kv: kv.create(key, value, timeout=timeout, ttl=ttl))

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        return await self._guard(lambda kv: kv.update(key, value, last, timeout=timeout, ttl=ttl))

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        await self._guard(lambda kv: kv.delete(key, last=last, timeout=timeout))

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        await self._guard(lambda kv: kv.purge(key, timeout=timeout))

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        return await self._guard(lambda kv: kv.keys(timeout=timeout))

    async def watch(self, pattern: str = ">", *, timeout: float = 5.0) -> Watch:
        return await self._guard(lambda kv: kv.watch(pattern, timeout=timeout))
