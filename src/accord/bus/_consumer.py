"""One consumer of a group, the same on every backend: partition leases, per-key order, retries.

A topic's events are spread over partitions by key. Within a group each partition is read by
the holder of its lease only (rendezvous placement over the group's live members, bounded load),
so a key's events are first handled in publish order even across crashes: a new holder reads
what the previous one left unacknowledged before anything new. Within a partition, events of
one key run one at a time, different keys concurrently (bounded by `max_concurrency`); a failed
handling is retried in place with backoff, and after `max_deliver` attempts dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec

from .._background import cancel_and_wait
from .._retry import Backoff
from ._api import AccordError, Backend, BusDeadLetter, Delivery, Event, Fetched, PartitionReader

log = logging.getLogger("accord.bus")

Handle = Callable[[Event, Delivery], Awaitable[None]]
_READ_BLOCK = 0.5  # seconds a fetch waits for events


class Poison(Exception):
    """Raised by a handle for an event no attempt can handle (its body does not decode): it goes
    to the dead letters at once."""


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_deliver: int = 5
    """Handlings of one event before it goes to the dead letters."""
    max_concurrency: int = 64
    """Handlers running at once in this consumer (different keys)."""
    min_idle: float = 5.0
    """Seconds after which a silent consumer's partitions (and pending events) are taken over."""
    window: int = 512
    """Events fetched and not yet acknowledged, per partition (memory bound)."""
    retry_start: float = 0.1
    retry_cap: float = 5.0
    """Backoff between attempts: start, doubling, capped."""


def assign(partitions: int, members: list[str]) -> dict[int, str]:
    """Rendezvous placement with bounded load (at most ceil(partitions / members) each): every
    consumer computes the same answer from the same member list."""
    if not members:
        return {}
    cap = math.ceil(partitions / len(members))
    load = dict.fromkeys(members, 0)
    out: dict[int, str] = {}
    for p in range(partitions):
        ranked = sorted(members, key=lambda m: hashlib.blake2b(f"{p}:{m}".encode()).digest())
        owner = next(m for m in ranked if load[m] < cap)
        load[owner] += 1
        out[p] = owner
    return out


