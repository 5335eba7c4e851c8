"""State of an agent activated on a node cut off from the majority (split brain), and retries of
state reads while JetStream does not answer: `state/_durable.Durable` over a fake store."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import accord
from accord._agent import spec_of
from accord._errors import Fenced, NotConnected
from accord._ids import AgentId
from accord.crdt import GCounter, merge
from accord.state import _durable
from accord.state._durable import Durable
from accord.state._store import StateRecord


class Hits(msgspec.Struct):
    hits: GCounter = msgspec.field(default_factory=GCounter)


class Total(msgspec.Struct):
    total: int = 0


class Crdt(accord.Agent, type="cut_crdt", failover="split_brain_allowed", consistency="crdt"):
    state: Hits


class Lww(accord.Agent, type="cut_lww", failover="split_brain_allowed"):
    state: Total


class Unreachable:
    """A state store whose bucket never answers (the node's server has no quorum)."""

    def __init__(self) -> None:
        self.loads = 0

    async def load(
        self, agent_id: AgentId, timeout: float | None = None, *, latest: bool = True
    ) -> Any:
        self.loads += 1
        raise NotConnected(f"cannot load state of {agent_id}: no answer in time")

    async def save(self, agent_id: AgentId, record: StateRecord, last: int) -> int:
        raise AssertionError("a cut-off activation must not write")


def _durable_for(cls: type[accord.Agent], store: Any, owner: bool = False) -> Durable:
    spec = spec_of(cls)
    d = Durable(spec, AgentId(spec.type_name, "k"), 7, store, None, lambda: owner)
    d.orphaned = True
    return d


def _agent(cls: type[accord.Agent]) -> Any:
    agent = cls()
    agent.replica_id = "node-a:7"
    return agent


def test_cut_off_crdt_starts_empty_under_its_own_replica_id() -> None:
    durable, agent = _durable_for(Crdt, Unreachable()), _agent(Crdt)
    asyncio.run(durable.load(agent))
    assert agent.state == Hits()
    assert agent.replica_id.startswith("node-a:7~")
    # Increments counted under the fresh id survive a merge with what the owner stored under
    # the shared id `node-a:7` before the cut (a stale or empty base under that id would not).
    agent.state.hits = agent.state.hits.increment(agent.replica_id, 2)
    stored = GCounter().increment("node-a:7", 5)
    assert merge(stored, agent.state.hits).value == 7


def test_cut_off_non_crdt_state_that_cannot_be_read_is_refused() -> None:
    durable, agent = _durable_for(Lww, Unreachable()), _agent(Lww)
    with pytest.raises(NotConnected, match="only CRDT state"):
        asyncio.run(durable.load(agent))


def test_a_load_jetstream_does_not_answer_ends_fenced_once_the_lease_is_gone() -> None:
    store = Unreachable()
    durable, agent = _durable_for(Lww, store, owner=False), _agent(Lww)
    durable.orphaned = False
    with pytest.raises(Fenced):
        asyncio.run(durable.load(agent))
    assert store.loads == 1


def test_a_load_is_retried_while_the_lease_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_durable, "RETRY_FOR", 0.5)
    store = Unreachable()
    durable, agent = _durable_for(Lww, store, owner=True), _agent(Lww)
    durable.orphaned = False
    with pytest.raises(NotConnected):
        asyncio.run(durable.load(agent))
    assert store.loads >= 3
