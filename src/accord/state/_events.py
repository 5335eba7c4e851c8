"""Event logs of event-sourced agents: one JetStream subject per agent, appended with optimistic
concurrency on the subject's last sequence (a stale owner's append is refused), replayed in order.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from .._errors import Fenced, NotConnected, StateError
from .._ids import AgentId

EVENT_TYPE_HEADER = "Accord-Event-Type"


class EventLog:
    def __init__(self, js: JetStreamContext, stream: str, prefix: str) -> None:
        self._js = js
        self.stream = stream
        self._prefix = prefix  # accord.<cluster>.es

    def subject(self, agent_id: AgentId) -> str:
        key = base64.urlsafe_b64encode(agent_id.key.encode()).decode().rstrip("=") or "_"
        return f"{self._prefix}.{agent_id.type}.{key}"

    async def append(self, agent_id: AgentId, events: list[Any], last_seq: int) -> int:
        """Append in order, each conditional on the previous; return the last sequence."""
        subject = self.subject(agent_id)
        for ev in events:
            headers = {
                EVENT_TYPE_HEADER: type(ev).__name__,
                "Nats-Expected-Last-Subject-Sequence": str(last_seq),
            }
            try:
                ack = await self._js.publish(subject, msgspec.msgpack.encode(ev), headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code in (10071, 10164):
                    msg = f"event log of {agent_id} was appended by another writer"
                    raise Fenced(msg) from None
                raise NotConnected(f"cannot append events of {agent_id}: {exc}") from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise NotConnected(f"cannot append events of {agent_id}: {exc}") from None
            last_seq = int(ack.seq)
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
                msg = await self._js.get_msg(self.stream, seq=seq + 1, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return seq, count
            except (nats.errors.Error, TimeoutError) as exc:
                raise NotConnected(f"cannot replay events of {agent_id}: {exc}") from None
            name = (msg.headers or {}).get(EVENT_TYPE_HEADER, "")
            typ = types.get(name)
            if typ is None:
                raise StateError(f"event log of {agent_id} has unknown event type {name!r}")
            try:
                apply(msgspec.msgpack.decode(msg.data or b"", type=typ))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StateError(f"event {msg.seq} of {agent_id} does not decode: {exc}") from None
            seq, count = int(msg.seq or seq + 1), count + 1
