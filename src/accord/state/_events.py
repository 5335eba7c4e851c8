"""Event logs of event-sourced agents: one stream subject per agent, appended with optimistic
concurrency on the subject's last sequence (a stale owner's append is refused), replayed in order.
The stream lives in the engine (`engine.JetStream`); `state/_durable.py` drives it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import msgspec

from .._errors import Fenced, NotConnected, StateError
from .._ids import AgentId
from ..engine._api import JetStream, NoResponders, NotFound, Refused, RequestTimeout, WrongRevision

EVENT_TYPE_HEADER = "Accord-Event-Type"


class EventLog:
    """The event logs of one cluster: stream `stream`, subjects `<prefix>.<type>.<key>`."""

    def __init__(self, js: JetStream, stream: str, prefix: str, timeout: float = 5.0) -> None:
        self._js = js
        self.stream = stream
        self._prefix = prefix  # accord.<cluster>.es
        self.timeout = timeout

    def subject(self, agent_id: AgentId) -> str:
        key = base64.urlsafe_b64encode(agent_id.key.encode()).decode().rstrip("=") or "_"
        return f"{self._prefix}.{agent_id.type}.{key}"

    async def append(self, agent_id: AgentId, events: list[Any], last_seq: int) -> int:
        """Append in order, each conditional on the previous; return the last sequence.

        Raises `Fenced` when another writer appended since `last_seq` (nothing of this call is
        stored past that point), `NotConnected` when the engine did not confirm an append (that
        event may or may not be stored; the ones before it are).
        """
        subject = self.subject(agent_id)
        for ev in events:
            try:
                ack = await self._js.append(
                    subject,
                    msgspec.msgpack.encode(ev),
                    headers={EVENT_TYPE_HEADER: type(ev).__name__},
                    expect_last_subject_seq=last_seq,
                    timeout=self.timeout,
                )
            except WrongRevision:
                msg = f"event log of {agent_id} was appended by another writer"
                raise Fenced(msg) from None
            except (NotConnected, RequestTimeout, NoResponders, Refused) as exc:
                why = str(exc) or type(exc).__name__
                raise NotConnected(f"cannot append events of {agent_id}: {why}") from None
            last_seq = ack.seq
        return last_seq

    async def replay(
        self,
        agent_id: AgentId,
        after_seq: int,
        types: dict[str, type],
        apply: Callable[[Any], None],
    ) -> tuple[int, int]:
        """Apply every event after `after_seq`; return (last sequence, events applied)."""
        subject = self.subject(agent_id)
        seq, count = after_seq, 0
        while True:
            try:
                msg = await self._js.get_message(
                    self.stream, seq=seq + 1, subject=subject, after=True, timeout=self.timeout
                )
            except NotFound:  # no stream yet: no events either
                return seq, count
            except (NotConnected, Refused) as exc:
                raise NotConnected(f"cannot replay events of {agent_id}: {exc}") from None
            if msg is None:
                return seq, count
            name = (msg.headers or {}).get(EVENT_TYPE_HEADER, "")
            typ = types.get(name)
            if typ is None:
                raise StateError(f"event log of {agent_id} has unknown event type {name!r}")
            try:
                apply(msgspec.msgpack.decode(msg.data, type=typ))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StateError(f"event {msg.seq} of {agent_id} does not decode: {exc}") from None
            seq, count = msg.seq, count + 1
