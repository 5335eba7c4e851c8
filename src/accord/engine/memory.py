"""An in-memory `Engine` for unit tests above the seam (dramatiq's `StubBroker` idea): subjects with
`*`/`>` wildcards, queue groups, request/reply with no-responders, and the streams and buckets of
`_memory_store.py`. All its time — TTLs, ack-waits, timeouts — is the injected clock's.

Several connections (`engine.connect(name)`) share one `MemoryServer`. Faults are injected per
connection: `down()` makes every call raise `NotConnected` until `up()`, and
`fail_next(method, exc)` makes the next call of one method raise `exc`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec

from .._background import cancel_and_wait
from .._clock import Clock, LoopClock
from .._errors import NotConnected
from ._api import (
    KV,
    BucketSpec,
    ConsumerSpec,
    ConsumerState,
    DirectHandler,
    Dispatch,
    Handler,
    Message,
    NoResponders,
    NotFound,
    PubAck,
    Refused,
    RequestTimeout,
    StoredMessage,
    StreamSpec,
    StreamState,
    WrongRevision,
)
from ._memory_store import Consumer, MemoryConsumer, MemoryKV, Stream, check_unique, matches

log = logging.getLogger("accord.engine.memory")

T = TypeVar("T")


class MemoryMessage:
    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(
        self, subject: str, data: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers


class _Sub:
    """One subscription: a handler task fed by a queue, or a direct function."""

    def __init__(
        self, conn: MemoryEngine, subject: str, queue: str, cb: Handler | None, fn: Any
    ) -> None:
        self.conn = conn
        self.subject = subject
        self.queue = queue
        self.fn: DirectHandler | None = fn
        self.pending: asyncio.Queue[MemoryMessage] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(cb)) if cb is not None else None

    async def _run(self, cb: Handler) -> None:
        while True:
            msg = await self.pending.get()
            try:
                await cb(msg)
            except Exception:
                log.exception("handler failed on %s", msg.subject)
            finally:
                self.pending.task_done()

    def deliver(self, msg: MemoryMessage) -> None:
        if self.fn is not None:
            asyncio.get_running_loop().call_soon(self._direct, msg)
        else:
            self.pending.put_nowait(msg)

    def _direct(self, msg: MemoryMessage) -> None:
        if self.fn is None or self not in self.conn.server.subs:
            return  # unsubscribed meanwhile
        try:
            self.fn(msg)
        except Exception:
            log.exception("message handler failed on %s", msg.subject)

    async def unsubscribe(self) -> None:
        self.conn.server.remove(self)
        await self._stop()

    async def drain(self) -> None:
        self.conn.server.remove(self)
        if self.task is not None and self.task is not asyncio.current_task():
            await self.pending.join()
        await self._stop()

    async def _stop(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        own = task is asyncio.current_task()
        if own:  # a handler ending its own subscription
            task.cancel()  # ends at its next await, like nats-py's
            return
        await cancel_and_wait([task])


class MemoryServer:
    """What the connections share: subscriptions, streams (buckets are streams) and the clock."""

    def __init__(self, clock: Clock | None = None, cluster_size: int = 1) -> None:
        self.clock: Clock = clock or LoopClock()
        self.cluster_size = cluster_size  # what `cluster_size()` reports (no servers to count)
        self.subs: list[_Sub] = []
        self.streams: dict[str, Stream] = {}
        self._turns = itertools.count()  # round-robin over queue-group members

    def remove(self, sub: _Sub) -> None:
        if sub in self.subs:
            self.subs.remove(sub)

    def route(self, msg: MemoryMessage) -> int:
        """Hand `msg` to every matching plain subscriber and one member per queue group, on
        connections that are up; return how many got it."""
        groups: dict[str, list[_Sub]] = {}
        n = 0
        for sub in self.subs:
            if sub.conn.is_down or not matches(sub.subject, msg.subject):
                continue
            if sub.queue:
                groups.setdefault(sub.queue, []).append(sub)
            else:
                sub.deliver(msg)
                n += 1
        for members in groups.values():
            members[next(self._turns) % len(members)].deliver(msg)
            n += 1
        return n

    def store_core(self, subject: str, data: bytes, headers: dict[str, str] | None) -> bytes | None:
        """Store a core publish in the stream that captures `subject`, as NATS does (reading the
        `Nats-Msg-Id`, expected-sequence and TTL headers); the PubAck JSON, None if no stream."""
        for stream in self.streams.values():
            if stream.captures(subject):
                break
        else:
            return None
        h = headers or {}
        expect = h.get("Nats-Expected-Last-Subject-Sequence")
        ttl = h.get("Nats-TTL", "0s").rstrip("s") or "0"
        try:
            ack = stream.append(
                subject, data, headers, h.get("Nats-Msg-Id"),
                int(expect) if expect is not None else None, int(float(ttl)),
            )  # fmt: skip
        except WrongRevision as exc:
            error = {"code": 400, "err_code": 10071, "description": str(exc)}
            return msgspec.json.encode({"error": error})
        return msgspec.json.encode(ack)

    def stream(self, name: str) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            raise NotFound(f"stream {name} not found")
        return stream


class MemoryEngine:
    """One connection to a `MemoryServer` (a new one unless given), implementing `Engine`."""

    max_payload = 1024 * 1024

    def __init__(
        self,
        server: MemoryServer | None = None,
        name: str = "memory",
        *,
        clock: Clock | None = None,
    ) -> None:
        self.server = server or MemoryServer(clock)
        self.name = name
        self._closed = False
        self._down = False
        self._faults: dict[str, list[BaseException]] = {}
        self._inboxes = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- faults ---------------------------------------------------------------------------

    def connect(self, name: str) -> MemoryEngine:
        """Another connection to the same server (another node)."""
        return MemoryEngine(self.server, name)

    def down(self) -> None:
        """Cut this connection off: every call raises `NotConnected`, nothing is delivered to
        its subscriptions or consumers, until `up()`."""
        self._down = True

    def up(self) -> None:
        self._down = False
        for stream in self.server.streams.values():
            for consumer in stream.consumers.values():
                consumer.wake()

    def fail_next(self, method: str, exc: BaseException | None = None, times: int = 1) -> None:
        """Make the next `times` calls of `method` raise `exc` (default `NotConnected`). Names
        are the methods' own (`request`, `append`, ...), `kv.<name>` for a bucket's and
        `watch.next` for a watch's."""
        error = exc if exc is not None else NotConnected(f"injected failure of {method}")
        self._faults.setdefault(method, []).extend([error] * times)

    @property
    def is_down(self) -> bool:
        return self._down or self._closed

    def check(self, method: str) -> None:
        """Raise what a call of `method` must raise now: a closed or down connection, or an
        injected failure."""
        if self._closed:
            raise NotConnected(f"{method}: connection {self.name} is closed")
        if self._down:
            raise NotConnected(f"{method}: engine unreachable (injected)")
        queued = self._faults.get(method)
        if queued:
            raise queued.pop(0)

    async def wait(
        self, aw: Coroutine[Any, Any, T] | asyncio.Future[T], timeout: float, exc: type[Exception]
    ) -> T:
        """Await `aw` for up to `timeout` seconds of the server's clock, else raise `exc`."""
        fut = asyncio.ensure_future(aw)
        clock = self.server.clock

        def expire() -> None:
            fut.cancel()

        timer = clock.call_at(clock.now() + timeout, expire)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled() and not _current_cancelling():
                raise exc(f"no answer within {timeout:g}s") from None
            raise
        finally:
            timer.cancel()
            fut.cancel()

    # -- Transport ------------------------------------------------------------------------

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        msg = await self.request_msg(subject, data, timeout)
        return msg.data

    async def request_msg(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> MemoryMessage:
        self.check("request")
        reply: asyncio.Future[MemoryMessage] = asyncio.get_running_loop().create_future()

        def answer(msg: Any) -> None:
            if not reply.done():
                reply.set_result(msg)

        inbox = self.new_inbox()
        sub = _Sub(self, inbox, "", None, answer)
        self.server.subs.append(sub)
        try:
            routed = self.server.route(MemoryMessage(subject, data, inbox, headers))
            ack = self.server.store_core(subject, data, headers)
            if ack is not None:  # a stream captured it: its PubAck is the reply, as on NATS
                return MemoryMessage(inbox, ack)
            if not routed:
                raise NoResponders(subject)
            answer_msg: MemoryMessage = await self.wait(reply, timeout, RequestTimeout)
            if not answer_msg.data and (answer_msg.headers or {}).get("Status") == "503":
                raise NoResponders(subject)  # bounced (`bounce`), as on NATS
            return answer_msg
        finally:
            self.server.remove(sub)

    async def bounce(self, reply: str) -> None:
        await self.publish(reply, b"", headers={"Status": "503"})

    async def publish(
        self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        self.check("publish")
        self.server.route(MemoryMessage(subject, data, reply, headers))
        ack = self.server.store_core(subject, data, headers)
        if ack is not None and reply:
            self.server.route(MemoryMessage(reply, ack))

    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> _Sub:
        self.check("subscribe")
        sub = _Sub(self, subject, queue, cb, None)
        self.server.subs.append(sub)
        return sub

    async def subscribe_direct(self, subject: str, fn: DirectHandler) -> _Sub:
        self.check("subscribe_direct")
        sub = _Sub(self, subject, "", None, fn)
        self.server.subs.append(sub)
        return sub

    def new_inbox(self) -> str:
        return f"_INBOX.{self.name}.{next(self._inboxes)}"

    async def flush(self, timeout: float) -> None:
        self.check("flush")

    def cluster_size(self) -> int:
        return self.server.cluster_size

    async def reply_inbox(self) -> tuple[str, asyncio.Future[Message]]:
        self.check("reply_inbox")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def answer(msg: Any) -> None:
            if not fut.done():
                fut.set_result(msg)

        sub = _Sub(self, self.new_inbox(), "", None, answer)
        self.server.subs.append(sub)
        fut.add_done_callback(lambda _: self.server.remove(sub))
        return sub.subject, fut

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in [s for s in self.server.subs if s.conn is self]:
            await sub.unsubscribe()
        await cancel_and_wait(list(self._tasks))

    # -- JetStream ------------------------------------------------------------------------

    async def bucket(self, spec: BucketSpec, *, create: bool = True, timeout: float = 5.0) -> KV:
        self.check("bucket")
        name = f"KV_{spec.name}"
        stream = self.server.streams.get(name)
        if stream is None:
            if not create:
                raise NotFound(f"bucket {spec.name} not found")
            s = StreamSpec(name=name, subjects=(f"$KV.{spec.name}.>",), replicas=spec.replicas,
                           storage=spec.storage, max_bytes=spec.max_bytes)  # fmt: skip
            stream = Stream(s, self.server.clock, spec.history, spec.marker_ttl)
            stream.last_seq = max(0, spec.first_seq - 1)
            self.server.streams[name] = stream
        return MemoryKV(self, spec.name, stream)

    async def ensure_stream(self, spec: StreamSpec, *, timeout: float = 5.0) -> None:
        self.check("ensure_stream")
        if spec.name in self.server.streams:
            return
        for other in self.server.streams.values():
            for a in spec.subjects:
                if any(a == b or matches(a, b) or matches(b, a) for b in other.spec.subjects):
                    raise Refused(f"subjects of {spec.name} overlap those of {other.spec.name}")
        self.server.streams[spec.name] = Stream(spec, self.server.clock)

    async def stream_state(self, name: str, *, timeout: float = 5.0) -> StreamState | None:
        self.check("stream_state")
        s = self.server.streams.get(name)
        if s is None:
            return None
        size = sum(len(m.data) for m in s.msgs.values())
        return StreamState(name, s.spec.replicas, len(s.msgs), size, leader="memory")

    async def set_replicas(self, name: str, replicas: int, *, timeout: float = 5.0) -> None:
        self.check("set_replicas")
        s = self.server.stream(name)
        s.spec = msgspec.structs.replace(s.spec, replicas=replicas)

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        expect_last_subject_seq: int | None = None,
        ttl: int = 0,
        timeout: float = 5.0,
    ) -> PubAck:
        self.check("append")
        for stream in self.server.streams.values():
            if stream.captures(subject):
                return stream.append(subject, data, headers, msg_id, expect_last_subject_seq, ttl)
        raise NoResponders(subject)

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        after: bool = False,
        timeout: float = 5.0,
    ) -> StoredMessage | None:
        self.check("get_message")
        s = self.server.stream(stream)
        if after:
            for msg in s.msgs.values():
                if msg.seq >= seq and (subject is None or matches(subject, msg.subject)):
                    return msg
            return None
        if subject is not None:
            return s.last_on(subject)
        return s.msgs.get(seq)

    async def delete_message(self, stream: str, seq: int, *, timeout: float = 5.0) -> bool:
        self.check("delete_message")
        return self.server.stream(stream).remove(seq)

    async def purge(self, stream: str, *, subject: str | None = None, timeout: float = 5.0) -> int:
        self.check("purge")
        s = self.server.stream(stream)
        seqs = [q for q, m in s.msgs.items() if subject is None or matches(subject, m.subject)]
        for seq in seqs:
            s.remove(seq)
        return len(seqs)

    async def ensure_consumer(
        self, stream: str, spec: ConsumerSpec, *, timeout: float = 5.0
    ) -> None:
        self.check("ensure_consumer")
        s = self.server.stream(stream)
        if spec.name not in s.consumers:
            check_unique(s, spec)
            s.consumers[spec.name] = Consumer(s, spec)

    async def delete_consumer(self, stream: str, name: str, *, timeout: float = 5.0) -> bool:
        self.check("delete_consumer")
        consumer = self.server.stream(stream).consumers.pop(name, None)
        if consumer is None:
            return False
        consumer.forget()
        return True

    async def consumers(self, stream: str, *, timeout: float = 5.0) -> dict[str, str]:
        self.check("consumers")
        s = self.server.stream(stream)
        return {name: c.spec.filter_subject for name, c in s.consumers.items()}

    async def consume(
        self,
        stream: str,
        consumer: str,
        dispatch: Dispatch,
        *,
        has_capacity: Callable[[], Awaitable[None]],
        still_going: Callable[[], bool],
        batch: int = 128,
    ) -> MemoryConsumer:
        self.check("consume")
        c = self.server.stream(stream).consumers.get(consumer)
        if c is None:
            raise NotFound(f"consumer {consumer} not found on {stream}")
        task = asyncio.create_task(c.run(self, dispatch, has_capacity, still_going))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return MemoryConsumer(task, c)

    async def consumer_info(
        self, stream: str, name: str, *, timeout: float = 5.0
    ) -> ConsumerState | None:
        self.check("consumer_info")
        try:
            c = self.server.stream(stream).consumers.get(name)
        except NotFound:
            return None
        return None if c is None else c.state()

    async def tail(
        self, stream: str, subject: str, last: int, *, within: int = 0, timeout: float = 5.0
    ) -> list[StoredMessage]:
        self.check("tail")
        msgs = list(self.server.stream(stream).msgs.values())
        if within > 0 and msgs:
            first = msgs[-1].seq - within + 1
            msgs = [m for m in msgs if m.seq >= first]
        hits = [m for m in msgs if matches(subject, m.subject)]
        return hits[-last:] if last > 0 else []

    async def reservable_bytes(self, *, replicas: int = 1, timeout: float = 10.0) -> int:
        self.check("reservable_bytes")
        return 0  # memory has no storage limit


def _current_cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0
