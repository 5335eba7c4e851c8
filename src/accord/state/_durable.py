"""The durable state of one activation: load on activation, persist per consistency level,
roll back a failed turn, and keep the exactly-once dedup window atomically with the state.

| consistency     | when the state is written                                               |
| --------------- | ----------------------------------------------------------------------- |
| strong          | at the end of every turn that changed it, before the reply or ack       |
| eventual        | behind, at most `flush_interval` later; on deactivation and handoff      |
| crdt            | like strong, but a concurrent write is merged instead of refused        |
| event_sourced   | events appended every turn; a snapshot record every `snapshot_every`    |

An exactly-once message always writes at the end of its turn (its dedup entry must be atomic with
the state it produced), whatever the consistency.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from .._agent import Agent
from .._errors import Fenced, NotConnected, StateError
from .._ids import AgentId
from .._retry import Backoff
from .._spec import AgentSpec
from ..cluster._hlc import HybridClock
from ._commit import WITH_COMMIT
from ._events import EventLog
from ._store import (
    DedupEntry,
    MergeState,
    StateConflict,
    StateDeleted,
    StateRecord,
    StateStore,
)

log = logging.getLogger("accord.state")

_enc = msgspec.msgpack.Encoder()
T = TypeVar("T")

CREATE_FIRST = "__accord_create_first__"
"""An event-sourced agent class with this attribute true has most activations for ids never seen
before (workflow runs): `load` tries to create its record first (one request for a new id, one
more than a read for an id that had an activation before)."""
RETRY_FOR = 15.0
"""Seconds a state read or write is retried while JetStream does not answer (a stream leader
election takes ~4-9 s), as long as the lease is still valid."""
CUT_OFF_LOAD_TIMEOUT = 1.0
"""How long an activation on a cut-off node tries to read its state from the local replica."""


def merge_states(a: Any, b: Any) -> Any:
    """Merge two CRDT states: the type's own `merge`, else field by field."""
    if hasattr(a, "merge"):
        return a.merge(b)
    values = {}
    for name in a.__struct_fields__:
        fa, fb = getattr(a, name), getattr(b, name)
        values[name] = fa.merge(fb) if hasattr(fa, "merge") else fa
    return type(a)(**values)


