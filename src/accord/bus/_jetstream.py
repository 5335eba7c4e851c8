"""The bus on JetStream, through the engine seam only: one stream per topic (a subject per
partition), a durable consumer per group, partition and lease epoch, leases and members in KV.

A new lease holder creates its consumer from the previous holder's ack floor and then deletes
the old consumer, so what the old holder left unacknowledged comes first, in stream order.
Topic streams keep every event (limits retention, no limits): nothing is trimmed, so nothing a
group has not acknowledged is ever dropped; `max_age` (opt-in) drops events older than it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

import msgspec

from .._errors import ConfigurationError, NotConnected, StorageFull
from ..engine._api import (
    KV,
    BucketSpec,
    ConsumerSpec,
    Engine,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StreamSpec,
    WrongRevision,
)
from ..engine._api import Consumer as EngineConsumer
from ..engine._api import Delivery as EngineDelivery
from ..engine._nats import NatsTransport
from ..engine._resolve import parse_servers, running_url
from ._api import (
    BusDeadLetter,
    BusUnavailable,
    Event,
    Fetched,
    GroupStats,
    PublishAck,
    PublishUnconfirmed,
)

H_ID, H_KEY, H_TYPE, H_AT = "Accord-Bus-Id", "Accord-Bus-Key", "Accord-Bus-Type", "Accord-Bus-At"
H_ONLY = "Accord-Bus-Only"
H_MSG_ID = "Nats-Msg-Id"  # JetStream's dedup id, which is the event id
DLQ_STREAM = "accord_bus_dlq"
_DLQ_FIELDS = ("topic", "group", "key", "event_id", "type", "attempts", "error", "failed_at")


def stream_of(topic: str) -> str:
    return f"accord_bus_{topic}"


def subject_of(topic: str, partition: int) -> str:
    return f"accord.bus.{topic}.{partition}"


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except (NotConnected, RequestTimeout, NoResponders, Refused, StorageFull) as exc:
        raise BusUnavailable(f"{what}: {exc or type(exc).__name__}") from None


class JetStreamBackend:
    """`Backend` on an `Engine` (the NATS one in practice)."""

    kind = "jetstream"
    lease_granularity = 1.0  # KV TTLs are whole seconds

    def __init__(self, engine: Engine, *, owned: bool = True, max_age: float = 0.0) -> None:
        self.engine = engine
        self._owned = owned
        self._max_age = max_age
        self._replicas = min(3, engine.cluster_size())
        self._kv: dict[str, KV] = {}
        self._streams: set[str] = set()

    @classmethod
    async def connect(cls, url: str | None) -> JetStreamBackend:
        where = url or running_url()
        if not where:
            raise ConfigurationError(
                "no bus given: pass a nats:// or redis:// URL, set ACCORD_NATS, or run `accord up`"
            )
        try:
            engine = await NatsTransport.connect(parse_servers(where), f"bus-{os.getpid()}")
        except NotConnected as exc:
            raise BusUnavailable(str(exc)) from None
        return cls(engine)

    async def _bucket(self, name: str) -> KV:
        kv = self._kv.get(name)
        if kv is None:
            spec = BucketSpec(name=f"accord_bus_{name}", replicas=self._replicas, marker_ttl=1)
            with _mapped(f"open bucket {spec.name}"):
                kv = self._kv[name] = await self.engine.bucket(spec)
        return kv

    async def _stream(self, name: str, subjects: str) -> None:
        if name not in self._streams:
            spec = StreamSpec(name=name, subjects=(subjects,), replicas=self._replicas,
                              max_age=self._max_age)  # fmt: skip
            with _mapped(f"create stream {name}"):
                await self.engine.ensure_stream(spec)
            self._streams.add(name)

    async def partitions(self, topic: str, default: int) -> int:
        meta = await self._bucket("meta")
        with _mapped(f"topic {topic}"):
            try:
                await meta.create(f"topic.{topic}", b"%d" % default)
            except WrongRevision:
                entry = await meta.get(f"topic.{topic}", leader=True)
                if entry is not None:
                    default = int(entry.value)
        await self._stream(stream_of(topic), f"accord.bus.{topic}.*")
        return default

    async def append(self, topic: str, partition: int, event: Event) -> PublishAck:
        # the event id travels as `Nats-Msg-Id` (msg_id below), stored with the event: one
        # header fewer to encode per publish than a header of its own
        headers = {H_KEY: event.key, H_TYPE: event.type, H_AT: f"{event.published_at:.6f}"}
        if event.only:
            headers[H_ONLY] = event.only
        subject = subject_of(topic, partition)
        for attempt in range(3):  # the same msg_id: a retry is stored once
            try:
                ack = await self.engine.append(subject, event.body, headers=headers,
                                               msg_id=event.id, timeout=5.0)  # fmt: skip
            except (RequestTimeout, NotConnected) as exc:
                if attempt == 2:
                    raise PublishUnconfirmed(
                        f"publish of {event.id} to {topic} not confirmed ({exc}): it may or may "
                        "not have been stored", event_id=event.id,
                    ) from None  # fmt: skip
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except NoResponders:
                raise BusUnavailable(f"no JetStream stream stores topic {topic}") from None
            except (Refused, StorageFull) as exc:
                raise PublishUnconfirmed(f"publish to {topic} refused: {exc}",
                                         event_id=event.id) from None  # fmt: skip
            return PublishAck(topic, event.id, partition, durable=True, fsync="replicated",
                              duplicate=ack.duplicate)  # fmt: skip
        raise AssertionError("unreachable")

    async def reader(
        self, topic: str, group: str, partition: int, consumer: str, epoch: int, min_idle: float
    ) -> JetStreamReader:
        stream, prefix = stream_of(topic), f"g-{group}-p{partition}-e"
        attempts = await self._bucket("attempts")
        name = f"{prefix}{epoch}"
        with _mapped(f"open {topic}/{group} partition {partition}"):
            olds = [n for n in await self.engine.consumers(stream) if n.startswith(prefix)]
            olds = [n for n in olds if n != name]
            floors = []
            for old in olds:
                st = await self.engine.consumer_info(stream, old)
                if st is not None:
                    floors.append(st.ack_floor)
            # created before the old ones go: the new consumer starts where the group stands
            start = min(floors) + 1 if floors else 0
            spec = ConsumerSpec(name=name, filter_subject=subject_of(topic, partition),
                                ack_wait=max(30.0, 3 * min_idle), max_ack_pending=4096,
                                inactive_threshold=30 * 86400.0, start_seq=start)  # fmt: skip
            await self.engine.ensure_consumer(stream, spec)
            for old in olds:
                await self.engine.delete_consumer(stream, old)
            r = JetStreamReader(stream, attempts, f"{topic}.{group}.{partition}.")
            if olds:  # a takeover: the attempts the previous holders counted go on
                r.counted = await _counted(attempts, r.prefix)
            r.consumer = await self.engine.consume(
                stream, name, r.dispatch, has_capacity=r.has_capacity, still_going=r.going
            )
        return r

    async def heartbeat(self, topic: str, group: str, consumer: str, ttl: float) -> None:
        kv = await self._bucket("members")
        with _mapped("heartbeat"):
            await kv.put(f"{topic}.{group}.{consumer}", b"", ttl=math.ceil(ttl))

    async def members(self, topic: str, group: str) -> list[str]:
        kv = await self._bucket("members")
        pre = f"{topic}.{group}."
        with _mapped("members"):
            return sorted(k[len(pre) :] for k in await kv.keys() if k.startswith(pre))

    async def acquire(self, lease: str, consumer: str, ttl: float) -> int:
        kv = await self._bucket("leases")
        with _mapped(f"lease {lease}"):
            try:
                return await kv.create(lease, consumer.encode(), ttl=math.ceil(ttl))
            except WrongRevision:
                entry = await kv.get(lease, leader=True)
                if entry is None or entry.value != consumer.encode():
                    return 0
                try:  # still ours (a round that failed meanwhile): take it up again
                    return await kv.update(lease, entry.value, entry.revision, ttl=math.ceil(ttl))
                except WrongRevision:
                    return 0

    async def renew(self, lease: str, consumer: str, epoch: int, ttl: float) -> int:
        kv = await self._bucket("leases")
        with _mapped(f"lease {lease}"):
            try:
                return await kv.update(lease, consumer.encode(), epoch, ttl=math.ceil(ttl))
            except WrongRevision:
                return 0

    async def release(self, lease: str, consumer: str, epoch: int) -> None:
        kv = await self._bucket("leases")
        with _mapped(f"lease {lease}"), contextlib.suppress(WrongRevision):
            await kv.delete(lease, last=epoch)

    async def remove_group(self, topic: str, group: str, partitions: int) -> None:
        stream = stream_of(topic)
        members, leases = await self._bucket("members"), await self._bucket("leases")
        with _mapped(f"remove group {group} of {topic}"):
            for name in await self.engine.consumers(stream):
                if name.startswith(f"g-{group}-p") and name[len(f"g-{group}-p") :][:1].isdigit():
                    await self.engine.delete_consumer(stream, name)
            for kv, pre in ((members, f"{topic}.{group}."), (leases, f"{topic}.{group}.")):
                for key in await kv.keys():
                    if key.startswith(pre):
                        await kv.delete(key)

    async def dead_letter(self, letter: BusDeadLetter) -> None:
        await self._stream(DLQ_STREAM, "accord.bus_dlq.>")
        headers = {f"Accord-Bus-{f}": str(getattr(letter, f))[:1000] for f in _DLQ_FIELDS}
        with _mapped("store a dead letter"):
            subject = f"accord.bus_dlq.{letter.topic}.{letter.group}"
            msg_id = f"bdl:{letter.group}:{letter.event_id}"
            await self.engine.append(subject, letter.body, headers=headers, msg_id=msg_id)

    async def dead_letters(self, limit: int) -> list[BusDeadLetter]:
        out: list[BusDeadLetter] = []
        seq = 0
        with _mapped("read the bus dead letters"):
            while len(out) < limit:
                try:
                    msg = await self.engine.get_message(DLQ_STREAM, seq=seq + 1, after=True)
                except NotFound:
                    break
                if msg is None:
                    break
                h = msg.headers or {}
                fields = {f: h.get(f"Accord-Bus-{f}", "") for f in _DLQ_FIELDS}
                out.append(msgspec.convert({**fields, "id": str(msg.seq), "body": msg.data},
                                           BusDeadLetter, strict=False))  # fmt: skip
                seq = msg.seq
        return out

    async def remove_dead_letter(self, letter_id: str) -> bool:
        with _mapped("remove a bus dead letter"):
            try:
                return await self.engine.delete_message(DLQ_STREAM, int(letter_id))
            except (NotFound, ValueError):
                return False

    async def stats(self) -> list[GroupStats]:
        meta = await self._bucket("meta")
        letters = await self.dead_letters(100_000)
        out: list[GroupStats] = []
        with _mapped("bus stats"):
            topics = [k[6:] for k in await meta.keys() if k.startswith("topic.")]
            for topic in topics:
                out.extend(await self._topic_stats(topic, letters))
        return out

    async def _topic_stats(self, topic: str, letters: list[BusDeadLetter]) -> list[GroupStats]:
        stream = stream_of(topic)
        state = await self.engine.stream_state(stream)
        published = state.messages if state else 0
        groups: dict[str, list[int]] = {}  # group -> [pending, redelivered, oldest seq]
        for name, subject in (await self.engine.consumers(stream)).items():
            if not name.startswith("g-"):
                continue
            group = name[2:].rsplit("-p", 1)[0]
            st = await self.engine.consumer_info(stream, name)
            if st is None:
                continue
            g = groups.setdefault(group, [0, 0, 0])
            g[0] += st.pending + st.ack_pending
            g[1] += st.redelivered
            if st.pending + st.ack_pending:
                first = await self.engine.get_message(stream, seq=st.ack_floor + 1, after=True,
                                                      subject=subject)  # fmt: skip
                at = float((first.headers or {}).get(H_AT, 0) or 0) if first else 0.0
                g[2] = int(min(g[2] or at, at) * 1000) if at else g[2]
        now = time.time()
        rows = [
            GroupStats(topic, group, published, g[0], max(0.0, now - g[2] / 1000) if g[2] else 0.0,
                       g[1], sum(1 for x in letters if x.topic == topic and x.group == group))
            for group, g in sorted(groups.items())
        ]  # fmt: skip
        return rows or [GroupStats(topic, "", published, 0, 0.0, 0, 0)]

    async def close(self) -> None:
        if self._owned:
            await self.engine.close()


ATTEMPT_TTL = 86400  # seconds a retry count is kept for a next holder (a takeover lists them)


async def _counted(kv: KV, prefix: str) -> dict[int, int]:
    """stream sequence -> the attempt a previous holder started last (the retried events)."""
    out: dict[int, int] = {}
    for key in await kv.keys():
        if key.startswith(prefix):
            entry = await kv.get(key)
            if entry is not None:
                out[int(key[len(prefix) :])] = int(entry.value)
    return out


class JetStreamReader:
    """Deliveries of one engine consumer, queued by its pull loop for `fetch`. The store counts
    deliveries per consumer (a new holder's consumer starts at 1), so in-place retries are
    counted in the `attempts` bucket, under `<topic>.<group>.<partition>.<stream seq>`."""

    def __init__(self, stream: str, attempts: KV | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.attempts = attempts
        self.prefix = prefix
        self.counted: dict[int, int] = {}
        self.queue: deque[EngineDelivery] = deque()
        self.consumer: EngineConsumer | None = None
        self._going = True
        self._space = asyncio.Event()
        self._space.set()
        self._ready: asyncio.Future[None] | None = None  # a fetch waiting for deliveries
        self._take: Callable[[list[Fetched]], bool] | None = None  # pushed to the partition
        self._has_room: Callable[[], Awaitable[None]] | None = None

    def push(
        self, take: Callable[[list[Fetched]], bool], has_room: Callable[[], Awaitable[None]]
    ) -> bool:
        self._take, self._has_room = take, has_room
        if self.queue:  # delivered before the partition started
            early = self._go_on_counting([_fetched(self.stream, d) for d in self.queue])
            self.queue.clear()
            self._going = take(early)
        self._space.set()
        return True

    def dispatch(self, d: EngineDelivery) -> bool:
        # called in the connection's read loop
        if self._take is not None:
            got = self._go_on_counting([_fetched(self.stream, d)])
            self._going = self._going and self._take(got)
            return self._going
        # else: wakes a waiting fetch (a future and a timer, not a queue getter under
        # `wait_for`, which costs a task per fetch)
        self.queue.append(d)
        if len(self.queue) >= 256:
            self._space.clear()
        w = self._ready
        if w is not None and not w.done():
            w.set_result(None)
        return self._going

    async def has_capacity(self) -> None:
        if self._has_room is not None:
            await self._has_room()
        else:
            await self._space.wait()

    def going(self) -> bool:
        return self._going

    async def fetch(self, limit: int, block: float) -> list[Fetched]:
        if not self.queue:
            loop = asyncio.get_running_loop()
            w = self._ready = loop.create_future()
            timer = loop.call_later(block, _wake, w)
            try:
                await w
            finally:
                timer.cancel()
                self._ready = None
        q = self.queue
        out = [_fetched(self.stream, q.popleft()) for _ in range(min(limit, len(q)))]
        if len(q) < 128:
            self._space.set()
        return self._go_on_counting(out)

    def _go_on_counting(self, out: list[Fetched]) -> list[Fetched]:
        """Attempts a previous holder recorded go on (see the class docstring)."""
        if self.counted:
            for f in out:
                before = self.counted.pop(f.token.seq, 0)
                f.attempt = max(f.attempt, before + 1) if before else f.attempt
        return out

    async def ack(self, fs: list[Fetched]) -> None:
        for f in fs:  # fire-and-forget publishes, flushed together by the client
            await f.token.ack()

    async def touch(self, fs: list[Fetched]) -> None:
        for f in fs:
            await f.token.in_progress()

    async def retrying(self, f: Fetched, attempt: int) -> None:
        if self.attempts is not None:
            with _mapped("count an attempt"):
                await self.attempts.put(f"{self.prefix}{f.token.seq}", b"%d" % attempt,
                                        ttl=ATTEMPT_TTL)  # fmt: skip

    async def close(self) -> None:
        self._going = False
        if self.consumer is not None:
            await self.consumer.stop()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fetched(stream: str, d: EngineDelivery) -> Fetched:
    h = d.headers or {}
    event = Event(
        id=h.get(H_MSG_ID) or h.get(H_ID) or f"{stream}:{d.seq}",  # H_ID: earlier versions
        key=h.get(H_KEY, ""),
        type=h.get(H_TYPE, ""),
        body=d.data,
        published_at=float(h.get(H_AT, 0) or 0),
        only=h.get(H_ONLY, ""),
    )
    return Fetched(event, d.num_delivered, d)
