"""An activation's turns, above the engine seam: one turn at a time in arrival order, and an
exactly-once message redelivered after a crash is answered from the record, never applied twice.

The host is a small stand-in for the node; state lives in a real `StateStore` over the in-memory
engine, so what a second activation loads is what the first one committed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import msgspec
import pytest

import accord
from accord._errors import AccordError
from accord._ids import AgentId
from accord._observe import Observers
from accord._spec import AgentSpec
from accord.cluster._hlc import HybridClock
from accord.delivery._mailbox import DurableDelivery
from accord.engine._api import BucketSpec
from accord.engine.memory import MemoryEngine
from accord.runtime._activation import Activation
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._settings import NodeSettings, Stats
from accord.runtime._work import Work, _Recorded
from accord.state._durable import Durable
from accord.state._store import MergeState, StateStore


class Add(msgspec.Struct):
    n: int


class Tally(msgspec.Struct):
    total: int = 0
    seen: list[int] = []


class Counter(accord.Agent, type="act-counter", delivery="exactly_once"):
    state: Tally

    running = 0  # turns in flight, across instances (checks one turn at a time)
    applied: list[int] = []

    @accord.handler
    async def add(self, msg: Add) -> int:
        Counter.running += 1
        assert Counter.running == 1, "two turns of one agent ran at once"
        await asyncio.sleep(0)  # yield inside the turn: another turn must still wait
        Counter.applied.append(msg.n)
        self.state.total += msg.n
        self.state.seen.append(msg.n)
        Counter.running -= 1
        return self.state.total


class Host:
    """The `Host` protocol, minimal: every shard epoch valid, state in `store`."""

    def __init__(self, store: StateStore) -> None:
        self.loop = asyncio.get_running_loop()
        self.name = "n1"
        self.stats = Stats()
        self.bulkhead = Bulkhead(NodeSettings(), self.stats, "n1")
        self.deactivate_timeout = 1.0
        self.observe = Observers()
        self.after_turn: dict[type, Any] = {}
        self.mesh: Any = None
        self.ended_acts: list[Any] = []
        self._store = store
        self._hlc = HybridClock()

    def valid(self, shard: int, epoch: int) -> bool:
        return True

    def orphan_epoch(self, shard: int) -> int | None:
        return None

    def durable_for(self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int) -> Durable:
        return Durable(spec, agent_id, epoch, self._store, None, lambda: True, self._hlc)

    def ended(self, act: Any) -> None:
        self.ended_acts.append(act)

    def abandon(self, act: Any, stuck: asyncio.Task[Any] | None, restart: bool) -> None:
        self.ended_acts.append(act)

    def dead_letter(self, data: bytes, dd: DurableDelivery, error: AccordError) -> Awaitable[None]:
        raise AssertionError(f"nothing should be dead-lettered here: {error}")

    def merged(self, agent_id: AgentId, incoming: MergeState, outcome: str) -> None:
        raise AssertionError("no merges here")


class Delivered:
    """A mailbox delivery (the engine's `Delivery`): counts acks."""

    def __init__(self, seq: int, num_delivered: int = 1) -> None:
        self.data = b""
        self.subject = "mbox"
        self.headers: dict[str, str] | None = None
        self.seq = seq
        self.num_delivered = num_delivered
        self.acks = 0

    async def ack(self) -> None:
        self.acks += 1

    async def nak(self, delay: float = 0.0) -> None:
        raise AssertionError("nak")

    async def in_progress(self) -> None:
        pass


@pytest.fixture
async def store() -> StateStore:
    engine = MemoryEngine()
    return StateStore(await engine.bucket(BucketSpec(name="act_state")))


@pytest.fixture(autouse=True)
def _reset() -> None:
    Counter.running = 0
    Counter.applied = []


def _replier(fut: asyncio.Future[Any]) -> Any:
    def reply(result: Any, error: BaseException | None) -> None:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    return reply


AGENT = AgentId("act-counter", "a")
SPEC = Counter.__accord_spec__
HANDLER = SPEC.by_class[Add]


async def _close(act: Activation) -> None:
    act.close()
    await asyncio.wait_for(act.task, 5)


async def test_turns_run_one_at_a_time_in_arrival_order(store: StateStore) -> None:
    host = Host(store)
    act = Activation(host, AGENT, SPEC, 0, 7, None)  # type: ignore[arg-type]
    futures = []
    for n in range(1, 21):
        fut: asyncio.Future[Any] = host.loop.create_future()
        act.put(Work(HANDLER, Add(n), None, _replier(fut)))
        futures.append(fut)
    replies = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert Counter.applied == list(range(1, 21))  # arrival order
    assert replies == [n * (n + 1) // 2 for n in range(1, 21)]  # each saw all before it
    await _close(act)
    assert host.bulkhead.total.n == 0 and host.stats.turns == 20


async def test_an_exactly_once_redelivery_is_answered_from_the_record(store: StateStore) -> None:
    host = Host(store)
    first = Activation(host, AGENT, SPEC, 0, 7, None)  # type: ignore[arg-type]
    fut: asyncio.Future[Any] = host.loop.create_future()
    d1 = Delivered(seq=41)
    first.put(Work(HANDLER, Add(5), None, _replier(fut),
                   delivery=DurableDelivery(d1, "msg-1", "exactly_once")))  # fmt: skip
    assert await asyncio.wait_for(fut, 5) == 5
    assert d1.acks == 1
    await _close(first)

    # The node died after the turn committed but before the ack reached the server: the next
    # owner's activation loads the state and gets the same message again.
    again = Activation(host, AGENT, SPEC, 0, 8, None)  # type: ignore[arg-type]
    fut2: asyncio.Future[Any] = host.loop.create_future()
    d2 = Delivered(seq=41, num_delivered=2)
    again.put(Work(HANDLER, Add(5), None, _replier(fut2),
                   delivery=DurableDelivery(d2, "msg-1", "exactly_once")))  # fmt: skip
    recorded = await asyncio.wait_for(fut2, 5)  # the recorded reply (encoded), not a new one
    assert isinstance(recorded, _Recorded) and msgspec.msgpack.decode(recorded.data) == 5
    assert Counter.applied == [5]  # applied once
    assert d2.acks == 1 and host.stats.deduplicated == 1

    # A new message is applied on top of the loaded state.
    fut3: asyncio.Future[Any] = host.loop.create_future()
    d3 = Delivered(seq=42)
    again.put(Work(HANDLER, Add(2), None, _replier(fut3),
                   delivery=DurableDelivery(d3, "msg-2", "exactly_once")))  # fmt: skip
    assert await asyncio.wait_for(fut3, 5) == 7
    await _close(again)
    record, _ = await store.load(AGENT)
    assert record is not None and record.applied_seq == 42
    assert msgspec.msgpack.decode(record.state, type=Tally) == Tally(7, [5, 2])


class Slow(accord.Agent, type="act-slow"):
    gate: asyncio.Event | None = None

    @accord.handler
    async def add(self, msg: Add) -> int:
        assert Slow.gate is not None
        await Slow.gate.wait()
        return msg.n


async def test_asks_queued_when_the_lease_is_lost_learn_they_did_not_run(
    store: StateStore,
) -> None:
    """The lease is lost (the activation's task is cancelled) with one turn under way and
    three asks queued behind it: the queued ones are told `NotRun` at once (a remote one is
    then bounced, and its sender asks the shard's next owner); the one under way is not
    answered (it may have had effects: its sender's timeout says "maybe")."""
    from accord.runtime._work import NotRun

    Slow.gate = asyncio.Event()
    host = Host(store)
    spec = Slow.__accord_spec__
    act = Activation(host, AgentId("act-slow", "s"), spec, 0, 7, None)  # type: ignore[arg-type]
    futures = []
    for n in range(4):
        fut: asyncio.Future[Any] = host.loop.create_future()
        act.put(Work(spec.by_class[Add], Add(n), None, _replier(fut)))
        futures.append(fut)
    while not act.busy:  # the first turn is under way
        await asyncio.sleep(0)
    act.task.cancel()
    await asyncio.wait_for(asyncio.gather(act.task, return_exceptions=True), 5)
    for fut in futures[1:]:
        assert isinstance(fut.exception(), NotRun)
        assert not fut.exception().maybe_delivered  # type: ignore[union-attr]
    assert not futures[0].done()
    futures[0].cancel()