class Durable:
    def __init__(
        self,
        spec: AgentSpec,
        agent_id: AgentId,
        epoch: int,
        store: StateStore,
        events: EventLog | None,
        still_owner: Callable[[], bool],
        clock: HybridClock | None = None,
    ) -> None:
        self._hlc = clock or HybridClock()
        self.orphaned = False  # serving while cut off (split brain): changes stay in memory
        self.spec = spec
        self.id = agent_id
        self.epoch = epoch
        self._store = store
        self._events = events
        self._still_owner = still_owner
        self.record = StateRecord(agent=str(agent_id), schema=spec.options.state_version)
        self.revision = 0
        self._saved = b""  # encoding of the state as last persisted (for rollback)
        self.dirty = False
        self._since_snapshot = 0

    # -- activation ---------------------------------------------------------------------------

    async def load(self, agent: Agent) -> None:
        if self.orphaned:
            await self._load_cut_off(agent)
            return
        if self._events is not None and getattr(self.spec.cls, CREATE_FIRST, False):
            loaded = await self._create_first(agent)
            if loaded is None:
                return  # brand new, and claimed: nothing to read
            record, revision = loaded
        else:
            record, revision = await self._retrying(lambda: self._store.load(self.id), True)
        if record is not None and record.epoch > self.epoch:
            raise Fenced(f"state of {self.id} belongs to epoch {record.epoch} > {self.epoch}")
        state = self._decode_state(record) if record is not None else None
        if state is None and self.spec.state_type is not None:
            state = self.spec.state_type()
        agent.state = state  # type: ignore[attr-defined]
        if record is not None:
            self.record, self.revision = record, revision
            self._hlc.observe(record.hlc)
        if self._events is not None and record is not None:
            # No record means no events: every activation stores its claim (below) before its
            # first append, the record cannot expire (no `state_ttl` for event-sourced agents)
            # and a deletion purges the events first. So a brand-new agent skips the log read.
            seq, count = await self._events.replay(
                self.id, self.record.events_seq, self.spec.event_types, agent.apply
            )
            self.record.events_seq, self._since_snapshot = seq, count
        self._saved = self._encode(agent)
        if record is None or record.epoch < self.epoch:
            # Claim the record for this epoch: any write by an older owner now fails.
            self.record.epoch = self.epoch
            self.record.schema = self.spec.options.state_version
            self.record.state = msgspec.Raw(self._saved)
            await self._write(agent)

    async def _create_first(self, agent: Agent) -> tuple[StateRecord | None, int] | None:
        """Claim the record of an event-sourced agent by creating it (it exists only if the
        agent had an activation before): None when created — a brand-new agent, with no events
        and nothing to read, in one request instead of a read and a claim; else the stored
        record and revision, for `load` to go on with. A record of a newer epoch raises `Fenced`
        (as a read of it would)."""
        if not self._still_owner():
            raise Fenced(f"{self.id}: lease of epoch {self.epoch} no longer valid")
        state_type = self.spec.state_type
        agent.state = state_type() if state_type is not None else None  # type: ignore[attr-defined]
        self._saved = self._encode(agent)
        self.record.epoch = self.epoch
        self.record.schema = self.spec.options.state_version
        self.record.state = msgspec.Raw(self._saved)
        try:
            self.revision = await self._retrying(
                lambda: self._store.save(self.id, self.record, 0), True
            )
        except StateDeleted:  # there was one, deleted since: read again
            return await self._retrying(lambda: self._store.load(self.id), True)
        except StateConflict as exists:  # (possibly our own claim, its answer lost)
            return exists.current, exists.revision
        return None

    async def _load_cut_off(self, agent: Agent) -> None:
        """Activate on a node cut off from the majority (split brain): from the local replica's
        copy if it answers, else — CRDT state only — from the empty state, the CRDT's bottom,
        which loses nothing once merged. Increments are counted under a replica id of this
        activation alone: a stale or empty base under the shared `node:epoch` id would make the
        merge's per-replica maximum drop increments."""
        try:
            record, revision = await self._store.load(self.id, CUT_OFF_LOAD_TIMEOUT, latest=False)
        except NotConnected:
            if self.spec.options.consistency != "crdt":
                raise NotConnected(
                    f"{self.id} is cut off from the cluster and its state is unreachable; "
                    "only CRDT state can start from empty"
                ) from None
            record, revision = None, 0
            log.warning("%s: cut off, state unreachable: serving from the empty CRDT", self.id)
        state = self._decode_state(record) if record is not None else None
        if state is None and self.spec.state_type is not None:
            state = self.spec.state_type()
        agent.state = state  # type: ignore[attr-defined]
        if record is not None:
            self.record, self.revision = record, revision
            self._hlc.observe(record.hlc)
        agent.replica_id = f"{agent.replica_id}~{uuid.uuid4().hex[:8]}"
        self._saved = self._encode(agent)

    async def _retrying(self, op: Callable[[], Awaitable[T]], fence: bool) -> T:
        """Run `op`, retrying `NotConnected` (JetStream not answering: a lost request in a
        leader election) with backoff while the lease is valid, for at most `RETRY_FOR` seconds.
        A lease that ends meanwhile raises `Fenced` when `fence` (the activation stops silently:
        the next owner answers), else the last `NotConnected`."""
        deadline = time.monotonic() + RETRY_FOR
        backoff: Backoff | None = None  # made on the first failure: most calls succeed at once
        while True:
            try:
                return await op()
            except NotConnected as exc:
                if not self._still_owner():
                    if fence:
                        raise Fenced(f"{self.id}: lease of epoch {self.epoch} ended while "
                                     f"JetStream did not answer ({exc})") from None  # fmt: skip
                    raise
                backoff = backoff or Backoff(0.1, 1.0)
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise
                log.info("%s: %s; retrying", self.id, exc)
            await asyncio.sleep(delay)

    def _decode_state(self, record: StateRecord) -> Any:
        typ = self.spec.state_type
        if typ is None or not bytes(record.state):
            return None
        version = self.spec.options.state_version
        migrate = getattr(self.spec.cls, "migrate_state", None)
        try:
            if record.schema != version and migrate is not None:
                return migrate(record.schema, msgspec.msgpack.decode(record.state))
            if record.schema > version:
                raise StateError(
                    f"state of {self.id} has schema v{record.schema}, newer than this code's "
                    f"v{version}"
                )
            return msgspec.msgpack.decode(record.state, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
            raise StateError(
                f"stored state of {self.id} (schema v{record.schema}) does not decode as "
                f"{typ.__name__} v{version}: {exc}; add a `migrate_state` classmethod or fix the "
                "record (it was not reset)"
            ) from None

    def _encode(self, agent: Agent) -> bytes:
        state = getattr(agent, "state", None)
        return b"" if state is None else _enc.encode(state)

    # -- turns --------------------------------------------------------------------------------

    def applied(self, seq: int) -> bool:
        """Was the mailbox message at stream sequence `seq` applied already? Messages of one
        agent arrive in stream order, so everything at or below the highest applied is."""
        return 0 < seq <= self.record.applied_seq

    def lookup(self, msg_id: str) -> DedupEntry | None:
        for entry in self.record.dedup:
            if entry.id == msg_id:
                return entry
        return None

    async def commit(
        self, agent: Agent, dedup: DedupEntry | None = None, seq: int = 0, *, stamp: bool = True
    ) -> None:
        """Persist the end of a successful turn as the consistency level says.

        A changed state is stamped with the hybrid-logical time of this write (what
        last-writer-wins merges compare), unless `stamp` is False: a merge that adopted a peer's
        state keeps that write's time (`apply_merge`), or a later write elsewhere would lose.
        The writes the turn registered (`state._commit.with_commit`) run concurrently with it;
        the commit returns once all are done and raises the first failure (the state's own
        first).
        """
        extra: list[Callable[[], Awaitable[None]]] | None = agent.__dict__.pop(WITH_COMMIT, None)
        if not extra:
            await self._commit(agent, dedup, seq, stamp)
            return
        writes = [asyncio.ensure_future(w()) for w in extra]  # sent with the commit's requests
        try:
            await self._commit(agent, dedup, seq, stamp)
        finally:
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _commit(self, agent: Agent, dedup: DedupEntry | None, seq: int, stamp: bool) -> None:
        if seq > self.record.applied_seq:
            self.record.applied_seq = seq
        consistency = self.spec.options.consistency
        encoded = self._encode(agent)
        changed = encoded != self._saved
        if changed and stamp:
            self.record.hlc = self._hlc.now()
        if self.orphaned:  # cannot reach the state bucket: keep it for the merge after healing
            self.dirty = self.dirty or changed
            self._saved = encoded
            return
        if self._events is not None:
            await self._append_events(agent)
        if dedup is not None:
            self.record.dedup.append(dedup)
            del self.record.dedup[: -self.spec.options.dedup_window]
        if consistency == "event_sourced":
            snapshot = self._since_snapshot >= self.spec.options.snapshot_every
            if snapshot or dedup is not None:
                self._since_snapshot = 0 if snapshot else self._since_snapshot
                self.record.state = msgspec.Raw(encoded)
                await self._write(agent)
            self._saved = encoded
            return
        if consistency == "eventual" and dedup is None:
            self.dirty = self.dirty or changed
            return
        if changed or dedup is not None or self.dirty:
            self.record.state = msgspec.Raw(encoded)
            await self._write(agent)
        self._saved = encoded

    async def _append_events(self, agent: Agent) -> None:
        assert self._events is not None
        pending = agent.__dict__.pop("_pending_events", [])
        if pending:
            seq = await self._events.append(self.id, pending, self.record.events_seq)
            self.record.events_seq = seq
            self.record.events_count += len(pending)
            self._since_snapshot += len(pending)

    def rollback(self, agent: Agent) -> None:
        """Undo a failed turn's changes to the in-memory state."""
        agent.__dict__.pop("_pending_events", None)
        agent.__dict__.pop(WITH_COMMIT, None)
        if self.spec.state_type is not None:
            agent.state = (  # type: ignore[attr-defined]
                msgspec.msgpack.decode(self._saved, type=self.spec.state_type)
                if self._saved
                else self.spec.state_type()
            )

    async def flush(self, agent: Agent) -> None:
        """Write what `eventual` consistency kept behind (deactivation, handoff, timer). An
        orphaned activation writes nothing: its changes go to the owner as a merge on heal."""
        if self.dirty and not self.orphaned:
            encoded = self._encode(agent)
            self.record.state = msgspec.Raw(encoded)
            await self._write(agent)
            self._saved = encoded

    async def _write(self, agent: Agent) -> None:
        crdt = self.spec.options.consistency == "crdt"
        if not crdt and not self._still_owner():
            raise Fenced(f"{self.id}: lease of epoch {self.epoch} no longer valid; write refused")
        self.record.epoch = max(self.record.epoch, self.epoch)
        ttl = self.spec.options.state_ttl
        for _ in range(20):
            try:
                self.revision = await self._retrying(
                    lambda: self._store.save(self.id, self.record, self.revision, ttl=ttl),
                    not crdt,
                )
                self.dirty = False
                return
            except Fenced as exc:
                if not crdt or isinstance(exc, StateDeleted):
                    raise
                current, revision = await self._retrying(lambda: self._store.load(self.id), False)
                assert current is not None
                self._merge_into(agent, current, revision)
            except StateConflict as conflict:
                if crdt and conflict.current is not None:
                    self._merge_into(agent, conflict.current, conflict.revision)
                else:
                    # The record moved under an older (stale) writer whose turn was never
                    # acknowledged: this epoch supersedes it.
                    self.revision = conflict.revision
        raise Fenced(f"{self.id}: could not write state after repeated conflicts")

    def merge_payload(self, agent: Agent, node: str) -> MergeState | None:
        """What this (orphaned) activation changed while cut off, for the owner to merge."""
        if not self.dirty or self.spec.state_type is None:
            return None
        return MergeState(msgspec.Raw(self._encode(agent)), self.record.hlc, node, self.epoch)

    def apply_merge(self, agent: Agent, incoming: MergeState) -> str:
        """Fold a split-brain peer's state in: CRDT merge, else last writer (by HLC) wins.

        Returns what happened ("merged", "theirs", "ours") for the record of the merge.
        """
        typ = self.spec.state_type
        if typ is None:
            return "ours"
        try:
            theirs: Any = msgspec.msgpack.decode(incoming.state, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"merge for {self.id} does not decode: {exc}") from None
        self._hlc.observe(incoming.hlc)
        if self.spec.options.consistency == "crdt":
            agent.state = merge_states(agent.state, theirs)  # type: ignore[attr-defined]
            return "merged"
        if incoming.hlc > self.record.hlc:
            agent.state = theirs  # type: ignore[attr-defined]
            self.record.hlc = incoming.hlc  # the state is that write's, and as old as it
            return "theirs"
        return "ours"

    def _merge_into(self, agent: Agent, current: StateRecord, revision: int) -> None:
        theirs = self._decode_state(current)
        mine = getattr(agent, "state", None)
        merged = mine if theirs is None else theirs if mine is None else merge_states(mine, theirs)
        agent.state = merged  # type: ignore[attr-defined]
        encoded = self._encode(agent)
        self.record.state = msgspec.Raw(encoded)
        self.record.epoch = max(current.epoch, self.epoch)
        self.revision = revision
        log.info("merged concurrent CRDT state of %s", self.id)
