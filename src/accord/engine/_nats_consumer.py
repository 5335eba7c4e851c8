"""The pull loop of a durable JetStream consumer (`JetStream.consume` on NATS), and its deliveries.

Pull requests (`CONSUMER.MSG.NEXT` with `batch` and `expires`, replies to one inbox) are kept
outstanding and topped up once half of what was asked for has arrived, so the server streams
messages instead of serving a request per small batch (what nats-py's `fetch` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from .._background import cancel_and_wait
from ._api import Dispatch, Subscription
from ._nats_wire import subscribe_direct

log = logging.getLogger("accord.consumer")

PULL_EXPIRES = 2.0  # how long one pull request waits on the server for messages
_PULL_GRACE = 0.5  # a request neither filled nor expired by then was lost (a reconnect)


class NatsDelivery:
    """One message from a consumer; acknowledgements are fire-and-forget publishes."""

    __slots__ = ("_nc", "data", "headers", "num_delivered", "reply", "seq", "subject")

    def __init__(self, nc: NatsClient, msg: Msg) -> None:
        self._nc = nc
        self.data: bytes = msg.data
        self.subject: str = msg.subject
        self.headers: dict[str, str] | None = msg.headers
        self.reply: str = msg.reply
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or with
        # <domain>.<hash> after ACK and a random token at the end (servers 2.10+)
        tokens = msg.reply.split(".")
        at = 4 if len(tokens) == 9 else 6
        try:
            self.num_delivered = int(tokens[at])
            self.seq = int(tokens[at + 1])
        except (IndexError, ValueError):  # not a JetStream delivery (never in practice)
            self.num_delivered, self.seq = 1, 0

    async def _send(self, body: bytes) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._nc.publish(self.reply, body)

    async def ack(self) -> None:
        await self._send(b"+ACK")

    async def nak(self, delay: float = 0.0) -> None:
        await self._send(b'-NAK {"delay": %d}' % int(delay * 1e9) if delay > 0 else b"-NAK")

    async def in_progress(self) -> None:
        await self._send(b"+WPI")


class PullConsumer:
    """Pulls from a durable consumer and hands each message to `dispatch` in arrival order.

    Messages are dispatched from the connection's read loop. A request ends filled, or with a
    status saying how many of its messages it did not deliver; one that ends silently (lost in a
    reconnect) is written off once every request made must have ended. No request is made while
    `has_capacity` waits: at most `batch` messages arrive beyond it.
    """

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        consumer: str,
        dispatch: Dispatch,
        has_capacity: Callable[[], Awaitable[None]],
        still_going: Callable[[], bool],
        batch: int = 128,
    ) -> None:
        self._nc = nc
        self._name = f"{stream}/{consumer}"
        self._dispatch = dispatch
        self._has_capacity = has_capacity
        self._still_going = still_going
        self._batch = batch
        self._low = batch // 2
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._owed = 0  # messages asked for and neither received nor written off
        self._settled_at = 0.0  # by then every request made so far has ended
        self._refused = False  # a pull ended with an error status: pause before the next one
        self._done = False  # dispatch refused a message: stop consuming
        self._waiter: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await subscribe_direct(self._nc, self._inbox, self._on_msg)
        self._task = asyncio.create_task(self._pull(), name=f"accord-consume-{self._name}")

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
                log.debug("consumer %s: pull ended: %s %s", self._name, status, desc)
            self._wake()
            return
        self._owed -= 1
        if self._owed <= self._low:
            self._wake()
        if not self._done and not self._dispatch(NatsDelivery(self._nc, msg)):
            self._done = True  # e.g. the lease is gone: the next consumer redelivers the rest
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _pull(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done and self._still_going():
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
                    log.warning("consumer %s: pull failed: %s", self._name, exc)
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
        """End the pull loop and the inbox subscription; messages still arriving are dropped
        (unacknowledged, so the consumer delivers them again)."""
        self._done = True
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
