"""Quorum decisions without a coordinator process.

`propose` records the proposal, then sends a `VoteRequest` to every voter agent durably (at least
once, through the mailbox), so votes are cast even if the proposer dies. The node that runs a
voter's vote handler records that vote itself (create-once key per voter: one vote each) and
re-tallies; whoever first sees the outcome settled writes the decision with create-once, so a
proposal is **never decided twice**. The proposer waits for the decision until its deadline and
then writes `expired` (again create-once: a decision that won the race stands).

Tally: with n voters and need = ceil(quorum · n), `accepted` once yes ≥ need, `rejected` once
no > n - need (yes can no longer reach need), `expired` at the deadline otherwise.
Everything (proposal, votes, decision) is kept in the KV bucket `accord_<cluster>_votes`, itself
a JetStream stream, and each decision is also appended to the cluster's events stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time
from typing import Any

import msgspec

from .._errors import ConfigurationError
from ..cluster._config import ENGINE_FAILURES
from ..engine._api import KV, JetStream, WrongRevision
from ._leases import engine_errors


class VoteRequest(msgspec.Struct):
    """Sent to each voter; a voter agent handles it with a handler returning `bool` (yes/no)."""

    proposal_id: str
    topic: str
    proposal: msgspec.Raw = msgspec.Raw(b"null")  # the proposal, msgpack-encoded


class ProposalRecord(msgspec.Struct):
    id: str
    topic: str
    voters: list[str]
    quorum: float
    proposer: str
    created_at: float


class Decision(msgspec.Struct):
    """The outcome of a proposal: every vote, the tally, and who decided."""

    id: str
    topic: str
    outcome: str  # "accepted" | "rejected" | "expired"
    yes: int
    no: int
    need: int
    voters: int
    votes: dict[str, bool]
    decided_by: str
    at: float


def need_for(quorum: float, n: int) -> int:
    return max(1, math.ceil(quorum * n - 1e-9))


def settle(record: ProposalRecord, votes: dict[str, bool]) -> str | None:
    n = len(record.voters)
    need = need_for(record.quorum, n)
    yes = sum(1 for v in votes.values() if v)
    no = len(votes) - yes
    if yes >= need:
        return "accepted"
    if no > n - need:
        return "rejected"
    return None


class Ballots:
    """Reads and writes one cluster's proposals, votes and decisions (bucket `kv`); decisions are
    also appended to the events stream under `events_subject`.

    Every method raises `NotConnected` when the engine does not answer; a write may then have been
    applied or not, and every write here is create-once, so repeating it is safe.
    """

    def __init__(self, js: JetStream, kv: KV, events_subject: str) -> None:
        self._js = js
        self._kv = kv
        self._events = events_subject

    @engine_errors
    async def open(self, record: ProposalRecord) -> None:
        """Record the proposal (before any vote request is sent: voters look it up). Cancelled,
        it may or may not be recorded; without vote requests nobody decides it."""
        if not record.voters:
            raise ConfigurationError("a proposal needs at least one voter")
        if not 0 < record.quorum <= 1:
            raise ConfigurationError(f"quorum must be in (0, 1], got {record.quorum}")
        # A repeat of our own create (its reply lost) finds the same record: fine.
        with contextlib.suppress(WrongRevision):
            await self._kv.create(f"p.{record.id}", msgspec.json.encode(record))

    @engine_errors
    async def proposal(self, pid: str) -> ProposalRecord | None:
        # From the leader: a voter asked right after `open` must not find it missing on a replica.
        entry = await self._kv.get(f"p.{pid}", leader=True)
        if entry is None:
            return None
        return msgspec.json.decode(entry.value, type=ProposalRecord)

    @engine_errors
    async def vote(self, pid: str, voter: str, yes: bool, by: str) -> Decision | None:
        """Record `voter`'s vote (first one wins) and decide if that settles the proposal."""
        record = await self.proposal(pid)
        if record is None or voter not in record.voters:
            return None
        # A redelivered vote request finds the vote recorded: the first vote stands.
        with contextlib.suppress(WrongRevision):
            await self._kv.create(f"v.{pid}.{_key(voter)}", b"1" if yes else b"0")
        votes = await self.votes(record)
        outcome = settle(record, votes)
        return await self.decide(record, outcome, votes, by) if outcome else None

    @engine_errors
    async def votes(self, record: ProposalRecord) -> dict[str, bool]:
        out = {}
        for voter in record.voters:
            entry = await self._kv.get(f"v.{record.id}.{_key(voter)}")
            if entry is not None:
                out[voter] = entry.value == b"1"
        return out

    @engine_errors
    async def decide(
        self, record: ProposalRecord, outcome: str, votes: dict[str, bool], by: str
    ) -> Decision:
        """Write the decision once; if another was written first, return that one.

        Cancelled, the decision may or may not be written; if it was not, a later vote (or the
        proposer's `expired` at its deadline) writes one, and none is ever overwritten.
        """
        yes = sum(1 for v in votes.values() if v)
        decision = Decision(
            id=record.id,
            topic=record.topic,
            outcome=outcome,
            yes=yes,
            no=len(votes) - yes,
            need=need_for(record.quorum, len(record.voters)),
            voters=len(record.voters),
            votes=votes,
            decided_by=by,
            at=time.time(),
        )
        try:
            await self._kv.create(f"d.{record.id}", msgspec.json.encode(decision))
        except WrongRevision:
            existing = await self.decision(record.id, leader=True)
            if existing is not None:
                return existing
            # Written and then gone (the bucket purged): the one we computed is as good.
            return decision
        # The KV record is the truth; the event is a copy for `accord events` and post-mortems.
        with contextlib.suppress(*ENGINE_FAILURES):
            await self._js.append(self._events, msgspec.json.encode(decision))
        return decision

    @engine_errors
    async def decision(self, pid: str, *, leader: bool = False) -> Decision | None:
        """The recorded decision, if any (`leader`: never a stale replica's "none yet")."""
        entry = await self._kv.get(f"d.{pid}", leader=leader)
        if entry is None:
            return None
        return msgspec.json.decode(entry.value, type=Decision)

    @engine_errors
    async def wait(self, pid: str, until: float) -> Decision | None:
        """Poll for the decision until the monotonic time `until`; None if there is none by then.
        Cancelling the wait changes nothing stored."""
        while True:
            found = await self.decision(pid)
            if found is not None or time.monotonic() >= until:
                return found
            await asyncio.sleep(min(0.05, max(0.0, until - time.monotonic())))


def _key(voter: str) -> str:
    return base64.urlsafe_b64encode(voter.encode()).decode().rstrip("=")


def encode_proposal(proposal: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(proposal))
