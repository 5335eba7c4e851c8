"""The durable mailbox: one JetStream work-queue stream per cluster, one subject per shard.

Senders publish with `Nats-Msg-Id` (a retried publish after an ambiguous ack is stored once, within
the duplicate window). The owner of a shard consumes its subject through a consumer named after
its lease epoch; a new owner deletes the previous owner's consumer and starts a fresh one, which
delivers every message not yet acknowledged, in stream order, at once (no ack-wait to sit out).
Messages are acknowledged only after their turn, and its state write, completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .._background import cancel_and_wait
from .._errors import NotConnected
from ..cluster._config import OPEN_RETRY_FOR, Names
from ..engine._api import Subscription
from ..engine._nats import NatsTransport, subscribe_direct

log = logging.getLogger("accord.mailbox")

DUPLICATE_WINDOW = 120.0
ACK_WAIT = 30.0
DLQ_MAX_AGE = 14 * 24 * 3600


def mailbox_stream(names: Names) -> str:
    return f"accord_{names.cluster}_mailbox"


def mailbox_subject(names: Names, shard: int) -> str:
    return f"{names.prefix}.mbox.{shard}"


def dlq_stream(names: Names) -> str:
    return f"accord_{names.cluster}_dlq"


def dlq_subject(names: Names, agent_type: str) -> str:
    return f"{names.prefix}.dlq.{agent_type}"


async def ensure_streams(js: JetStreamContext, names: Names, replicas: int) -> None:
    """Create the mailbox (work queue), dead-letter and event-log streams if missing.

    Retried for up to `OPEN_RETRY_FOR` seconds while JetStream does not answer (a leader
    election, R3 creations queued on a busy machine); then `NotConnected`.
    """
    deadline = time.monotonic() + OPEN_RETRY_FOR
    while True:
        try:
            await _ensure_streams(js, names, replicas)
            return
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise NotConnected(f"cannot create the mailbox streams: {exc!r}") from None
        await asyncio.sleep(0.5)


async def _ensure_streams(js: JetStreamContext, names: Names, replicas: int) -> None:
    wanted = [
        StreamConfig(
            name=mailbox_stream(names),
            subjects=[f"{names.prefix}.mbox.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW,
        ),
        StreamConfig(
            name=dlq_stream(names),
            subjects=[f"{names.prefix}.dlq.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=DLQ_MAX_AGE,
        ),
        StreamConfig(
            name=f"accord_{names.cluster}_es",
            subjects=[f"{names.prefix}.es.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
        ),
    ]
    for cfg in wanted:
        assert cfg.name is not None
        try:
            await js.stream_info(cfg.name)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
                await js.add_stream(cfg)


class DurableDelivery:
    """One mailbox message being handled: acknowledgement and progress signals."""

    __slots__ = ("attempts", "mode", "msg", "msg_id", "seq")

    def __init__(self, msg: Msg, msg_id: str, mode: str) -> None:
        self.msg = msg
        self.msg_id = msg_id
        self.mode = mode
        try:
            self.attempts = int(msg.metadata.num_delivered) - 1
            self.seq = int(msg.metadata.sequence.stream)  # the mailbox stream's sequence
        except Exception:  # not a JetStream message (never in practice)
            self.attempts, self.seq = 0, 0

    async def ack(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.msg.ack()

    async def in_progress(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.msg.in_progress()

    async def nak(self, delay: float) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.msg.nak(delay=delay)


Dispatch = Callable[[int, int, Msg], bool]

PULL_EXPIRES = 2.0  # how long one pull request waits on the server for messages
_PULL_GRACE = 0.5  # a request neither filled nor expired by then was lost (a reconnect)


class ShardMailbox:
    """Consumes one shard's mailbox subject while this node owns the shard at `epoch`.

    Pull requests (`CONSUMER.MSG.NEXT` with `batch` and `expires`, replies to one inbox) are kept
    outstanding and topped up once half of what was asked for has arrived, so the server streams
    messages instead of serving a request per small batch (what `fetch` does). Messages are
    dispatched from the connection's read loop, in arrival order. A request ends filled, or with a
    status saying how many of its messages it did not deliver; one that ends silently (lost in a
    reconnect) is written off once every request made must have ended. No request is made while
    the node's bulkhead is full: at most `batch` messages per shard arrive beyond it.
    """

    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        shard: int,
        epoch: int,
        dispatch: Dispatch,
        has_capacity: Callable[[], Awaitable[None]],
        still_owner: Callable[[], bool],
        batch: int = 128,
    ) -> None:
        self._js = js
        self._nc: NatsClient = js._nc
        self._stream = mailbox_stream(names)
        self._subject = mailbox_subject(names, shard)
        self.shard = shard
        self.epoch = epoch
        self._dispatch = dispatch
        self._has_capacity = has_capacity
        self._still_owner = still_owner
        self._batch = batch
        self._low = batch // 2
        self._name = f"shard-{shard}-e{epoch}"
        self._next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{self._stream}.{self._name}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._owed = 0  # messages asked for and neither received nor written off
        self._settled_at = 0.0  # by then every request made so far has ended
        self._refused = False  # a pull ended with an error status: pause before the next one
        self._done = False  # dispatch refused a message: the lease is gone
        self._waiter: asyncio.Future[None] | None = None

    async def start(self, previous_epoch: int | None = None) -> None:
        """Replace the previous owner's consumer (a work queue allows one per subject)."""
        if previous_epoch is not None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self._js.delete_consumer(
                    self._stream, f"shard-{self.shard}-e{previous_epoch}"
                )
        config = ConsumerConfig(
            durable_name=self._name,
            filter_subject=self._subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_ack_pending=4096,
            inactive_threshold=3600,
        )
        try:
            await self._js.add_consumer(self._stream, config)
        except nats.js.errors.BadRequestError:  # another consumer still filters this subject
            for info in await self._js.consumers_info(self._stream):
                if info.config.filter_subject == self._subject and info.name != self._name:
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await self._js.delete_consumer(self._stream, info.name)
            await self._js.add_consumer(self._stream, config)
        self._inbox = self._nc.new_inbox()
        self._sub = await subscribe_direct(self._nc, self._inbox, self._on_msg)
        self._task = asyncio.create_task(self._pull(), name=f"accord-mailbox-{self.shard}")

    def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # a status: a request expired (408) or was refused (409, 400, ...)
            hdr = msg.headers or {}
            status = hdr.get("Status", "")
            if status == "100":  # idle heartbeat (not asked for)
                return
            with contextlib.suppress(ValueError):
                self._owed = max(0, self._owed - int(hdr.get("Nats-Pending-Messages", "0")))
            if status not in ("408", "404"):
                self._refused = True
                desc = hdr.get("Description", "")
                log.debug("mailbox of shard %d: pull ended: %s %s", self.shard, status, desc)
            self._wake()
            return
        self._owed -= 1
        if self._owed <= self._low:
            self._wake()
        if not self._done and not self._dispatch(self.shard, self.epoch, msg):
            self._done = True  # lease gone: the next owner's consumer redelivers the rest
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _pull(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done and self._still_owner():
            await self._has_capacity()
            now = loop.time()
            if self._owed < 0 or (self._owed > 0 and now > self._settled_at):
                self._owed = 0  # requests lost without a status (a reconnect, a server restart)
            if self._refused:
                self._refused = False
                await asyncio.sleep(0.2)
                continue
            if self._owed <= self._low:
                want = self._batch - self._owed
                request = b'{"batch":%d,"expires":%d}' % (want, int(PULL_EXPIRES * 1e9))
                try:
                    await self._nc.publish(self._next_subject, request, reply=self._inbox)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("mailbox of shard %d: pull failed: %s", self.shard, exc)
                    await asyncio.sleep(0.2)
                    continue
                self._owed += want
                self._settled_at = now + PULL_EXPIRES + _PULL_GRACE
            if self._owed > self._low and not self._done:
                await self._sleep(loop, min(1.0, self._settled_at - now))

    async def _sleep(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Until a message or status wakes the loop, or `timeout`."""
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _set, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StoreRefused(Exception):
    """JetStream answered a mailbox publish with an error (e.g. the stream is unavailable)."""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)


async def publish_durable(
    transport: NatsTransport, subject: str, data: bytes, msg_id: str, timeout: float
) -> bool:
    """Store a message in the mailbox; True when it was a duplicate of an earlier publish.

    A JetStream publish is a request answered by a PubAck; it goes through the transport's
    shared inbox (cheaper per message than `js.publish`). Raises `RequestTimeout`,
    `NoResponders` (no stream yet), `NotConnected` or `StoreRefused` when the outcome is unknown
    or the message was not stored.
    """
    msg = await transport.request_msg(subject, data, timeout, headers={"Nats-Msg-Id": msg_id})
    try:
        ack = _pub_ack.decode(msg.data)
    except msgspec.DecodeError as exc:
        raise StoreRefused(f"unreadable PubAck: {exc}") from None
    if ack.error is not None or not ack.stream:
        raise StoreRefused(str(ack.error))
    return ack.duplicate


def backoff_delay(attempt: int, base: float, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter for the `attempt`-th retry (1-based)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
