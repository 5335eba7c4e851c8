"""The in-process ask (`LocalRoute.ask`, runtime/_local.py) above the engine seam: it answers
exactly once (reply, or `DeliveryTimeout` from its deadline slot, never both), keeps one turn at
a time per agent, and declines (None: the general route or the network decides) whatever it
cannot take in one step — an agent whose epoch here is not its activation's (moved, placed
elsewhere), a durable type, an unknown message, a full bulkhead, a stopped node."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import accord
from accord._errors import DeliveryTimeout
from accord._ids import AgentId
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._local import LocalRoute
from accord.runtime._settings import NodeSettings
from accord.runtime._table import ActivationTable
from accord.state._store import StateStore

from .test_activation import Host, store  # noqa: F401  (store: a fixture)


class Hold(msgspec.Struct):
    pass


class Echo(msgspec.Struct):
    n: int


class Other(msgspec.Struct):
    pass


class Gate(accord.Agent, type="local-gate"):
    release: asyncio.Event | None = None
    running = 0

    @accord.handler
    async def hold(self, msg: Hold) -> str:
        assert Gate.release is not None
        await Gate.release.wait()
        return "released"

    @accord.handler
    async def echo(self, msg: Echo) -> int:
        Gate.running += 1
        assert Gate.running == 1, "two turns of one agent ran at once"
        await asyncio.sleep(0)
        Gate.running -= 1
        return msg.n


class Kept(accord.Agent, type="local-kept", delivery="exactly_once"):
    @accord.handler
    async def echo(self, msg: Echo) -> int:
        return msg.n


GATE = AgentId("local-gate", "g")
KEPT = AgentId("local-kept", "k")


def _route(host: Host, epoch: dict[AgentId, int | None]) -> tuple[LocalRoute, ActivationTable]:
    host.bulkhead = Bulkhead(NodeSettings(max_inflight_per_type=4), host.stats, "n1")
    table = ActivationTable(host, host.stats)
    specs = {"local-gate": Gate.__accord_spec__, "local-kept": Kept.__accord_spec__}
    route = LocalRoute(specs, table, host.bulkhead, host.loop)
    route.attach_placement(lambda agent_id, shard: epoch.get(agent_id, 1))
    route.open = True
    return route, table


async def _activate(route: LocalRoute, agent_id: AgentId, msg: Any) -> Any:
    """The first ask of an agent takes the general route (it creates the activation)."""
    fut = route.route(agent_id, 0, msg, asyncio.get_running_loop().time() + 5, ask=True)
    assert fut is not None
    return await fut


async def test_an_ask_past_its_deadline_gets_one_timeout_and_the_late_reply_is_dropped(
    store: StateStore,  # noqa: F811
) -> None:
    route, _ = _route(Host(store), {})
    Gate.release = asyncio.Event()
    assert await _activate(route, GATE, Echo(1)) == 1
    loop = asyncio.get_running_loop()
    fut = route.ask(GATE, 0, Hold(), loop.time() + 0.05)
    assert fut is not None
    with pytest.raises(DeliveryTimeout) as err:
        await asyncio.wait_for(fut, 5)
    assert err.value.maybe_delivered
    assert route._deadlines.pending() == 0
    Gate.release.set()  # the turn ends and replies: the timed-out future keeps its outcome
    assert await _activate(route, GATE, Echo(2)) == 2
    assert isinstance(fut.exception(), DeliveryTimeout)


async def test_answered_asks_leave_their_deadline_slots_and_run_one_at_a_time(
    store: StateStore,  # noqa: F811
) -> None:
    route, _ = _route(Host(store), {})
    await _activate(route, GATE, Echo(0))
    deadline = asyncio.get_running_loop().time() + 5
    futs = [route.ask(GATE, 0, Echo(i), deadline) for i in range(3)]  # within the bulkhead (4)
    assert all(f is not None for f in futs)
    assert await asyncio.gather(*(f for f in futs if f is not None)) == [0, 1, 2]
    assert route._deadlines.pending() == 0


async def test_the_one_step_ask_declines_what_it_cannot_take_at_once(
    store: StateStore,  # noqa: F811
) -> None:
    epoch: dict[AgentId, int | None] = {}
    route, table = _route(Host(store), epoch)
    deadline = asyncio.get_running_loop().time() + 5
    assert route.ask(GATE, 0, Echo(1), deadline) is None  # no activation yet
    await _activate(route, GATE, Echo(1))
    assert route.ask(GATE, 0, Other(), deadline) is None  # no handler: `route` answers it
    assert route.ask(KEPT, 0, Echo(1), deadline) is None  # a durable mode: the mailbox
    epoch[GATE] = 2  # served here under a newer epoch now (moved and back, a new lease)
    assert route.ask(GATE, 0, Echo(1), deadline) is None
    epoch[GATE] = None  # placed on another node: the network
    assert route.ask(GATE, 0, Echo(1), deadline) is None
    assert route.route(GATE, 0, Echo(1), deadline, ask=True) is None
    epoch.pop(GATE)
    route.open = False  # stopping
    assert route.ask(GATE, 0, Echo(1), deadline) is None
    route.open = True
    table.live[GATE].load.n = 4  # the type's bulkhead is full
    assert route.ask(GATE, 0, Echo(1), deadline) is None
    table.live[GATE].load.n = 0
    fut = route.ask(GATE, 0, Echo(7), deadline)
    assert fut is not None and await fut == 7
