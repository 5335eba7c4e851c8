"""A tiny in-memory `engine.KV` for unit tests above the seam: revisions, conditional writes, TTLs
on a `VirtualClock` (an expiry leaves a deletion marker, as NATS does) and watches. `fail = True`
makes every call raise `NotConnected`, as an unreachable engine does."""

from __future__ import annotations

import asyncio
from typing import Any

from accord._clock import TimerHandle, VirtualClock
from accord._errors import NotConnected
from accord.engine._api import Entry, PubAck, RequestTimeout, WrongRevision


class FakeWatch:
    def __init__(self, kv: FakeKV, pattern: str) -> None:
        self._kv = kv
        self._prefix = pattern[:-1] if pattern.endswith(">") else None
        self._pattern = pattern
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()

    def matches(self, key: str) -> bool:
        return key.startswith(self._prefix) if self._prefix is not None else key == self._pattern

    async def next(self, timeout: float) -> Entry | None:
        """The next entry; `RequestTimeout` after `timeout` seconds of the KV's virtual clock."""
        getter = asyncio.ensure_future(self.queue.get())
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            getter.cancel()

        clock = self._kv.clock
        timer = clock.call_at(clock.now() + timeout, expire)
        try:
            return await getter
        except asyncio.CancelledError:
            if fired:
                raise RequestTimeout("watch silent") from None
            raise
        finally:
            timer.cancel()
            getter.cancel()

    async def stop(self) -> None:
        if self in self._kv.watches:
            self._kv.watches.remove(self)


class FakeKV:
    def __init__(self, clock: VirtualClock | None = None, name: str = "kv") -> None:
        self.name = name
        self.clock = clock or VirtualClock()
        self.fail = False
        self.entries: dict[str, Entry] = {}  # the latest entry of each key, markers included
        self.watches: list[FakeWatch] = []
        self._rev = 0
        self._expiry: dict[str, TimerHandle] = {}

    def _check(self) -> None:
        if self.fail:
            raise NotConnected("the engine does not answer (test)")

    def _write(self, key: str, value: bytes, *, ttl: int = 0, deleted: bool = False) -> int:
        self._rev += 1
        entry = Entry(key, value, self._rev, deleted)
        self.entries[key] = entry
        old = self._expiry.pop(key, None)
        if old is not None:
            old.cancel()
        if ttl:
            rev = self._rev
            self._expiry[key] = self.clock.call_at(
                self.clock.now() + ttl, lambda: self._expire(key, rev)
            )
        for w in self.watches:
            if w.matches(key):
                w.queue.put_nowait(entry)
        return self._rev

    def _expire(self, key: str, rev: int) -> None:
        current = self.entries.get(key)
        if current is not None and current.revision == rev:
            self._expiry.pop(key, None)
            self._write(key, b"", deleted=True)

    def live(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        return None if entry is None or entry.deleted else entry

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        self._check()
        return self.live(key)

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._check()
        return self._write(key, value, ttl=ttl)

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._check()
        if self.live(key) is not None:
            raise WrongRevision(key)
        return self._write(key, value, ttl=ttl)

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        self._check()
        entry = self.entries.get(key)
        if entry is None or entry.revision != last:
            raise WrongRevision(key)
        return self._write(key, value, ttl=ttl)

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        self._check()
        entry = self.entries.get(key)
        if last and (entry is None or entry.revision != last):
            raise WrongRevision(key)
        self._write(key, b"", deleted=True)

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        self._check()
        self.entries.pop(key, None)

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        self._check()
        return [k for k in self.entries if self.live(k) is not None]

    async def watch(self, pattern: str = ">") -> FakeWatch:
        self._check()
        w = FakeWatch(self, pattern)
        for key in list(self.entries):
            entry = self.live(key)
            if entry is not None and w.matches(key):
                w.queue.put_nowait(entry)
        w.queue.put_nowait(None)
        self.watches.append(w)
        return w


class FakeEvents:
    """The `append` of `engine.JetStream`, recording what was appended (or failing)."""

    def __init__(self) -> None:
        self.fail = False
        self.appended: list[tuple[str, bytes]] = []

    async def append(self, subject: str, data: bytes, **_: Any) -> PubAck:
        if self.fail:
            raise NotConnected("the engine does not answer (test)")
        self.appended.append((subject, data))
        return PubAck("events", len(self.appended))
