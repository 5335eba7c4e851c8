"""Wire-level helpers of the NATS engine shared by its modules: JetStream reply structs decoded with
msgspec (PubAck, stored message), NATS header parsing, and `subscribe_direct`, which hands each
message to a plain function in the read loop instead of through a queue and a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ._api import PubAck, Refused, Subscription
from ._nats_errors import error_from_reply

log = logging.getLogger("accord.transport")


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str = ""


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


class _RawMsg(msgspec.Struct):
    subject: str
    seq: int
    data: str = ""  # base64
    hdrs: str = ""  # base64 of "NATS/1.0\r\nKey: value\r\n..."


class _MsgReply(msgspec.Struct):
    message: _RawMsg | None = None
    error: _ApiError | None = None


_ack = msgspec.json.Decoder(_Ack)
msg_reply = msgspec.json.Decoder(_MsgReply)


def decode_ack(data: bytes, what: str) -> PubAck:
    """The PubAck of a JetStream publish, or the accord error its error reply stands for."""
    try:
        ack = _ack.decode(data)
    except msgspec.DecodeError as exc:
        raise Refused(f"{what}: unreadable PubAck: {exc}") from None
    if ack.error is not None:
        err = ack.error
        raise error_from_reply(msgspec.structs.asdict(err), what)
    if not ack.stream:
        raise Refused(f"{what}: PubAck names no stream")
    return PubAck(ack.stream, ack.seq, ack.duplicate)


def parse_headers(raw: bytes) -> dict[str, str] | None:
    """Headers in NATS wire form (a status line, then `Key: value` lines)."""
    lines = raw.decode(errors="replace").split("\r\n")[1:]
    headers = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers or None


async def subscribe_direct(nc: NatsClient, subject: str, fn: Callable[[Any], None]) -> Subscription:
    """`NatsTransport.subscribe_direct` on a bare nats-py connection."""

    async def fallback(msg: Msg) -> None:
        fn(msg)

    sub: Any = await nc.subscribe(subject, cb=fallback)
    if isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue):
        sub._pending_queue = _DirectQueue(fn)  # nats-py hands every message to put_nowait
        task = getattr(sub, "_wait_for_msgs_task", None)
        if task is not None:
            task.cancel()
    return sub  # type: ignore[no-any-return]


class _DirectQueue(asyncio.Queue[Msg]):
    """A subscription's pending queue that runs the handler instead of queueing."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        super().__init__()
        self._fn = fn

    def put_nowait(self, item: Msg) -> None:
        try:
            self._fn(item)
        except Exception:  # the read loop must survive any handler bug
            log.exception("message handler failed on %s", getattr(item, "subject", "?"))
