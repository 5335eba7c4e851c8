"""The sender side of durable delivery: store in the mailbox, then wait for the reply.

A message is published to its shard's mailbox subject with `Nats-Msg-Id`; publishing is retried
with the same id until the server acknowledges it (a duplicate is dropped by the server). An ask
then waits on its own inbox subject. When the publish was a duplicate (a retried exactly-once ask)
the reply went to the first attempt's inbox, so the sender asks the owner for the recorded
outcome instead (`kind: "result"`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import nats.errors
from nats.nuid import NUID

from .. import _codec as codec
from .._errors import DeliveryTimeout, NotConnected, OutcomeUnknown
from ..engine._api import Message, NoResponders, RequestTimeout
from ..engine._nats import NatsTransport
from ._mailbox import StoreRefused, publish_durable


class DurableSender:
    def __init__(self, transport: NatsTransport) -> None:
        self._transport = transport
        self._prefix = f"_INBOX.accord.{NUID().next().decode()}"
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._sub: Any = None
        self._lock = asyncio.Lock()

    async def _inbox(self) -> None:
        async with self._lock:
            if self._sub is None:
                self._sub = await self._transport.subscribe_direct(
                    f"{self._prefix}.*", self._on_reply
                )

    def _on_reply(self, msg: Message) -> None:
        fut = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if fut is not None and not fut.done():
            fut.set_result(msg.data)

    async def send(
        self,
        subject: str,
        req: codec.Request,
        enc: codec.Encoding,
        deadline: float,
        shard_subject: str,
    ) -> bytes | None:
        """Store `req` durably; for an ask, return the raw reply envelope.

        Raises `OutcomeUnknown` if the store is not confirmed by `deadline`, and
        `DeliveryTimeout(maybe_delivered=True)` if it is stored but no reply arrives in time.
        """
        loop = asyncio.get_running_loop()
        assert req.id is not None
        fut: asyncio.Future[bytes] | None = None
        token = ""
        if req.kind == "ask":
            if self._sub is None:
                await self._inbox()
            token = str(next(self._tokens))
            req.reply_to = f"{self._prefix}.{token}"
            fut = loop.create_future()
            self._waiting[token] = fut
        data = codec.encode(req, enc)
        try:
            duplicate = await self._publish(subject, data, req.id, deadline)
            if fut is None:
                return None
            if not duplicate:
                timer = loop.call_at(deadline, _give_up, fut)
                try:
                    return await fut
                except TimeoutError:
                    pass
                finally:
                    timer.cancel()
            return await self._lookup(shard_subject, req, enc, deadline)
        finally:
            if token:
                self._waiting.pop(token, None)

    async def _publish(self, subject: str, data: bytes, msg_id: str, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        delay = 0.02
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OutcomeUnknown(
                    f"message {msg_id} was not confirmed stored before the deadline; retrying "
                    "with the same msg_id is safe",
                    msg_id=msg_id,
                )
            try:
                return await publish_durable(
                    self._transport, subject, data, msg_id, min(remaining, 2.0)
                )
            except (RequestTimeout, NoResponders, NotConnected, StoreRefused, nats.errors.Error):
                await asyncio.sleep(min(delay * (0.5 + random.random()), max(remaining, 0)))
                delay = min(delay * 2, 0.5)

    async def _lookup(
        self, shard_subject: str, req: codec.Request, enc: codec.Encoding, deadline: float
    ) -> bytes:
        """Ask the owner for the recorded outcome of `req.id` until `deadline`."""
        loop = asyncio.get_running_loop()
        query = codec.Request(
            v=codec.PROTOCOL_VERSION, kind="result", target=req.target, type=req.type, id=req.id
        )
        data = codec.encode(query, enc)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeliveryTimeout(
                    f"ask {req.target} {req.type} (id {req.id}): stored, but no reply within the "
                    "deadline",
                    maybe_delivered=True,
                )
            try:
                reply = await self._transport.request(shard_subject, data, min(remaining, 1.0))
            except (NoResponders, RequestTimeout):
                await asyncio.sleep(min(0.05, max(remaining, 0)))
                continue
            decoded, _ = codec.decode_reply(reply)
            if decoded.ok or (decoded.error is not None and decoded.error.code != "pending"):
                return reply
            await asyncio.sleep(min(0.05, max(remaining, 0)))


def _give_up(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
