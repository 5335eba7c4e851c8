"""The sender side of durable delivery: store in the mailbox, then wait for the reply.

A message is appended to its shard's mailbox subject with a message id; the append is retried
with the same id until the stream confirms it (a duplicate is dropped by the stream). An ask then
waits on a reply subject of the connection's shared inbox. When the append was a duplicate (a
retried exactly-once ask) the reply went to the first attempt's inbox, so the sender asks the
owner for the recorded outcome instead (`kind: "result"`).
"""

from __future__ import annotations

import asyncio

from .. import _codec as codec
from .._errors import DeliveryTimeout, MessageTooLarge, NotConnected, OutcomeUnknown
from .._retry import Backoff
from ..engine._api import Engine, Message, NoResponders, Refused, RequestTimeout

#: Room the mailbox append's headers (message id, expected stream) take next to the data.
_HEADER_ROOM = 256


class DurableSender:
    """Durable sends over one engine connection: the mailbox append, and for an ask the reply
    on a subject of the connection's shared inbox (`Transport.reply_inbox`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def send(
        self,
        subject: str,
        req: codec.Request,
        enc: codec.Encoding,
        deadline: float,
        shard_subject: str,
    ) -> bytes | None:
        """Store `req` durably; for an ask, return the raw reply envelope.

        Raises `StorageFull` at once when the mailbox has no room (not stored: a full store is
        not transient, so it is not retried), `OutcomeUnknown` if the store is not confirmed by
        `deadline`, and
        `DeliveryTimeout(maybe_delivered=True)` if it is stored but no reply arrives in time.
        """
        loop = asyncio.get_running_loop()
        assert req.id is not None
        fut: asyncio.Future[Message] | None = None
        if req.kind == "ask":
            req.reply_to, fut = await self._engine.reply_inbox()
        data = codec.encode(req, enc)
        if len(data) + _HEADER_ROOM > self._engine.max_payload:  # refused before it is stored
            if fut is not None:
                fut.cancel()
            raise MessageTooLarge(
                f"{req.type} to {req.target}: {len(data)} bytes do not fit the server's "
                f"max_payload of {self._engine.max_payload} with the mailbox headers"
            )
        try:
            duplicate = await self._publish(subject, data, req.id, deadline)
            if fut is None:
                return None
            if not duplicate:
                timer = loop.call_at(deadline, _give_up, fut)
                try:
                    return (await fut).data
                except TimeoutError:
                    pass
                finally:
                    timer.cancel()
            return await self._lookup(shard_subject, req, enc, deadline)
        finally:
            if fut is not None and not fut.done():
                fut.cancel()  # the inbox forgets the subject

    async def _publish(self, subject: str, data: bytes, msg_id: str, deadline: float) -> bool:
        """Append until the stream confirms; True when it was a duplicate of an earlier append
        (the same `msg_id` within the duplicate window)."""
        loop = asyncio.get_running_loop()
        backoff: Backoff | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OutcomeUnknown(
                    f"message {msg_id} was not confirmed stored before the deadline; retrying "
                    "with the same msg_id is safe",
                    msg_id=msg_id,
                )
            try:
                ack = await self._engine.append(
                    subject, data, msg_id=msg_id, timeout=min(remaining, 2.0)
                )
                return ack.duplicate
            except (RequestTimeout, NoResponders, NotConnected, Refused):
                backoff = backoff or Backoff(0.02, 0.5)
                await asyncio.sleep(min(backoff.next(), max(remaining, 0)))

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
                reply = await self._engine.request(shard_subject, data, min(remaining, 1.0))
            except (NoResponders, RequestTimeout):
                await asyncio.sleep(min(0.05, max(remaining, 0)))
                continue
            decoded, _ = codec.decode_reply(reply)
            if decoded.ok or (decoded.error is not None and decoded.error.code != "pending"):
                return reply
            await asyncio.sleep(min(0.05, max(remaining, 0)))


def _give_up(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
