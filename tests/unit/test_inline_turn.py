"""The inline turn (runtime/_inline.py): an in-process ask to an idle activation runs the callee's
turn in the caller's task up to its first suspension, then in a task of its own. Checked here:
a turn that finishes at once answers before the caller awaits; one turn at a time and arrival
order with other senders queued behind an inline turn; a cancelled or timed-out caller does not
cancel the callee's turn; handler errors, the deadline and the sender name are those of a queued
turn; `asyncio.timeout` in the turn binds to the turn; a lost lease stops it; close waits for
it; a cycle times out as before; a long chain of inline asks is capped; asks in a tight loop
still let the event loop run."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import accord
from accord._context import current_deadline, current_sender
from accord._errors import DeliveryTimeout, RemoteError
from accord._ids import AgentId
from accord.runtime import _inline
from accord.runtime._local import LocalRoute
from accord.runtime._table import ActivationTable
from accord.state._store import StateStore
from accord.testing import eventually_async

from .test_activation import Host, store  # noqa: F401  (store: a fixture)


class Step(msgspec.Struct):
    n: int


class Wait(msgspec.Struct):
    n: int


class Fail(msgspec.Struct):
    pass


class Probe(msgspec.Struct):
    pass


class Bounded(msgspec.Struct):
    pass


class Forward(msgspec.Struct):
    to: str
    hops: int = 0


class Seen:
    order: list[int] = []
    running = 0
    gate: asyncio.Event | None = None
    finished: list[int] = []
    route: LocalRoute | None = None
    probe: tuple[Any, ...] = ()


class Callee(accord.Agent, type="inline-callee"):
    @accord.handler
    async def step(self, msg: Step) -> int:
        Seen.running += 1
        assert Seen.running == 1, "two turns of one agent ran at once"
        Seen.order.append(msg.n)
        Seen.running -= 1
        return msg.n

    @accord.handler
    async def wait(self, msg: Wait) -> int:
        Seen.running += 1
        assert Seen.running == 1, "two turns of one agent ran at once"
        Seen.order.append(msg.n)
        assert Seen.gate is not None
        await Seen.gate.wait()
        Seen.running -= 1
        Seen.finished.append(msg.n)
        return msg.n

    @accord.handler
    async def fail(self, msg: Fail) -> None:
        raise ValueError("bad input")

    @accord.handler
    async def probe(self, msg: Probe) -> str:
        Seen.probe = (current_deadline.get(), current_sender.get(), asyncio.current_task())
        return "ok"

    @accord.handler
    async def bounded(self, msg: Bounded) -> str:
        assert Seen.gate is not None
        try:
            async with asyncio.timeout(0.05):  # bound to the turn's task, not the caller's
                await Seen.gate.wait()
        except TimeoutError:
            return "timed out"
        return "released"

    @accord.handler
    async def forward(self, msg: Forward) -> int:
        """Ask `msg.to` (through the route, as `Mesh.ask` would): a chain or a cycle."""
        assert Seen.route is not None
        if not msg.to:
            return msg.hops
        rest = msg.to.split(",")
        target = AgentId("inline-callee", rest[0])
        fut = Seen.route.ask(target, 0, Forward(",".join(rest[1:]), msg.hops + 1),
                             current_deadline.get() or 0.0)  # fmt: skip
        assert fut is not None
        return int(await fut)


A = AgentId("inline-callee", "a")


@pytest.fixture(autouse=True)
def _reset() -> None:
    Seen.order, Seen.finished, Seen.running, Seen.gate = [], [], 0, asyncio.Event()
    _inline._streak = 0  # each test starts a fresh streak (every MAX_STREAK-th ask is queued)


async def _setup(store: StateStore, *names: str) -> tuple[LocalRoute, ActivationTable]:  # noqa: F811
    host = Host(store)
    table = ActivationTable(host, host.stats)
    route = LocalRoute({"inline-callee": Callee.__accord_spec__}, table, host.bulkhead, host.loop)
    route.attach_placement(lambda agent_id, shard: 1)
    route.open = True
    Seen.route = route
    for name in names or ("a",):  # the first ask creates the activation (the general route)
        agent = AgentId("inline-callee", name)
        fut = route.route(agent, 0, Step(-1), host.loop.time() + 5, ask=True)
        assert fut is not None and await fut == -1
        act = table.live[agent]
        await eventually_async(lambda act=act: _inline.idle(act), timeout=5)  # type: ignore[misc]
    Seen.order = []
    return route, table


def _ask(route: LocalRoute, msg: Any, timeout: float = 5.0, agent: AgentId = A) -> Any:
    fut = route.ask(agent, 0, msg, asyncio.get_running_loop().time() + timeout)
    assert fut is not None
    return fut


async def test_a_turn_that_finishes_at_once_answers_before_the_caller_awaits(
    store: StateStore,  # noqa: F811
) -> None:
    route, table = await _setup(store)
    fut = _ask(route, Step(1))
    assert fut.done() and fut.result() == 1  # no task switch: run in this task
    assert route._deadlines.pending() == 0
    assert not table.live[A].busy and table.live[A].host.stats.turns >= 2


async def test_senders_queue_behind_an_inline_turn_in_arrival_order(
    store: StateStore,  # noqa: F811
) -> None:
    route, table = await _setup(store)
    act = table.live[A]
    first = _ask(route, Wait(1))  # inline, suspends: the activation is busy
    assert act.busy and not first.done() and act.inline_task is not None
    later = [_ask(route, Step(n)) for n in (2, 3)]
    assert route.tell(A, 0, Step(4))
    for _ in range(5):  # the turn task is woken by the puts, but must not run them yet
        await asyncio.sleep(0)
    assert Seen.order == [1] and not any(f.done() for f in later)
    assert Seen.gate is not None
    Seen.gate.set()
    assert await asyncio.gather(first, *later) == [1, 2, 3]
    await eventually_async(lambda: Seen.order == [1, 2, 3, 4], timeout=5)
    await eventually_async(lambda: _inline.idle(act), timeout=5)
    assert _ask(route, Step(5)).result() == 5  # idle again: inline again


async def test_a_cancelled_or_timed_out_caller_does_not_cancel_the_callee_turn(
    store: StateStore,  # noqa: F811
) -> None:
    route, table = await _setup(store)

    async def caller(msg: Any, timeout: float) -> Any:
        return await _ask(route, msg, timeout)

    cancelled = asyncio.create_task(caller(Wait(1), 5))
    await eventually_async(lambda: Seen.order == [1], timeout=5)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(DeliveryTimeout):  # queued behind the first: its caller's deadline passes
        await caller(Wait(2), 0.05)
    assert Seen.finished == [] and table.live[A].busy
    assert Seen.gate is not None
    Seen.gate.set()  # the first turn runs to its end; the second was dropped (expired) or ran
    await eventually_async(lambda: Seen.finished[:1] == [1], timeout=5)
    await eventually_async(lambda: _inline.idle(table.live[A]), timeout=5)


async def test_handler_errors_deadline_and_sender_are_those_of_a_queued_turn(
    store: StateStore,  # noqa: F811
) -> None:
    route, _ = await _setup(store)
    fut = _ask(route, Fail())
    with pytest.raises(RemoteError) as err:
        await fut
    assert err.value.remote_type == "ValueError" and "bad input" in str(err.value)
    deadline = asyncio.get_running_loop().time() + 3
    fut = route.ask(A, 0, Probe(), deadline)
    assert fut is not None and await fut == "ok"
    seen_deadline, sender, task = Seen.probe
    assert seen_deadline == deadline and sender == str(A)
    assert task is not asyncio.current_task()  # the turn's own task, not the caller's
    assert current_sender.get() is None and current_deadline.get() is None  # caller untouched


async def test_a_timeout_in_the_turn_binds_to_the_turn_not_the_caller(
    store: StateStore,  # noqa: F811
) -> None:
    route, _ = await _setup(store)
    assert await _ask(route, Bounded()) == "timed out"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_lost_lease_stops_an_inline_turn_and_close_waits_for_one(
    store: StateStore,  # noqa: F811
) -> None:
    route, table = await _setup(store, "a", "b")
    act = table.live[A]
    fut = _ask(route, Wait(1), timeout=0.2)
    turn = act.inline_task
    assert turn is not None
    act.task.cancel()  # the lease is lost: the activation's turn stops, unanswered
    await asyncio.wait_for(asyncio.gather(act.task, return_exceptions=True), 5)
    assert turn.cancelled() and Seen.finished == []
    Seen.running = 0  # the cancelled turn never left
    with pytest.raises(DeliveryTimeout):
        await fut
    b = table.live[AgentId("inline-callee", "b")]
    fut = _ask(route, Wait(2), agent=b.id)
    b.close()  # idle timeout or handoff: deactivates only once the inline turn is done
    for _ in range(5):
        await asyncio.sleep(0)
    assert not b.task.done()
    assert Seen.gate is not None
    Seen.gate.set()
    assert await fut == 2
    await asyncio.wait_for(b.task, 5)


async def test_a_cycle_times_out_as_queued_and_a_long_chain_is_capped(
    store: StateStore,  # noqa: F811
) -> None:
    names = [f"c{i}" for i in range(3 * _inline.MAX_DEPTH)]
    route, _ = await _setup(store, "a", "b", *names)
    with pytest.raises(DeliveryTimeout):  # a -> b -> a: a is busy, so b's ask waits for a
        await _ask(route, Forward("b,a"), timeout=0.1)
    await eventually_async(lambda: route._deadlines.pending() == 0, timeout=5)
    assert await _ask(route, Forward(",".join(names))) == len(names)


async def test_inline_asks_in_a_tight_loop_still_let_the_event_loop_run(
    store: StateStore,  # noqa: F811
) -> None:
    route, _ = await _setup(store)
    ran: list[int] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(ran.append, 1)  # a callback waiting for the loop (a lease renewal, say)
    n = 0
    while not ran:
        assert n < 4 * _inline.MAX_STREAK, "the loop never ran between inline asks"
        assert await _ask(route, Step(n)) == n
        n += 1
    assert n > 1  # most of them ran inline, without a task switch