class GroupConsumer:
    """Consumes `topic` as one member of `group` until `stop`."""

    def __init__(
        self,
        backend: Backend,
        topic: str,
        group: str,
        partitions: int,
        handle: Handle,
        settings: ConsumerSettings,
    ) -> None:
        self.backend = backend
        self.topic = topic
        self.group = group
        self.partitions = partitions
        self.handle = handle
        self.settings = settings
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        gran = backend.lease_granularity
        self.ttl = max(gran, math.ceil(settings.min_idle / gran) * gran)
        self.margin = max(0.25, 0.15 * self.ttl)
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.held: dict[int, _Partition] = {}
        self.handled = 0
        self.dead_lettered = 0
        self._task: asyncio.Task[None] | None = None
        self._listed: tuple[float, list[str]] | None = None  # (when, members)
        self._stopping = False
        self.stopped = False

    def lease_name(self, p: int) -> str:
        return f"{self.topic}.{self.group}.{p}"

    async def start(self) -> None:
        await self._round()  # the first assignment before returning: consumption has begun
        self._task = asyncio.create_task(self._loop(), name=f"accord-bus-{self.topic}-{self.group}")

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.ttl / 4)
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except AccordError as exc:
                log.warning("bus %s/%s: %s", self.topic, self.group, exc)
                await self._expire_lapsed()
            except Exception:
                log.exception("bus %s/%s: assignment round failed", self.topic, self.group)

    async def _expire_lapsed(self) -> None:
        now = asyncio.get_running_loop().time()
        for p, part in list(self.held.items()):
            if part.valid_until <= now:
                del self.held[p]
                await part.abort()

    async def _round(self) -> None:
        """Heartbeat, renew what we hold, then take and hand off partitions as placement says."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        held = list(self.held.items())
        # all at once: one slow reply must not hold up the other renewals until they lapse
        results = await asyncio.gather(
            self.backend.heartbeat(self.topic, self.group, self.name, self.ttl),
            *(self.backend.renew(self.lease_name(p), self.name, part.token, self.ttl)
              for p, part in held),
            return_exceptions=True,
        )  # fmt: skip
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, AccordError):
                raise r
        if isinstance(results[0], AccordError):
            raise results[0]
        for (p, part), renewed in zip(held, results[1:], strict=True):
            if isinstance(renewed, BaseException):
                continue  # unknown: keep serving while the validity lasts
            if renewed:
                part.token = renewed
                part.valid_until = sent + self.ttl - self.margin
            else:
                log.info("bus %s/%s: lost partition %d", self.topic, self.group, p)
                del self.held[p]
                await part.abort()
        await self._expire_lapsed()
        members = await self._members(loop.time())
        if self.name not in members:
            members = sorted([*members, self.name])
        desired = assign(self.partitions, members)
        for p, owner in desired.items():
            if owner == self.name and p not in self.held and not self._stopping:
                sent = loop.time()
                token = await self.backend.acquire(self.lease_name(p), self.name, self.ttl)
                if token:
                    reader = await self.backend.reader(
                        self.topic, self.group, p, self.name, token, self.ttl
                    )
                    part = _Partition(self, p, token, sent + self.ttl - self.margin, reader)
                    self.held[p] = part
                    part.start()
        leaving = [(p, part) for p, part in self.held.items() if desired.get(p) != self.name]
        for p, _part in leaving:  # its desired owner is alive: hand it over
            del self.held[p]
        # all at once: one after the other, the hand-overs (each waits for its handlings and its
        # read) would delay this round's end, and so the next renewal of the partitions we keep
        # until their reads pause for the lease margin
        results = await asyncio.gather(*(self._hand_over(p, part) for p, part in leaving),
                                       return_exceptions=True)  # fmt: skip
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _members(self, now: float) -> list[str]:
        """The group's live members, listed at most every ttl/2 (every other round: listing is
        the round's dearest call, a bucket scan on JetStream). A member joining or dying is
        seen up to ttl/4 later than by listing every round; leases are renewed every round."""
        if self._listed is None or now - self._listed[0] >= self.ttl / 2 - 0.01:
            self._listed = (now, await self.backend.members(self.topic, self.group))
        return self._listed[1]

    async def _hand_over(self, p: int, part: _Partition) -> None:
        await part.finish()
        await self.backend.release(self.lease_name(p), self.name, part.token)

    async def stop(self) -> None:
        """Finish the handlings under way (acknowledged), give the partitions back; events
        fetched but not started stay pending and go to the next holder."""
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait([self._task])
        for p, part in list(self.held.items()):
            del self.held[p]
            await part.finish()
            with contextlib.suppress(AccordError):
                await self.backend.release(self.lease_name(p), self.name, part.token)
        self.stopped = True


class _Partition:
    """One held partition: a fetch loop feeding per-key queues, each drained by its own task."""

    def __init__(
        self, owner: GroupConsumer, p: int, token: int, valid_until: float, reader: PartitionReader
    ) -> None:
        self.owner = owner
        self.p = p
        self.token = token
        self.valid_until = valid_until
        self.reader = reader
        self.queues: dict[str, deque[Fetched]] = {}
        self.inflight: dict[int, Fetched] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.room = asyncio.Event()
        # handled, to acknowledge: one ack loop sends them in batches, so a key's next event
        # does not wait for the store to confirm (fsync) the previous one's ack
        self.acks: list[Fetched] = []
        self.acks_wake = asyncio.Event()
        self.acks_idle = asyncio.Event()
        self.acks_idle.set()
        self.stopping = False
        self.fetching = True
        self._loops: list[asyncio.Task[None]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    def valid(self) -> bool:
        return not self.stopping and self._loop.time() < self.valid_until

    async def wait_valid(self) -> bool:
        """True once the lease is valid; False when the partition stops. A late renewal makes
        a lapsed lease valid again (it was still ours); a failed one aborts the partition."""
        while not self.valid():
            if self.stopping:
                return False
            await asyncio.sleep(0.05)
        return True

    def start(self) -> None:
        # A store that delivers by itself (JetStream: the engine's pull loop) hands events
        # straight to the key queues, in its read loop: no fetch loop to wake per event.
        pushed = self.reader.push(self._take, self._has_room)
        fetcher = [] if pushed else [asyncio.create_task(self._fetch())]
        self._loops = [*fetcher, asyncio.create_task(self._touch()),
                       asyncio.create_task(self._acker())]  # fmt: skip
        self._fetcher = fetcher[0] if fetcher else None

    def _take(self, got: list[Fetched]) -> bool:
        """Queue events the store pushed; False once this partition takes no more (what it
        refused stays unacknowledged: the next holder gets it)."""
        if self.stopping or not self.fetching:
            return False
        self._enqueue(got)
        return True

    async def _has_room(self) -> None:
        while len(self.inflight) >= self.owner.settings.window and not self.stopping:
            self.room.clear()
            await self.room.wait()

    async def _fetch(self) -> None:
        backoff = Backoff(0.1, 2.0)
        window = self.owner.settings.window
        while not self.stopping and self.fetching:
            if self._loop.time() + _READ_BLOCK + 0.1 >= self.valid_until:
                # a read must end before the lease can lapse: one that delivered after a new
                # holder took over would leave events pending with us, behind newer ones
                await asyncio.sleep(0.05)
                continue
            room = window - len(self.inflight)
            if room <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            try:
                got = await self.reader.fetch(min(room, 256), block=_READ_BLOCK)
            except AccordError as exc:
                log.debug("bus partition %d: fetch failed: %s", self.p, exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if self.stopping or not self.fetching:
                return  # what was read stays pending: the next holder reads it first
            self._enqueue(got)

    def _enqueue(self, got: list[Fetched]) -> None:
        for f in got:
            self.inflight[id(f)] = f
            q = self.queues.get(f.event.key)
            if q is not None:
                q.append(f)  # its key's task is running: it takes it in turn
                continue
            self.queues[f.event.key] = deque([f])
            task = asyncio.create_task(self._drain(f.event.key))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _touch(self) -> None:
        while True:
            await asyncio.sleep(self.owner.ttl / 3)
            pending = [*self.inflight.values(), *self.acks]
            if pending:
                with contextlib.suppress(AccordError):
                    await self.reader.touch(pending)

    async def _acker(self) -> None:
        """Acknowledge handled events in batches while the lease is valid (retried with
        backoff); what is not acknowledged when the partition stops stays pending (the next
        holder handles it again: a duplicate, never a loss)."""
        backoff = Backoff(0.05, 1.0)
        while True:
            if not self.acks:
                self.acks_idle.set()
                self.acks_wake.clear()
                await self.acks_wake.wait()
                continue
            if not await self.wait_valid():
                return
            batch = self.acks[:1024]
            try:
                await self.reader.ack(batch)
            except AccordError as exc:
                log.debug("bus partition %d: ack failed: %s", self.p, exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            del self.acks[: len(batch)]
            self.owner.handled += len(batch)

    async def _drain(self, key: str) -> None:
        q = self.queues[key]
        try:
            while q and not self.stopping:
                f = q[0]
                if not await self._run(f):
                    return  # the lease lapsed: the next holder gets the rest
                q.popleft()
                self.inflight.pop(id(f), None)
                self.room.set()
        finally:
            if self.queues.get(key) is q:
                del self.queues[key]
                for f in q:  # not handled: stays pending in the store for the next holder
                    self.inflight.pop(id(f), None)

    async def _run(self, f: Fetched) -> bool:
        """Handle one event until it succeeds or is dead-lettered, then acknowledge it."""
        owner, ev = self.owner, f.event
        s = owner.settings
        if ev.only and ev.only != owner.group:  # a replay for another group
            self._ack(f)
            return True
        attempt = max(1, f.attempt)
        backoff: Backoff | None = None  # made on the first failure (it seeds an rng)
        while True:
            if not await self.wait_valid():
                return False
            d = Delivery(owner.topic, owner.group, ev.key, ev.id, attempt, ev.published_at)
            try:
                async with owner.slots:
                    await owner.handle(ev, d)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, Poison) or attempt >= s.max_deliver:
                    if not await self._dead_letter(f, attempt, error):
                        return False
                    break
                log.debug("bus %s: %s attempt %d failed: %s", owner.topic, ev.id, attempt, error)
                backoff = backoff or Backoff(s.retry_start, s.retry_cap)
                await asyncio.sleep(backoff.delay_for(attempt))
                attempt += 1
                try:  # before the attempt: a crash during it counts too
                    await self.reader.retrying(f, attempt)
                except AccordError as exc:
                    log.debug("bus %s: cannot record attempt %d: %s", owner.topic, attempt, exc)
        if not await self.wait_valid():
            return False
        self._ack(f)
        return True

    async def _dead_letter(self, f: Fetched, attempts: int, error: str) -> bool:
        owner, ev = self.owner, f.event
        letter = BusDeadLetter(
            id="", topic=owner.topic, group=owner.group, key=ev.key, event_id=ev.id,
            type=ev.type, attempts=attempts, error=error[:1000], failed_at=time.time(),
            body=ev.body,
        )  # fmt: skip
        backoff = Backoff(0.1, 2.0)
        while await self.wait_valid():
            try:
                await owner.backend.dead_letter(letter)
                owner.dead_lettered += 1
                return True
            except AccordError as exc:
                log.warning("bus %s: cannot store dead letter %s: %s", owner.topic, ev.id, exc)
                await asyncio.sleep(backoff.next())
        return False

    def _ack(self, f: Fetched) -> None:
        self.acks.append(f)
        self.acks_idle.clear()
        self.acks_wake.set()

    async def finish(self) -> None:
        """Graceful handoff: no new fetches, handlings under way complete and are acknowledged."""
        self.stopping_fetch()
        deadline = self._loop.time() + self.owner.ttl
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.owner.ttl)
        with contextlib.suppress(TimeoutError):  # their acks, before the lease is given back
            await asyncio.wait_for(self.acks_idle.wait(), max(0.1, deadline - self._loop.time()))
        await self.abort()

    def stopping_fetch(self) -> None:
        for q in self.queues.values():
            while len(q) > 1:  # only the event in hand is finished
                f = q.pop()
                self.inflight.pop(id(f), None)
        self.fetching = False

    async def abort(self) -> None:
        self.stopping = True
        self.room.set()
        await cancel_and_wait([t for t in self._loops if t is not self._fetcher] + [*self.tasks])
        if self._fetcher is not None:
            # a read under way is let finish (within its block time): cancelled, its events
            # would be delivered to nobody and, on Redis, come again only after 2·min_idle
            await asyncio.wait([self._fetcher], timeout=2.0)
            await cancel_and_wait([self._fetcher])
        with contextlib.suppress(AccordError):
            await self.reader.close()
