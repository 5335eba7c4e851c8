"""The in-memory engine's streams: stored messages with expectations, dedup, per-message TTLs (on
the server's clock), work-queue retention, durable consumers with redelivery, and KV buckets built
on streams the way NATS builds them (one subject per key, tombstones, expiry markers).

Every public call goes through the connection's `check`, which is where faults are injected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from .._background import cancel_and_wait
from .._clock import Clock, TimerHandle
from .._errors import NotConnected, StorageFull
from ._api import (
    ConsumerSpec,
    ConsumerState,
    Dispatch,
    Entry,
    PubAck,
    Refused,
    RequestTimeout,
    StoredMessage,
    StreamSpec,
    WrongRevision,
)

T = TypeVar("T")


class Connection(Protocol):
    """What the stores need of the connection a call came through (`memory.MemoryEngine`)."""

    @property
    def is_down(self) -> bool: ...

    def check(self, method: str) -> None:
        """Raise if a call of `method` must fail now (closed, down, or an injected failure)."""

    async def wait(
        self, aw: Coroutine[Any, Any, T] | asyncio.Future[T], timeout: float, exc: type[Exception]
    ) -> T:
        """`aw`'s result, or `exc` once `timeout` passed on the server's clock."""


DEFAULT_DUPLICATE_WINDOW = 120.0  # NATS' default


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def is_tombstone(headers: dict[str, str] | None) -> bool:
    """A delete, a purge or an expiry marker (a key's last message that means "absent")."""
    if not headers:
        return False
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers


class Stream:
    """One stream's messages (seq -> message, in seq order) and consumers."""

    def __init__(self, spec: StreamSpec, clock: Clock, history: int = 0, marker_ttl: int = 0):
        self.spec = spec
        self.clock = clock
        self.history = history  # max messages per subject (KV buckets), 0: no limit
        self.marker_ttl = marker_ttl  # seconds an expiry marker stays, 0: no markers
        self.msgs: dict[int, StoredMessage] = {}
        self.last_seq = 0
        self.bytes = 0  # data + subject of the messages kept (what max_bytes limits)
        self.ids: dict[str, tuple[int, float]] = {}  # msg id -> (seq, stored at)
        self.stored_at: dict[int, float] = {}
        self.timers: dict[int, TimerHandle] = {}
        self.consumers: dict[str, Consumer] = {}
        self.watches: list[MemoryWatch] = []

    def captures(self, subject: str) -> bool:
        return any(matches(p, subject) for p in self.spec.subjects)

    def last_on(self, subject: str) -> StoredMessage | None:
        for seq in reversed(self.msgs):
            if self.msgs[seq].subject == subject:
                return self.msgs[seq]
        return None

    def append(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        msg_id: str | None,
        expect: int | None,
        ttl: int,
    ) -> PubAck:
        now = self.clock.now()
        window = self.spec.duplicate_window or DEFAULT_DUPLICATE_WINDOW
        self.ids = {k: v for k, v in self.ids.items() if now - v[1] < window}
        if msg_id is not None and msg_id in self.ids:
            return PubAck(self.spec.name, self.ids[msg_id][0], duplicate=True)
        if expect is not None:
            last = self.last_on(subject)
            if (last.seq if last else 0) != expect:
                raise WrongRevision(f"{subject}: last sequence is not {expect}")
        if headers and headers.get("Nats-Rollup") == "sub":
            for seq in [s for s, m in self.msgs.items() if m.subject == subject]:
                self.remove(seq)
        size = len(data) + len(subject)
        full = self.spec.max_bytes and self.bytes + size > self.spec.max_bytes
        if full and (self.history or self.spec.discard_new):  # buckets discard new, as on NATS
            raise StorageFull(f"{self.spec.name}: maximum bytes exceeded")
        self.last_seq += 1
        seq = self.last_seq
        self.msgs[seq] = StoredMessage(seq, subject, data, dict(headers) if headers else None)
        self.bytes += size
        self.stored_at[seq] = now
        if msg_id is not None:
            self.ids[msg_id] = (seq, now)
        if ttl > 0:
            self.timers[seq] = self.clock.call_at(now + ttl, lambda: self._expire(seq))
        self._limit(subject)
        self.notify(self.msgs[seq])
        return PubAck(self.spec.name, seq)

    def _limit(self, subject: str) -> None:
        per_subject = self.history or self.spec.max_msgs_per_subject
        if per_subject:
            on_subject = [s for s, m in self.msgs.items() if m.subject == subject]
            for seq in on_subject[:-per_subject]:
                self.remove(seq)
        while self.spec.max_msgs and len(self.msgs) > self.spec.max_msgs:
            self.remove(next(iter(self.msgs)))
        while self.spec.max_bytes and self.bytes > self.spec.max_bytes and self.msgs:
            self.remove(next(iter(self.msgs)))
        if self.spec.max_age:
            cutoff = self.clock.now() - self.spec.max_age
            for seq in [s for s, at in self.stored_at.items() if at < cutoff]:
                self.remove(seq)

    def _expire(self, seq: int) -> None:
        msg = self.msgs.get(seq)
        if msg is None:
            return
        last = self.last_on(msg.subject)
        self.remove(seq)
        if (
            self.marker_ttl
            and last is not None
            and last.seq == seq
            and not is_tombstone(msg.headers)
        ):
            # like nats-server: the key's last value expired, a marker says so (and expires too)
            marker = {"Nats-Marker-Reason": "MaxAge"}
            self.append(msg.subject, b"", marker, None, None, self.marker_ttl)

    def remove(self, seq: int) -> bool:
        self.stored_at.pop(seq, None)
        timer = self.timers.pop(seq, None)
        if timer is not None:
            timer.cancel()
        msg = self.msgs.pop(seq, None)
        if msg is not None:
            self.bytes -= len(msg.data) + len(msg.subject)
        return msg is not None

    def notify(self, msg: StoredMessage) -> None:
        for watch in self.watches:
            watch.offer(msg)
        for consumer in self.consumers.values():
            consumer.wake()


class MemoryKV:
    """`KV` on a stream `KV_<name>` with subjects `$KV.<name>.<key>`, as in NATS."""

    def __init__(self, conn: Connection, name: str, stream: Stream) -> None:
        self._conn = conn
        self.name = name
        self._stream = stream
        self._pre = f"$KV.{name}."

    def _live(self, key: str) -> StoredMessage | None:
        last = self._stream.last_on(self._pre + key)
        return None if last is None or is_tombstone(last.headers) else last

    def _write(
        self, key: str, value: bytes, last: int | None, ttl: int, hdrs: dict[str, str] | None = None
    ) -> int:
        return self._stream.append(self._pre + key, value, hdrs, None, last, ttl).seq

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        self._conn.check("kv.get")
        live = self._live(key)
        return None if live is None else Entry(key, live.data, live.seq)

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._conn.check("kv.put")
        return self._write(key, value, None, ttl)

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._conn.check("kv.create")
        last = self._stream.last_on(self._pre + key)
        if last is not None and not is_tombstone(last.headers):
            raise WrongRevision(f"create {self.name}/{key}: present at revision {last.seq}")
        return self._write(key, value, last.seq if last else 0, ttl)

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        self._conn.check("kv.update")
        return self._write(key, value, last, ttl)

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        self._conn.check("kv.delete")
        self._write(key, b"", last or None, 0, {"KV-Operation": "DEL"})

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        self._conn.check("kv.purge")
        self._write(key, b"", None, 0, {"KV-Operation": "PURGE", "Nats-Rollup": "sub"})

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        self._conn.check("kv.keys")
        subjects = {m.subject for m in self._stream.msgs.values()}
        keys = (s[len(self._pre) :] for s in subjects if s.startswith(self._pre))
        return sorted(k for k in keys if self._live(k) is not None)

    async def watch(self, pattern: str = ">", *, timeout: float = 5.0) -> MemoryWatch:
        self._conn.check("kv.watch")
        watch = MemoryWatch(self._conn, self._stream, self._pre, pattern)
        latest: dict[str, StoredMessage] = {}
        for msg in self._stream.msgs.values():
            if matches(self._pre + pattern, msg.subject):
                latest[msg.subject] = msg
        for msg in sorted(latest.values(), key=lambda m: m.seq):
            watch.offer(msg)
        watch.queue.put_nowait(None)
        self._stream.watches.append(watch)
        return watch


class MemoryWatch:
    def __init__(self, conn: Connection, stream: Stream, pre: str, pattern: str) -> None:
        self._conn = conn
        self._stream = stream
        self._pre = pre
        self._pattern = pre + pattern
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()

    def offer(self, msg: StoredMessage) -> None:
        if matches(self._pattern, msg.subject):
            deleted = is_tombstone(msg.headers)
            key = msg.subject[len(self._pre) :]
            self.queue.put_nowait(Entry(key, b"" if deleted else msg.data, msg.seq, deleted))

    async def next(self, timeout: float) -> Entry | None:
        self._conn.check("watch.next")
        if self not in self._stream.watches:
            raise NotConnected("watch stopped")
        if not self.queue.empty():
            return self.queue.get_nowait()
        return await self._conn.wait(self.queue.get(), timeout, RequestTimeout)

    async def stop(self) -> None:
        if self in self._stream.watches:
            self._stream.watches.remove(self)


class MemoryDelivery:
    __slots__ = ("_consumer", "data", "headers", "num_delivered", "seq", "subject")

    def __init__(self, consumer: Consumer, msg: StoredMessage, num_delivered: int) -> None:
        self._consumer = consumer
        self.data = msg.data
        self.subject = msg.subject
        self.headers = msg.headers
        self.seq = msg.seq
        self.num_delivered = num_delivered

    # like a NATS ack, each is lost when the connection is down (the message comes again)

    async def ack(self) -> None:
        if not self._consumer.cut_off():
            self._consumer.ack(self.seq)

    async def nak(self, delay: float = 0.0) -> None:
        if not self._consumer.cut_off():
            self._consumer.retry(self.seq, delay)

    async def in_progress(self) -> None:
        if not self._consumer.cut_off():
            self._consumer.retry(self.seq, self._consumer.spec.ack_wait)


class Consumer:
    """A durable consumer: the next sequence to hand out, and what is out and unacknowledged
    (redelivered once its ack-wait passes, or its nak delay)."""

    def __init__(self, stream: Stream, spec: ConsumerSpec) -> None:
        self.stream = stream
        self.spec = spec
        self.next_seq = spec.start_seq or 1
        self.pending: dict[int, int] = {}  # seq -> times delivered
        self.due: dict[int, TimerHandle | None] = {}  # seq -> its redelivery timer (None: now)
        self._waiter: asyncio.Future[None] | None = None
        self._conn: Connection | None = None  # of the running loop

    def cut_off(self) -> bool:
        return self._conn is not None and self._conn.is_down

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> MemoryDelivery | None:
        """The next delivery: a redelivery that fell due, else the next new message."""
        msgs = self.stream.msgs
        for seq, timer in list(self.due.items()):
            if timer is None:
                del self.due[seq]
                if seq in msgs and seq in self.pending:
                    return self._hand(msgs[seq])
        if len(self.pending) >= self.spec.max_ack_pending:
            return None
        for seq in range(self.next_seq, self.stream.last_seq + 1):
            msg = msgs.get(seq)
            self.next_seq = seq + 1
            if msg is not None and matches(self.spec.filter_subject, msg.subject):
                return self._hand(msg)
        return None

    def _hand(self, msg: StoredMessage) -> MemoryDelivery:
        n = self.pending.get(msg.seq, 0) + 1
        self.pending[msg.seq] = n
        self._arm(msg.seq, self.spec.ack_wait)
        return MemoryDelivery(self, msg, n)

    def _arm(self, seq: int, delay: float) -> None:
        old = self.due.pop(seq, None)
        if old is not None:
            old.cancel()
        clock = self.stream.clock

        def fall_due() -> None:
            if seq in self.pending:
                self.due[seq] = None
                self.wake()

        self.due[seq] = clock.call_at(clock.now() + delay, fall_due)

    def ack(self, seq: int) -> None:
        if self.pending.pop(seq, None) is None:
            return
        timer = self.due.pop(seq, None)
        if timer is not None:
            timer.cancel()
        if self.stream.spec.work_queue:
            self.stream.remove(seq)

    def state(self) -> ConsumerState:
        floor = (min(self.pending) if self.pending else self.next_seq) - 1
        ahead = sum(
            1
            for seq, msg in self.stream.msgs.items()
            if seq >= self.next_seq and matches(self.spec.filter_subject, msg.subject)
        )
        again = sum(1 for n in self.pending.values() if n > 1)
        return ConsumerState(self.spec.name, floor, ahead, len(self.pending), again)

    def retry(self, seq: int, delay: float) -> None:
        if seq in self.pending:
            self._arm(seq, delay)

    def forget(self) -> None:
        for timer in self.due.values():
            if timer is not None:
                timer.cancel()
        self.pending.clear()
        self.due.clear()
        self.wake()

    async def run(
        self,
        conn: Connection,
        dispatch: Dispatch,
        has_capacity: Callable[[], Awaitable[None]],
        still_going: Callable[[], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._conn = conn
        while still_going() and self.stream.consumers.get(self.spec.name) is self:
            await has_capacity()
            delivery = None if conn.is_down else self.take()
            if delivery is None:
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            if not dispatch(delivery):
                return


class MemoryConsumer:
    """A running `Consumer.run` loop."""

    def __init__(self, task: asyncio.Task[None], consumer: Consumer) -> None:
        self._task = task
        self._consumer = consumer

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


def check_unique(stream: Stream, spec: ConsumerSpec) -> None:
    """A work queue allows one consumer per subject (as NATS: "filtered consumer not unique")."""
    if not stream.spec.work_queue:
        return
    for name, other in stream.consumers.items():
        if name != spec.name and other.spec.filter_subject == spec.filter_subject:
            raise Refused(f"consumer {name} already filters {spec.filter_subject}")
