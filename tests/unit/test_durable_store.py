"""Agent state, event logs and dead letters above the engine seam, with no server: fencing of an
older epoch's writes, the exactly-once dedup window kept in the same write as the state, event
log conflicts, `accord dlq`'s list / show / replay / purge, engine failures seen from above the
seam, and the shard mailbox's consumer policy — all over the in-memory engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import accord
from accord import _codec as codec
from accord._agent import spec_of
from accord._clock import VirtualClock
from accord._errors import ConfigurationError, Fenced, NotConnected
from accord._ids import AgentId, shard_of
from accord.cluster._config import Names
from accord.delivery._dlq import DeadLetters, dead_letter
from accord.delivery._mailbox import (
    DurableDelivery,
    ShardMailbox,
    dlq_stream,
    ensure_streams,
    mailbox_stream,
    mailbox_subject,
)
from accord.engine._api import (
    BucketSpec,
    ConsumerSpec,
    Delivery,
    NoResponders,
    Refused,
    RequestTimeout,
)
from accord.engine.memory import MemoryEngine
from accord.state._durable import Durable
from accord.state._events import EventLog
from accord.state._store import DedupEntry, StateConflict, StateRecord, StateStore


class Total(msgspec.Struct):
    total: int = 0


class Ledger(accord.Agent, type="unit_ledger", dedup_window=3):
    state: Total


class Deposited(msgspec.Struct):
    amount: int


NAMES = Names("unit")
AGENT = AgentId("unit_ledger", "acct/1")


@pytest.fixture
async def engine() -> AsyncIterator[MemoryEngine]:
    engine = MemoryEngine(clock=VirtualClock())
    await ensure_streams(engine, NAMES, 1)
    yield engine
    await engine.close()


async def _store(engine: MemoryEngine) -> StateStore:
    return StateStore(await engine.bucket(BucketSpec(name=NAMES.bucket("state"))))


def _durable(store: StateStore, epoch: int, owner: bool = True) -> Durable:
    return Durable(spec_of(Ledger), AGENT, epoch, store, None, lambda: owner)


def _ledger(total: int = 0) -> Any:
    agent = Ledger()
    agent.state = Total(total)
    return agent


# -- fencing ----------------------------------------------------------------------------------


async def test_a_write_by_an_older_epoch_after_a_newer_one_wrote_is_fenced(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    first = await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=1), 0)
    # The next owner (epoch 2) writes over the record the old owner read.
    await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=2), first)
    with pytest.raises(Fenced, match="epoch 2"):
        await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=1, events_seq=9), first)
    record, _ = await store.load(AGENT)
    assert record is not None and record.epoch == 2 and record.events_seq == 0


async def test_a_stale_write_of_the_same_epoch_is_a_conflict_carrying_the_current_record(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    rev = await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=3), 0)
    newer = await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=3, events_seq=1), rev)
    with pytest.raises(StateConflict) as conflict:
        await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=3), rev)
    assert conflict.value.revision == newer
    assert conflict.value.current is not None and conflict.value.current.events_seq == 1
    with pytest.raises(StateConflict):  # a second create of the record conflicts too
        await store.save(AGENT, StateRecord(agent=str(AGENT), epoch=3), 0)


async def test_an_activation_of_an_older_epoch_than_the_stored_record_refuses_to_load(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    await _durable(store, 5).load(_ledger())  # claims the record for epoch 5
    with pytest.raises(Fenced, match="epoch 5 > 4"):
        await _durable(store, 4).load(_ledger())


async def test_a_superseded_owner_cannot_commit_its_turn(engine: MemoryEngine) -> None:
    store = await _store(engine)
    old, old_agent = _durable(store, 1), _ledger()
    await old.load(old_agent)
    new, new_agent = _durable(store, 2), _ledger()
    await new.load(new_agent)  # the new owner claims the record for epoch 2
    new_agent.state = Total(7)
    await new.commit(new_agent)
    old_agent.state = Total(1000)  # the old owner, resumed, finishes a stale turn
    with pytest.raises(Fenced):
        await old.commit(old_agent)
    record, _ = await store.load(AGENT)
    assert record is not None and msgspec.msgpack.decode(record.state, type=Total) == Total(7)


async def test_a_write_after_the_lease_ended_is_refused_before_reaching_the_store(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    owner = {"valid": True}
    durable = Durable(spec_of(Ledger), AGENT, 1, store, None, lambda: owner["valid"])
    agent = _ledger()
    await durable.load(agent)
    _, before = await store.load(AGENT)
    owner["valid"] = False
    agent.state = Total(5)
    with pytest.raises(Fenced, match="no longer valid"):
        await durable.commit(agent)
    assert (await store.load(AGENT))[1] == before


# -- exactly once ------------------------------------------------------------------------------


async def test_the_dedup_entry_and_applied_sequence_are_stored_in_the_same_write_as_the_state(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    durable, agent = _durable(store, 1), _ledger()
    await durable.load(agent)
    agent.state = Total(40)
    reply = msgspec.Raw(msgspec.msgpack.encode(40))
    await durable.commit(agent, DedupEntry("pay-1", True, reply), seq=17)
    # What a successor (the next owner, after a crash right after this write) reads back:
    record, _ = await store.load(AGENT)
    assert record is not None
    assert msgspec.msgpack.decode(record.state, type=Total) == Total(40)
    assert [e.id for e in record.dedup] == ["pay-1"] and record.applied_seq == 17
    successor = _durable(store, 2)
    await successor.load(_ledger())
    entry = successor.lookup("pay-1")
    assert entry is not None and entry.ok and msgspec.msgpack.decode(entry.reply) == 40
    assert successor.applied(17) and successor.applied(3)  # stream order: all below applied
    assert not successor.applied(18) and not successor.applied(0)
    assert successor.lookup("pay-2") is None


async def test_an_exactly_once_message_is_stored_even_when_the_state_did_not_change(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    durable, agent = _durable(store, 1), _ledger()
    await durable.load(agent)
    _, before = await store.load(AGENT)
    await durable.commit(agent, DedupEntry("noop-1", True), seq=4)
    record, after = await store.load(AGENT)
    assert after > before and record is not None and record.dedup[-1].id == "noop-1"


async def test_the_dedup_window_keeps_the_latest_entries(engine: MemoryEngine) -> None:
    store = await _store(engine)
    durable, agent = _durable(store, 1), _ledger()
    await durable.load(agent)
    for i in range(5):
        agent.state = Total(i + 1)
        await durable.commit(agent, DedupEntry(f"m{i}", True), seq=i + 1)
    record, _ = await store.load(AGENT)
    assert record is not None and [e.id for e in record.dedup] == ["m2", "m3", "m4"]  # window 3
    assert durable.lookup("m1") is None and durable.lookup("m4") is not None


# -- event logs --------------------------------------------------------------------------------


def _log(engine: MemoryEngine) -> EventLog:
    return EventLog(engine, f"accord_{NAMES.cluster}_es", f"{NAMES.prefix}.es")


async def test_an_append_after_another_writer_appended_is_fenced(engine: MemoryEngine) -> None:
    log = _log(engine)
    seq = await log.append(AGENT, [Deposited(1), Deposited(2)], 0)
    await log.append(AGENT, [Deposited(3)], seq)  # the next owner appends
    with pytest.raises(Fenced, match="another writer"):
        await log.append(AGENT, [Deposited(100)], seq)  # the old owner, from its stale seq
    got: list[int] = []
    last, count = await log.replay(
        AGENT, 0, {"Deposited": Deposited}, lambda ev: got.append(ev.amount)
    )
    assert got == [1, 2, 3] and count == 3 and last > seq


async def test_replay_starts_after_the_snapshot_and_skips_other_agents(
    engine: MemoryEngine,
) -> None:
    log = _log(engine)
    other = AgentId("unit_ledger", "acct/2")
    seq = await log.append(AGENT, [Deposited(1)], 0)
    await log.append(other, [Deposited(50)], 0)
    await log.append(AGENT, [Deposited(2), Deposited(3)], seq)
    got: list[int] = []
    _, count = await log.replay(
        AGENT, seq, {"Deposited": Deposited}, lambda ev: got.append(ev.amount)
    )
    assert got == [2, 3] and count == 2
    with pytest.raises(accord.StateError, match="unknown event type"):
        await log.replay(AGENT, 0, {}, lambda ev: None)


# -- dead letters ------------------------------------------------------------------------------


async def _dead(engine: MemoryEngine, n: int) -> None:
    for i in range(n):
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind="tell",
            target=f"unit_ledger/a{i}",
            type="Add",
            body=msgspec.Raw(msgspec.json.encode({"n": i})),
            id=f"msg-{i}",
            reply_to="_INBOX.gone",
        )
        await dead_letter(
            engine,
            NAMES,
            codec.encode(req, "json"),
            target=req.target,
            msg_type="Add",
            msg_id=f"msg-{i}",
            reason="RemoteError: boom\nsecond line",
            deliveries=5,
        )


async def test_dead_letters_are_listed_oldest_first_with_their_failure(
    engine: MemoryEngine,
) -> None:
    await _dead(engine, 3)
    entries = await DeadLetters(engine, NAMES, 16).list()
    assert [e.target for e in entries] == ["unit_ledger/a0", "unit_ledger/a1", "unit_ledger/a2"]
    assert {(e.type, e.deliveries, e.reason) for e in entries} == {
        ("Add", 5, "RemoteError: boom second line")
    }
    assert [e.msg_id for e in entries] == ["msg-0", "msg-1", "msg-2"]
    assert await DeadLetters(engine, NAMES, 16).list(limit=2) == entries[:2]
    shown = await DeadLetters(engine, NAMES, 16).show(entries[1].seq)
    assert shown.body == {"n": 1}


async def test_a_dead_letter_stored_twice_under_its_id_is_kept_once(engine: MemoryEngine) -> None:
    await _dead(engine, 1)
    await _dead(engine, 1)  # the node retried after an unconfirmed append
    assert len(await DeadLetters(engine, NAMES, 16).list()) == 1


async def test_replay_puts_the_message_back_in_its_shards_mailbox_under_a_new_id(
    engine: MemoryEngine,
) -> None:
    await _dead(engine, 2)
    dlq = DeadLetters(engine, NAMES, 16)
    first = (await dlq.list())[0]
    new_id = await dlq.replay(first.seq)
    assert new_id == f"msg-0:replay:{first.seq}"
    assert [e.msg_id for e in await dlq.list()] == ["msg-1"]
    subject = mailbox_subject(NAMES, shard_of(AgentId.parse("unit_ledger/a0"), 16))
    stored = await engine.get_message(mailbox_stream(NAMES), subject=subject)
    assert stored is not None
    req, _ = codec.decode_request(stored.data)
    assert (req.id, req.target, req.reply_to) == (new_id, "unit_ledger/a0", None)
    with pytest.raises(ConfigurationError, match=f"no dead letter with sequence {first.seq}"):
        await dlq.replay(first.seq)


async def test_purge_removes_one_or_all_and_says_how_many(engine: MemoryEngine) -> None:
    await _dead(engine, 3)
    dlq = DeadLetters(engine, NAMES, 16)
    entries = await dlq.list()
    assert await dlq.purge(entries[0].seq) == 1
    with pytest.raises(ConfigurationError, match=f"no dead letter with sequence {entries[0].seq}"):
        await dlq.purge(entries[0].seq)
    with pytest.raises(ConfigurationError, match="no dead letter with sequence 999"):
        await dlq.show(999)
    assert await dlq.purge() == 2
    assert await dlq.list() == []
    assert await engine.stream_state(dlq_stream(NAMES)) is not None  # the stream stays


# -- engine failures ---------------------------------------------------------------------------


async def test_a_state_write_the_engine_did_not_answer_is_retried_while_the_lease_holds(
    engine: MemoryEngine,
) -> None:
    store = await _store(engine)
    durable, agent = _durable(store, 1), _ledger()
    await durable.load(agent)
    engine.fail_next("kv.update", NotConnected("lost in a leader election"), times=2)
    agent.state = Total(3)
    await durable.commit(agent)
    record, _ = await store.load(AGENT)
    assert record is not None and msgspec.msgpack.decode(record.state, type=Total) == Total(3)


@pytest.mark.parametrize(
    "signal", [RequestTimeout("no ack"), NoResponders("no stream"), Refused("stream offline")]
)
async def test_what_the_engine_signals_on_an_append_surfaces_as_not_connected(
    engine: MemoryEngine, signal: Exception
) -> None:
    log = _log(engine)
    engine.fail_next("append", signal)
    with pytest.raises(NotConnected, match="cannot append events of unit_ledger/acct/1"):
        await log.append(AGENT, [Deposited(1)], 0)
    engine.fail_next("append", signal)
    with pytest.raises(NotConnected, match="cannot store the dead letter of msg-0"):
        await _dead(engine, 1)


async def test_an_unreachable_engine_is_not_connected_from_every_dead_letter_command(
    engine: MemoryEngine,
) -> None:
    await _dead(engine, 1)
    dlq = DeadLetters(engine, NAMES, 16)
    seq = (await dlq.list())[0].seq
    engine.down()
    for call in (dlq.list(), dlq.show(seq), dlq.replay(seq), dlq.purge(seq), dlq.purge()):
        with pytest.raises(NotConnected):
            await call
    engine.up()
    assert [e.seq for e in await dlq.list()] == [seq]  # nothing was lost or half-replayed


async def test_a_replay_the_mailbox_refused_keeps_the_dead_letter(engine: MemoryEngine) -> None:
    await _dead(engine, 1)
    dlq = DeadLetters(engine, NAMES, 16)
    seq = (await dlq.list())[0].seq
    engine.fail_next("append", Refused("mailbox stream offline"))
    with pytest.raises(NotConnected, match=f"replay of dead letter {seq} failed"):
        await dlq.replay(seq)
    assert [e.seq for e in await dlq.list()] == [seq]


# -- the shard mailbox's consumer policy -------------------------------------------------------


async def test_a_new_owner_replaces_every_older_consumer_and_gets_the_unacked_in_order(
    engine: MemoryEngine,
) -> None:
    clock = engine.server.clock
    assert isinstance(clock, VirtualClock)
    stream = mailbox_stream(NAMES)
    for epoch in (1, 2):  # two earlier owners whose consumers outlived them
        spec = ConsumerSpec(name=f"shard-5-e{epoch}", filter_subject=mailbox_subject(NAMES, 5))
        with contextlib.suppress(Refused):  # a work queue takes one consumer per subject
            await engine.ensure_consumer(stream, spec)
    for i in range(3):
        await engine.append(mailbox_subject(NAMES, 5), b"m%d" % i, msg_id=f"m{i}")
    got: list[tuple[int, int, bytes, int]] = []

    def dispatch(shard: int, epoch: int, delivery: Delivery) -> bool:
        dd = DurableDelivery(delivery, f"js:{delivery.seq}", "at_least_once")
        got.append((shard, epoch, delivery.data, dd.attempts))
        return True

    mailbox = ShardMailbox(engine, NAMES, 5, 3, dispatch, _ready, lambda: True)
    await mailbox.start(previous_epoch=2)  # epoch 1's consumer is found and replaced too
    try:
        for _ in range(40):
            if len(got) == 3:
                break
            await clock.advance(0.05)
        assert got == [(5, 3, b"m0", 0), (5, 3, b"m1", 0), (5, 3, b"m2", 0)]
        assert set(await engine.consumers(stream)) == {"shard-5-e3"}
    finally:
        await mailbox.stop()


async def _ready() -> None:
    return None
