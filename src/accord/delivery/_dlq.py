"""The dead-letter stream: messages that failed `max_deliver` times, with the reason kept.

Entries carry the original envelope as their data and the failure in headers; `accord dlq`
lists, shows, replays (back into the mailbox, under a new message id) and purges them.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from .. import _codec as codec
from .._errors import ConfigurationError, NotConnected
from .._ids import AgentId, shard_of
from ..cluster._config import Names
from ..engine._api import (
    JetStream,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StoredMessage,
)
from ._mailbox import dlq_stream, dlq_subject, mailbox_subject

H_REASON = "Accord-Reason"
H_TARGET = "Accord-Target"
H_TYPE = "Accord-Type"
H_DELIVERIES = "Accord-Deliveries"
H_FAILED_AT = "Accord-Failed-At"
H_MSG_ID = "Accord-Msg-Id"


async def dead_letter(
    js: JetStream,
    names: Names,
    data: bytes,
    *,
    target: str,
    msg_type: str,
    msg_id: str,
    reason: str,
    deliveries: int,
) -> None:
    agent_type = target.partition("/")[0] or "unknown"
    safe_type = agent_type if agent_type.replace("_", "").replace("-", "").isalnum() else "unknown"
    headers = {
        H_REASON: reason[:1000].replace("\r", " ").replace("\n", " "),
        H_TARGET: target[:600],
        H_TYPE: msg_type[:200],
        H_DELIVERIES: str(deliveries),
        H_FAILED_AT: f"{time.time():.3f}",
        H_MSG_ID: msg_id[:200],
    }
    try:
        await js.append(
            dlq_subject(names, safe_type), data, headers=headers, msg_id=f"dlq:{msg_id}"[:250]
        )
    except (RequestTimeout, NoResponders, Refused) as exc:
        why = str(exc) or type(exc).__name__
        raise NotConnected(f"cannot store the dead letter of {msg_id}: {why}") from None


class DeadLetter(msgspec.Struct):
    seq: int
    target: str
    type: str
    reason: str
    deliveries: int
    failed_at: float
    msg_id: str
    body: Any = None


def _entry(msg: StoredMessage, with_body: bool) -> DeadLetter:
    h = msg.headers or {}
    body: Any = None
    if with_body:
        try:
            req, enc = codec.decode_request(msg.data)
            body = (
                msgspec.json.decode(req.body) if enc == "json" else msgspec.msgpack.decode(req.body)
            )
        except Exception:
            body = repr(msg.data)
    return DeadLetter(
        seq=msg.seq,
        target=h.get(H_TARGET, ""),
        type=h.get(H_TYPE, ""),
        reason=h.get(H_REASON, ""),
        deliveries=int(h.get(H_DELIVERIES, "0") or 0),
        failed_at=float(h.get(H_FAILED_AT, "0") or 0),
        msg_id=h.get(H_MSG_ID, ""),
        body=body,
    )


class DeadLetters:
    """The dead letters of one cluster, for `accord dlq`. Every method raises `NotConnected`
    when the engine does not answer, `ConfigurationError` for a sequence with no dead letter."""

    def __init__(self, js: JetStream, names: Names, num_shards: int) -> None:
        self._js = js
        self._names = names
        self._stream = dlq_stream(names)
        self._num_shards = num_shards

    async def list(self, limit: int = 1000) -> list[DeadLetter]:
        """The first `limit` dead letters, oldest first (none when the stream does not exist)."""
        out: list[DeadLetter] = []
        seq = 0
        while len(out) < limit:
            msg = await self._next(seq)
            if msg is None:
                break
            out.append(_entry(msg, with_body=False))
            seq = msg.seq
        return out

    async def show(self, seq: int) -> DeadLetter:
        return _entry(await self._get(seq), with_body=True)

    async def replay(self, seq: int) -> str:
        """Put the message back into its mailbox under a new id; remove it from the DLQ."""
        msg = await self._get(seq)
        try:
            req, enc = codec.decode_request(msg.data)
            agent_id = AgentId.parse(req.target)
        except Exception as exc:
            raise ConfigurationError(f"dead letter {seq} cannot be replayed: {exc}") from None
        new_id = f"{req.id or 'msg'}:replay:{seq}"
        req.id = new_id
        req.reply_to = None  # the original asker is long gone
        subject = mailbox_subject(self._names, shard_of(agent_id, self._num_shards))
        try:
            await self._js.append(subject, codec.encode(req, enc), msg_id=new_id)
            await self._js.delete_message(self._stream, seq)
        except (NotConnected, RequestTimeout, NoResponders, NotFound, Refused) as exc:
            why = str(exc) or type(exc).__name__
            raise NotConnected(f"replay of dead letter {seq} failed: {why}") from None
        return new_id

    async def purge(self, seq: int | None = None) -> int:
        """Remove the dead letter at `seq`, or all of them; return how many were removed."""
        if seq is not None:
            await self._get(seq)
            try:
                removed = await self._js.delete_message(self._stream, seq)
            except NotFound:
                removed = False
            except (NotConnected, Refused) as exc:
                raise NotConnected(f"cannot delete dead letter {seq}: {exc}") from None
            if not removed:  # removed meanwhile
                raise ConfigurationError(f"no dead letter with sequence {seq}")
            return 1
        try:
            return await self._js.purge(self._stream)
        except NotFound:
            return 0  # no dead-letter stream: nothing to purge
        except (NotConnected, Refused) as exc:
            raise NotConnected(f"cannot purge the dead-letter stream: {exc}") from None

    async def _get(self, seq: int) -> StoredMessage:
        try:
            msg = await self._js.get_message(self._stream, seq=seq)
        except NotFound:
            msg = None
        except (NotConnected, Refused) as exc:
            raise NotConnected(f"cannot read the dead-letter stream: {exc}") from None
        if msg is None:
            raise ConfigurationError(f"no dead letter with sequence {seq}")
        return msg

    async def _next(self, after: int) -> StoredMessage | None:
        try:
            return await self._js.get_message(
                self._stream, seq=after + 1, subject=f"{self._names.prefix}.dlq.>", after=True
            )
        except NotFound:
            return None
        except (NotConnected, Refused) as exc:
            raise NotConnected(f"cannot read the dead-letter stream: {exc}") from None
