"""The transport seam: the few messaging operations the runtime needs, each with a timeout.

Everything above this module depends on `Transport`, not on nats-py; nats-py exceptions are
translated here into accord's hierarchy (plus `NoResponders`, an internal routing signal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ._errors import NotConnected

log = logging.getLogger("accord.transport")

Handler = Callable[[Msg], Awaitable[None]]


class NoResponders(Exception):
    """Nobody subscribes to the subject right now (e.g. a shard between two owners)."""


class RequestTimeout(Exception):
    """The request was sent and no reply came in time: the outcome is unknown."""


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Transport(Protocol):
    name: str

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes: ...
    async def publish(self, subject: str, data: bytes) -> None: ...
    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> Subscription: ...
    async def flush(self, timeout: float) -> None: ...
    async def close(self) -> None: ...


class NatsTransport:
    """`Transport` over one nats-py connection that reconnects forever."""

    def __init__(self, nc: NatsClient, name: str) -> None:
        self.nc = nc
        self.name = name
        self.js: JetStreamContext = nc.jetstream()

    @classmethod
    async def connect(cls, servers: list[str], name: str, timeout: float = 5.0) -> NatsTransport:
        async def on_error(exc: Exception) -> None:
            log.debug("nats connection error: %s", exc)

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
                ),
                timeout + 1,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            why = str(exc) or f"no server answered within {timeout + 1:.0f}s"
            raise NotConnected(f"cannot connect to NATS at {','.join(servers)}: {why}") from None
        return cls(nc, name)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        try:
            msg = await self.nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(subject) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise NotConnected(str(exc)) from None
        data_out: bytes = msg.data
        return data_out

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise NotConnected(str(exc)) from None

    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> Subscription:
        sub: Any = await self.nc.subscribe(subject, queue=queue, cb=cb)
        return sub  # type: ignore[no-any-return]

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
