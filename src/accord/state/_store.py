"""Agent state records in a KV bucket (`engine.KV`), written by compare-and-set and fenced by epoch.

One record per agent: the encoded state, the writer's shard epoch, the state schema version, the
exactly-once dedup window and, for event-sourced agents, the last event folded into the snapshot.
A writer whose compare-and-set fails because a newer epoch wrote meanwhile gets `Fenced`.
"""

from __future__ import annotations

import base64

import msgspec

from .._errors import Fenced, NotConnected, StateError
from .._ids import AgentId
from ..engine._api import KV, NotFound, Refused, WrongRevision

RECORD_VERSION = 1


class DedupEntry(msgspec.Struct, array_like=True):
    """The recorded outcome of one exactly-once message."""

    id: str
    ok: bool
    reply: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack of the reply (nil when none)
    code: str = ""
    message: str = ""
    rtype: str = ""


class StateRecord(msgspec.Struct, omit_defaults=True):
    v: int = RECORD_VERSION
    agent: str = ""
    schema: int = 1
    epoch: int = 0
    state: msgspec.Raw = msgspec.Raw(b"")
    dedup: list[DedupEntry] = msgspec.field(default_factory=list)
    events_seq: int = 0
    events_count: int = 0
    hlc: int = 0  # hybrid-logical-clock time of the last change (last-writer-wins merges)
    applied_seq: int = 0  # highest mailbox stream sequence applied (exactly-once redeliveries)


class MergeState(msgspec.Struct, tag="__accord_merge__"):
    """Sent by a node that served an agent while cut off (split brain) to the agent's owner after
    the partition healed: its state, to be merged (CRDT) or compared (last writer wins)."""

    state: msgspec.Raw
    hlc: int
    node: str
    epoch: int


MERGE_TYPE = "__accord_merge__"


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(StateRecord)


class StateDeleted(Fenced):
    """The record was deleted (`Mesh.delete_state`) or expired (`state_ttl`) after this writer
    read it: its in-memory state must not be written back. The activation ends as when fenced;
    the next one starts from no state."""


class StateConflict(Exception):
    """The record changed since it was read (by a writer of the same or an older epoch)."""

    def __init__(self, current: StateRecord | None, revision: int) -> None:
        super().__init__("state changed concurrently")
        self.current = current
        self.revision = revision


def state_key(agent_id: AgentId) -> str:
    """KV keys allow [-/_=.a-zA-Z0-9]; agent keys are arbitrary, so the key is base64url'd."""
    key = base64.urlsafe_b64encode(agent_id.key.encode()).decode().rstrip("=")
    return f"{agent_id.type}.{key or '_'}"


class StateStore:
    """`timeout` bounds each request: one lost in a leader election of the engine fails after it
    (as `NotConnected`) instead of after the engine's default 5 s, so the caller can retry."""

    def __init__(self, kv: KV, timeout: float = 2.0) -> None:
        self._kv = kv
        self.timeout = timeout

    async def load(
        self, agent_id: AgentId, timeout: float | None = None, *, latest: bool = True
    ) -> tuple[StateRecord | None, int]:
        """The stored record and its revision (None, 0 when the agent has none). `latest=False`
        accepts any replica's copy, possibly behind (for a node cut off from the leader)."""
        try:
            # `latest` reads from the stream leader, never a replica: a replica still catching
            # up (a server back from a partition) answers an old revision, and a writer that took
            # it for the latest would overwrite acknowledged state when its compare-and-set
            # conflicts.
            entry = await self._kv.get(
                state_key(agent_id), timeout=timeout or self.timeout, leader=latest
            )
        except (NotConnected, NotFound, Refused) as exc:
            raise NotConnected(f"cannot load state of {agent_id}: {exc}") from None
        if entry is None:
            return None, 0
        return self.decode(agent_id, entry.value), entry.revision

    @staticmethod
    def decode(agent_id: AgentId, data: bytes) -> StateRecord:
        try:
            record = _dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"stored record of {agent_id} does not decode: {exc}") from None
        if record.v > RECORD_VERSION:
            raise StateError(
                f"stored record of {agent_id} has format v{record.v}; this accord reads "
                f"up to v{RECORD_VERSION}"
            )
        return record

    async def save(
        self, agent_id: AgentId, record: StateRecord, last_revision: int, *, ttl: int = 0
    ) -> int:
        """Write `record` iff the stored revision is still `last_revision`; return the new one.
        `ttl` > 0: the record expires `ttl` seconds after this write.

        Raises `Fenced` when a newer epoch wrote meanwhile, `StateDeleted` when the record was
        deleted or expired since it was read, `StateConflict` when it changed under a writer of
        the same or an older epoch (the caller decides: merge, or supersede), `StorageFull` when
        the bucket has no room (not applied), `NotConnected` when the engine did not answer (the
        write may or may not be applied).
        """
        key = state_key(agent_id)
        data = _enc.encode(record)
        try:
            if last_revision:
                return await self._kv.update(
                    key, data, last_revision, timeout=self.timeout, ttl=ttl
                )
            return await self._kv.create(key, data, timeout=self.timeout, ttl=ttl)
        except WrongRevision:
            pass
        except (NotConnected, Refused) as exc:
            raise NotConnected(f"cannot save state of {agent_id}: {exc}") from None
        current, revision = await self.load(agent_id)
        if current is None:
            raise StateDeleted(f"state of {agent_id} was deleted or expired since it was read")
        if current is not None and current.epoch > record.epoch:
            raise Fenced(
                f"state of {agent_id} was written at epoch {current.epoch}; "
                f"this writer holds epoch {record.epoch}"
            )
        raise StateConflict(current, revision)

    async def delete(self, agent_id: AgentId) -> None:
        """Remove the agent's record and its history (frees its space at once). A writer that
        read the record before gets `StateDeleted` on its next save, never overwrites this."""
        try:
            await self._kv.purge(state_key(agent_id), timeout=self.timeout)
        except (NotConnected, Refused) as exc:
            raise NotConnected(f"cannot delete state of {agent_id}: {exc}") from None
