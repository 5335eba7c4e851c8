"""Loading an event-sourced agent's state over the in-memory engine: a brand-new agent reads no
event log (no record means no events), a type that creates its record first (workflow runs) is
claimed in that one request, and either way an older epoch is still fenced; writes handed to the
commit (`with_commit`) go with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import msgspec
import pytest

import accord
from accord._agent import spec_of
from accord._clock import VirtualClock
from accord._errors import Fenced, NotConnected
from accord._ids import AgentId
from accord.cluster._config import Names
from accord.delivery._mailbox import ensure_streams
from accord.engine._api import BucketSpec
from accord.engine.memory import MemoryEngine
from accord.state._commit import with_commit
from accord.state._durable import Durable
from accord.state._events import EventLog
from accord.state._store import StateStore


class Balance(msgspec.Struct):
    total: int = 0


class Deposited(msgspec.Struct):
    amount: int


class Account(accord.Agent, type="unit_es_account", consistency="event_sourced",
              events=(Deposited,)):  # fmt: skip
    state: Balance

    def apply(self, event: Any) -> None:
        self.state.total += event.amount


class Run(Account, type="unit_es_run"):
    __accord_create_first__: ClassVar[bool] = True


NAMES = Names("unit")


class CountingLog(EventLog):
    """The cluster's event log, counting its replays (reads)."""

    reads = 0

    async def replay(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        self.reads += 1
        return await super().replay(*args, **kwargs)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[StateStore, CountingLog]]:
    engine = MemoryEngine(clock=VirtualClock())
    await ensure_streams(engine, NAMES, 1)
    store = StateStore(await engine.bucket(BucketSpec(name=NAMES.bucket("state"))))
    yield store, CountingLog(engine, f"accord_{NAMES.cluster}_es", f"{NAMES.prefix}.es")
    await engine.close()


async def _activate(cls: type, key: str, epoch: int, parts: tuple[StateStore, CountingLog],
                    owner: bool = True) -> tuple[Durable, Any]:  # fmt: skip
    store, log = parts
    durable = Durable(spec_of(cls), AgentId(spec_of(cls).type_name, key), epoch, store, log,
                      lambda: owner)  # fmt: skip
    agent = cls()
    await durable.load(agent)
    return durable, agent


async def _deposit(durable: Durable, agent: Any, amount: int) -> None:
    agent.emit(Deposited(amount))
    await durable.commit(agent)


@pytest.mark.parametrize("cls", [Account, Run])
async def test_a_brand_new_agent_reads_no_event_log_and_is_claimed_for_its_epoch(
    cls: type, parts: tuple[StateStore, CountingLog]
) -> None:
    durable, agent = await _activate(cls, "new", 3, parts)
    assert parts[1].reads == 0 and agent.state == Balance(0)
    record, _ = await parts[0].load(durable.id)
    assert record is not None and record.epoch == 3  # claimed before any append
    await _deposit(durable, agent, 5)
    _, agent2 = await _activate(cls, "new", 4, parts)  # the record exists: the log is read
    assert parts[1].reads == 1 and agent2.state == Balance(5)


@pytest.mark.parametrize("cls", [Account, Run])
async def test_an_older_activation_of_a_brand_new_agent_is_fenced_by_the_newer_one(
    cls: type, parts: tuple[StateStore, CountingLog]
) -> None:
    old, old_agent = await _activate(cls, "raced", 1, parts)
    new, new_agent = await _activate(cls, "raced", 2, parts)  # takes over the claimed record
    await _deposit(new, new_agent, 7)
    with pytest.raises(Fenced):  # its append expects the log it read: empty
        await _deposit(old, old_agent, 100)
    with pytest.raises(Fenced, match="epoch 2"):  # and it cannot activate again
        await _activate(cls, "raced", 1, parts)
    _, agent = await _activate(cls, "raced", 3, parts)
    assert agent.state == Balance(7)


async def test_creating_first_finds_a_newer_epochs_record_and_refuses(
    parts: tuple[StateStore, CountingLog],
) -> None:
    await _activate(Run, "taken", 5, parts)
    with pytest.raises(Fenced, match="epoch 5"):
        await _activate(Run, "taken", 4, parts)
    with pytest.raises(Fenced, match="no longer valid"):  # a lease already lost: no request
        await _activate(Run, "other", 6, parts, owner=False)


async def test_a_write_handed_to_the_commit_runs_with_it_and_its_failure_fails_the_commit(
    parts: tuple[StateStore, CountingLog],
) -> None:
    durable, agent = await _activate(Run, "w", 1, parts)
    wrote: list[int] = []

    async def write() -> None:
        wrote.append(agent.state.total)

    with_commit(agent, write)
    await _deposit(durable, agent, 2)
    assert wrote == [2]
    await _deposit(durable, agent, 1)  # handed to one commit only
    assert wrote == [2]

    async def fails() -> None:
        raise NotConnected("index not stored")

    with_commit(agent, fails)
    with pytest.raises(NotConnected, match="index not stored"):
        await _deposit(durable, agent, 1)
    with_commit(agent, write)
    durable.rollback(agent)  # a failed turn: its writes are dropped unrun
    await _deposit(durable, agent, 1)
    assert wrote == [2]
