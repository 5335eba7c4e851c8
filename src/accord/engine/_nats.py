"""The NATS engine: `Engine` (`Transport` here, `JetStream` mixed in from `_nats_js.py`) over
nats-py.

The only package that imports nats-py is `accord.engine`; nats-py exceptions are translated here,
inside each method, into accord's hierarchy or the seam's internal signals (`NoResponders`, ...).

Hot paths avoid two per-message costs of nats-py: a request goes through one wildcard inbox
subscription whose replies resolve their waiter straight from the read loop (no NUID and random
token, no `wait_for`), and `subscribe_direct` hands messages to a plain function in arrival order
instead of through a queue and a task per subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .._errors import NotConnected
from ._api import (
    DirectHandler,
    Handler,
    Message,
    NoResponders,
    Refused,
    RequestTimeout,
    Subscription,
)
from ._nats_errors import map_errors
from ._nats_js import NatsJetStream
from ._nats_wire import subscribe_direct as subscribe_direct  # the name callers import

log = logging.getLogger("accord.transport")


class NatsTransport(NatsJetStream):
    """`Engine` over one nats-py connection that reconnects forever."""

    def __init__(self, nc: NatsClient, name: str) -> None:
        self.nc = nc
        self.name = name
        self.js: JetStreamContext = nc.jetstream()
        self._inbox = ""  # "<prefix>." of the reply subjects of this connection's requests
        self._inbox_sub: Any = None
        self._inbox_lock = asyncio.Lock()
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Any]] = {}  # token -> waiter for a Msg

    @classmethod
    async def connect(cls, servers: list[str], name: str, timeout: float = 5.0) -> NatsTransport:
        async def on_error(exc: Exception) -> None:
            log.debug("nats connection error: %s", exc)

        held: list[NatsClient] = []

        async def on_disconnect() -> None:  # expected in operation: one line, no traceback
            if held and not (held[0].is_closed or held[0].is_draining):  # not our own close
                log.warning("NATS connection lost; reconnecting")

        async def on_reconnect() -> None:
            log.info("NATS connection re-established")

        try:
            # nats-py retries the first connection as often as reconnections (forever here):
            # bound it, so a wrong URL is an error and not a hang.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                timeout + 1,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            why = str(exc) or f"no server answered within {timeout + 1:.0f}s"
            raise NotConnected(f"cannot connect to NATS at {','.join(servers)}: {why}") from None
        held.append(nc)
        return cls(nc, name)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        msg = await self.request_msg(subject, data, timeout)
        data_out: bytes = msg.data
        return data_out

    async def request_msg(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """Publish `data` with a reply subject of this connection's inbox; return the reply.

        Raises `NoResponders` (nobody subscribes: not delivered), `RequestTimeout` (sent, no reply
        within `timeout`: outcome unknown) or `NotConnected`. A late reply is dropped.
        """
        if self._inbox_sub is None:
            with map_errors(f"request on {subject}"):
                await self._start_inbox()
        token = str(next(self._tokens))
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            await self.nc.publish(subject, data, reply=self._inbox + token, headers=headers)
            timer = fut.get_loop().call_later(timeout, _expire, fut)
            try:
                msg = await fut
            finally:
                timer.cancel()
        except nats.errors.MaxPayloadError:
            raise Refused(f"request on {subject}: {len(data)} bytes exceed max_payload") from None
        except (nats.errors.Error, OSError) as exc:  # closed, buffer full, bad subject, ...
            raise NotConnected(f"request on {subject}: {type(exc).__name__}: {exc}") from None
        finally:
            self._waiting.pop(token, None)
        hdr = msg.headers
        if hdr and hdr.get("Status") == "503" and not msg.data:
            raise NoResponders(subject)
        return msg

    async def _start_inbox(self) -> None:
        async with self._inbox_lock:
            if self._inbox_sub is None:
                prefix = f"{self.nc.new_inbox()}."
                self._inbox_sub = await subscribe_direct(self.nc, f"{prefix}*", self._on_reply)
                self._inbox = prefix

    def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[len(self._inbox) :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def cluster_size(self) -> int:
        info = getattr(self.nc, "_server_info", None) or {}
        return 1 + len(set(info.get("connect_urls", []) or []))

    async def reply_inbox(self) -> tuple[str, asyncio.Future[Message]]:
        if self._inbox_sub is None:
            with map_errors("start the reply inbox"):
                await self._start_inbox()
        token = str(next(self._tokens))
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        fut.add_done_callback(functools.partial(self._forget, token))
        return self._inbox + token, fut

    def _forget(self, token: str, fut: asyncio.Future[Message]) -> None:
        """A reply waiter is done: drop its entry (a reply popped it already; this is for one
        cancelled or timed out by its caller)."""
        if self._waiting.get(token) is fut:
            del self._waiting[token]

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    async def publish(
        self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
        except nats.errors.MaxPayloadError:
            raise Refused(f"publish on {subject}: {len(data)} bytes exceed max_payload") from None
        except (nats.errors.Error, OSError) as exc:  # closed, buffer full, bad subject, ...
            raise NotConnected(f"publish on {subject}: {type(exc).__name__}: {exc}") from None

    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> Subscription:
        with map_errors(f"subscribe to {subject}"):
            sub: Any = await self.nc.subscribe(subject, queue=queue, cb=cb)
        return NatsSubscription(sub)

    async def subscribe_direct(self, subject: str, fn: DirectHandler) -> Subscription:
        """Subscribe so that `fn` runs for each message, in arrival order, in the read loop.

        `fn` must not block; whatever it raises is logged and the message dropped. Saves a queue
        and a task hop per message over `subscribe`. Draining the subscription waits for nothing:
        every message received was handed to `fn` already.
        """

        with map_errors(f"subscribe to {subject}"):
            return NatsSubscription(await subscribe_direct(self.nc, subject, fn))

    async def flush(self, timeout: float) -> None:
        try:
            await self.nc.flush(timeout=max(1, round(timeout)))
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"flush failed: {exc}") from None

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # draining a broken connection: closing is all that is left
                await self.nc.close()


class NatsSubscription:
    """A nats-py subscription whose ending never raises: on a closed connection there is
    nothing left to stop."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._sub.unsubscribe()

    async def drain(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._sub.drain()


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout())
