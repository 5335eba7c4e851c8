"""The runtime end to end on a real nats-server: one in-process Node, and a separate Mesh client.

Every test gets a cluster of its own (a unique name on the module's server). Agents record what
they observe in module-level dicts keyed by agent id, cleared before each test; tests poll those
records with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import accord
from accord import Agent, handler
from accord._context import current_deadline
from accord._ids import shard_of
from accord.testing import eventually_async as eventually

# -- records shared between agents and tests ------------------------------------------------

EVENTS: defaultdict[str, list[Any]] = defaultdict(list)
ACTIVE: defaultdict[str, int] = defaultdict(int)
MAX_ACTIVE: defaultdict[str, int] = defaultdict(int)
GATES: dict[str, asyncio.Event] = {}
ARRIVED: defaultdict[str, int] = defaultdict(int)
_serials = itertools.count(1)


@pytest.fixture(autouse=True)
def _clear_records() -> None:
    for record in (EVENTS, ACTIVE, MAX_ACTIVE, GATES, ARRIVED):
        record.clear()


def now() -> float:
    return asyncio.get_running_loop().time()


# -- messages -------------------------------------------------------------------------------


class Inc(msgspec.Struct):
    by: int = 1


class Count(msgspec.Struct):
    value: int
    instance: int


class Fail(msgspec.Struct):
    text: str


class Unhandled(msgspec.Struct):
    pass


class Relay(msgspec.Struct):
    target: str
    seconds: float
    inner_timeout: float


class Sleep(msgspec.Struct):
    seconds: float


class Append(msgspec.Struct):
    i: int


class Items(msgspec.Struct):
    pass


class Probe(msgspec.Struct):
    pass


class Meet(msgspec.Struct):
    group: str
    parties: int


class Block(msgspec.Struct):
    gate: str


class OrderPlaced(msgspec.Struct):
    order_id: str


# -- agents ---------------------------------------------------------------------------------


class RtCounter(Agent, type="rt-counter"):
    def __init__(self) -> None:
        self.value = 0
        self.instance = next(_serials)

    @handler
    async def inc(self, msg: Inc) -> Count:
        self.value += msg.by
        return Count(self.value, self.instance)

    @handler
    async def fail(self, msg: Fail) -> None:
        raise ValueError(msg.text)


class RtRelay(Agent, type="rt-relay"):
    """Asks another agent on behalf of its caller; records how its nested ask ended."""

    @handler
    async def relay(self, msg: Relay) -> str:
        EVENTS[str(self.id)].append(("deadline", current_deadline.get()))
        try:
            reply: str = await self.mesh.ask(
                msg.target, Sleep(msg.seconds), timeout=msg.inner_timeout
            )
        except BaseException as exc:
            EVENTS[str(self.id)].append(("inner-ended", type(exc), now()))
            raise
        return reply


class RtSleeper(Agent, type="rt-sleeper"):
    @handler
    async def sleep(self, msg: Sleep) -> str:
        deadline = current_deadline.get()
        remaining = None if deadline is None else deadline - now()
        EVENTS[str(self.id)].append(("saw", deadline, remaining))
        await asyncio.sleep(msg.seconds)  # the behaviour under test: a slow handler
        return "woke"


class RtLog(Agent, type="rt-log"):
    def __init__(self) -> None:
        self.items: list[int] = []

    @handler
    async def append(self, msg: Append) -> None:
        self.items.append(msg.i)

    @handler
    async def get(self, msg: Items) -> list[int]:
        return list(self.items)


class RtSerial(Agent, type="rt-serial"):
    @handler
    async def probe(self, msg: Probe) -> int:
        key = str(self.id)
        ACTIVE[key] += 1
        MAX_ACTIVE[key] = max(MAX_ACTIVE[key], ACTIVE[key])
        for _ in range(3):
            await asyncio.sleep(0)  # yield: a concurrent turn would run now
        ACTIVE[key] -= 1
        return MAX_ACTIVE[key]


class RtMeet(Agent, type="rt-meet"):
    """Returns only once `parties` agents are inside this handler at the same time."""

    @handler
    async def meet(self, msg: Meet) -> bool:
        ARRIVED[msg.group] += 1
        gate = GATES.setdefault(msg.group, asyncio.Event())
        if ARRIVED[msg.group] >= msg.parties:
            gate.set()
        await asyncio.wait_for(gate.wait(), 5.0)
        return True


class RtBlocker(Agent, type="rt-blocker"):
    def __init__(self) -> None:
        self.turns = 0

    @handler
    async def block(self, msg: Block) -> int:
        self.turns += 1
        EVENTS[str(self.id)].append(("started", msg.gate))
        await GATES[msg.gate].wait()
        EVENTS[str(self.id)].append(("finished", msg.gate))
        return self.turns


class RtIdle(Agent, type="rt-idle", idle_timeout=0.3):
    def __init__(self) -> None:
        self.value = 0
        self.instance = next(_serials)

    async def on_activate(self) -> None:
        EVENTS[str(self.id)].append(("activate", self.instance, now()))

    async def on_deactivate(self) -> None:
        EVENTS[str(self.id)].append(("deactivate", self.instance, now()))

    @handler
    async def inc(self, msg: Inc) -> Count:
        self.value += msg.by
        return Count(self.value, self.instance)


class RtOrders(Agent, type="rt-orders", topics=("orders",)):
    @handler
    async def placed(self, msg: OrderPlaced) -> None:
        EVENTS[str(self.id)].append(msg.order_id)


ALL_AGENTS: list[type[Agent]] = [
    RtCounter,
    RtRelay,
    RtSleeper,
    RtLog,
    RtSerial,
    RtMeet,
    RtBlocker,
    RtIdle,
    RtOrders,
]


# -- helpers and fixtures -------------------------------------------------------------------


def unique_cluster() -> str:
    return f"rt-{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def node(nats_url: str) -> AsyncIterator[accord.Node]:
    settings = accord.NodeSettings(cluster=unique_cluster(), drain_timeout=5.0)
    async with accord.Node(ALL_AGENTS, nats=nats_url, settings=settings) as n:
        await eventually(
            lambda: len(n.held_shards()) == n.config.num_shards, what="node to hold every shard"
        )
        yield n


@pytest.fixture
async def mesh(nats_url: str, node: accord.Node) -> AsyncIterator[accord.Mesh]:
    async with accord.connect(nats_url, cluster=node.names.cluster, name="rt-client") as m:
        yield m


@pytest.fixture(params=["remote", "local"])
async def caller(request: pytest.FixtureRequest, node: accord.Node, mesh: accord.Mesh) -> Any:
    """The same calls over NATS (a separate client) and in-process (the owning node itself)."""
    return mesh if request.param == "remote" else node


# -- replies and errors ---------------------------------------------------------------------


async def test_remote_ask_decodes_the_handlers_struct_return_type(mesh: accord.Mesh) -> None:
    reply = await mesh.ask("rt-counter/typed", Inc(by=5))
    assert isinstance(reply, Count)
    assert reply.value == 5


async def test_remote_ask_honours_an_explicit_return_type(mesh: accord.Mesh) -> None:
    reply = await mesh.ask("rt-counter/as-dict", Inc(by=2), returns=dict)
    assert reply["value"] == 2
    assert set(reply) == {"value", "instance"}


async def test_remote_ask_returns_builtin_and_none_replies(mesh: accord.Mesh) -> None:
    assert await mesh.ask("rt-log/builtin", Append(7)) is None
    assert await mesh.ask("rt-log/builtin", Items()) == [7]


async def test_ask_by_agent_id_and_by_string_reach_the_same_agent(caller: Any) -> None:
    first = await caller.ask(accord.AgentId("rt-counter", "same"), Inc())
    second = await caller.ask("rt-counter/same", Inc())
    assert (first.value, second.value) == (1, 2)
    assert first.instance == second.instance


async def test_handler_exception_is_a_remote_error_and_the_agent_keeps_its_state(
    caller: Any,
) -> None:
    before = await caller.ask("rt-counter/err", Inc())
    with pytest.raises(accord.RemoteError) as info:
        await caller.ask("rt-counter/err", Fail("kaput"))
    assert info.value.remote_type == "ValueError"
    assert info.value.remote_message == "kaput"
    after = await caller.ask("rt-counter/err", Inc())
    assert after.value == before.value + 1  # same activation, state retained
    assert after.instance == before.instance


async def test_unknown_agent_type_is_agent_type_not_found(caller: Any) -> None:
    with pytest.raises(accord.AgentTypeNotFound):
        await caller.ask("rt-no-such-type/x", Inc())


async def test_unknown_message_type_is_rejected_without_activating(
    caller: Any, node: accord.Node
) -> None:
    with pytest.raises(accord.UnknownMessageType):
        await caller.ask("rt-counter/never-activated", Unhandled())
    assert node.activation_count() == 0
    assert (await caller.ask("rt-counter/never-activated", Inc())).value == 1


# -- deadlines ------------------------------------------------------------------------------


async def test_deadline_propagates_through_a_nested_ask(caller: Any) -> None:
    start = now()
    with pytest.raises(accord.DeliveryTimeout):
        await caller.ask(
            "rt-relay/a", Relay("rt-sleeper/b", seconds=1.0, inner_timeout=30), timeout=0.5
        )
    elapsed = now() - start
    # Not a performance bound: the nested ask asked for 30 s and must end at the outer 0.5 s.
    assert 0.45 <= elapsed < 5.0, elapsed

    # B ran under a deadline no later than the outer one
    (saw,) = await eventually(lambda: EVENTS["rt-sleeper/b"], what="sleeper to run")
    _, deadline, remaining = saw
    assert deadline is not None
    assert 0 < remaining <= 0.5
    assert deadline <= start + 0.5 + 0.05

    # A's nested ask (timeout=30) ended at the outer deadline, not 30 s later
    records = await eventually(
        lambda: [e for e in EVENTS["rt-relay/a"] if e[0] == "inner-ended"],
        what="relay's nested ask to end",
    )
    _, exc_type, ended = records[0]
    assert exc_type is accord.DeliveryTimeout
    assert 0.45 <= ended - start < 5.0, ended - start
    inherited = next(e[1] for e in EVENTS["rt-relay/a"] if e[0] == "deadline")
    assert inherited is not None
    assert abs(inherited - deadline) < 0.05


async def test_expired_nested_ask_is_answered_as_a_timeout_on_the_wire(
    node: accord.Node, mesh: accord.Mesh
) -> None:
    """A request whose own deadline (timeout_ms) passes while its handler waits on a nested ask
    must not be reported as a handler failure: either no reply (the caller has given up) or the
    `timeout` code, which the caller maps to DeliveryTimeout. A raw request whose transport wait
    outlasts its timeout_ms makes the node's answer observable deterministically."""
    from accord import _codec as codec
    from accord.engine._api import RequestTimeout

    target = "rt-relay/wire"
    body = codec.encode(Relay("rt-sleeper/wire", seconds=1.0, inner_timeout=30))
    req = codec.Request(
        v=codec.PROTOCOL_VERSION,
        kind="ask",
        target=target,
        type="Relay",
        body=msgspec.Raw(body),
        timeout_ms=100,
    )
    subject = node.names.shard_subject(shard_of(target, node.config.num_shards))
    try:
        data = await mesh._transport.request(subject, codec.encode(req), 0.8)
    except RequestTimeout:
        return  # no reply after the deadline: acceptable
    reply, _ = codec.decode_reply(data)
    assert not reply.ok
    assert reply.error is not None
    assert reply.error.code == "timeout", reply.error


async def test_ask_outside_any_handler_has_no_inherited_deadline(node: accord.Node) -> None:
    assert current_deadline.get() is None
    assert await node.ask("rt-sleeper/free", Sleep(0), timeout=5) == "woke"
    (_, deadline, remaining) = EVENTS["rt-sleeper/free"][0]
    assert deadline is not None
    assert 4.0 < remaining <= 5.0
    assert current_deadline.get() is None


async def test_message_whose_deadline_passed_in_the_mailbox_is_not_run(
    node: accord.Node,
) -> None:
    GATES["hold"] = asyncio.Event()
    blocker = asyncio.create_task(node.ask("rt-blocker/q", Block("hold")))
    await eventually(lambda: EVENTS["rt-blocker/q"], what="first turn to start")
    GATES["late"] = asyncio.Event()
    GATES["late"].set()
    with pytest.raises(accord.DeliveryTimeout):
        await node.ask("rt-blocker/q", Block("late"), timeout=0.1)
    expired = node.stats.expired
    GATES["hold"].set()
    assert await blocker == 1
    await eventually(lambda: node.stats.expired == expired + 1, what="expired counter")
    assert ("started", "late") not in EVENTS["rt-blocker/q"]


# -- ordering and concurrency -----------------------------------------------------------------


async def test_tells_from_one_sender_arrive_in_order(caller: Any) -> None:
    for i in range(200):
        await caller.tell("rt-log/ordered", Append(i))

    async def all_arrived() -> list[int] | None:
        items: list[int] = await caller.ask("rt-log/ordered", Items())
        return items if len(items) >= 200 else None

    items = await eventually(all_arrived, what="200 tells to arrive")
    assert items == list(range(200))


async def test_one_agent_handles_one_message_at_a_time(caller: Any) -> None:
    results = await asyncio.gather(*(caller.ask("rt-serial/one", Probe()) for _ in range(50)))
    assert max(results) == 1
    assert MAX_ACTIVE["rt-serial/one"] == 1


async def test_different_agents_run_concurrently(caller: Any) -> None:
    parties = 4
    replies = await asyncio.gather(
        *(caller.ask(f"rt-meet/m{i}", Meet("g", parties), timeout=8) for i in range(parties))
    )
    assert replies == [True] * parties
    assert ARRIVED["g"] == parties


# -- activation lifecycle -------------------------------------------------------------------


async def test_idle_agent_is_deactivated_and_reactivated_fresh(
    caller: Any, node: accord.Node
) -> None:
    key = "rt-idle/sleepy"
    assert (await caller.ask(key, Inc())).value == 1
    second = await caller.ask(key, Inc())
    last_reply = now()
    assert second.value == 2

    deactivated = await eventually(
        lambda: [e for e in EVENTS[key] if e[0] == "deactivate"], what="idle deactivation"
    )
    assert deactivated[0][1] == second.instance
    assert deactivated[0][2] - last_reply >= 0.3 - 0.05  # not before the idle timeout
    await eventually(lambda: node.activation_count() == 0, what="activation to be forgotten")

    third = await caller.ask(key, Inc())
    assert third.value == 1  # a fresh instance: state reset
    assert third.instance != second.instance
    kinds = [(e[0], e[1]) for e in EVENTS[key]]
    assert kinds == [
        ("activate", second.instance),
        ("deactivate", second.instance),
        ("activate", third.instance),
    ]


async def test_graceful_stop_deactivates_live_agents(nats_url: str) -> None:
    settings = accord.NodeSettings(cluster=unique_cluster())
    async with accord.Node([RtIdle], nats=nats_url, settings=settings) as node:
        await eventually(lambda: len(node.held_shards()) == node.config.num_shards)
        await node.ask("rt-idle/stopped", Inc())
        assert [e[0] for e in EVENTS["rt-idle/stopped"]] == ["activate"]
    assert [e[0] for e in EVENTS["rt-idle/stopped"]] == ["activate", "deactivate"]


# -- local short-circuit ----------------------------------------------------------------------


async def test_ask_to_a_locally_owned_shard_does_not_touch_the_network(
    node: accord.Node, mesh: accord.Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_network(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("the local ask went over NATS")

    monkeypatch.setattr(node._transport, "request", no_network)
    local = await node.ask("rt-counter/short", Inc())
    assert local.value == 1

    subjects: list[str] = []
    real_request = mesh._transport.request

    async def spy(subject: str, data: bytes, timeout: float) -> bytes:
        subjects.append(subject)
        return await real_request(subject, data, timeout)

    monkeypatch.setattr(mesh._transport, "request", spy)
    remote = await mesh.ask("rt-counter/short", Inc())
    assert remote.value == 2
    assert remote.instance == local.instance
    shard = shard_of("rt-counter/short", node.config.num_shards)
    assert subjects == [node.names.shard_subject(shard)]


async def test_tell_to_a_locally_owned_shard_does_not_touch_the_network(
    node: accord.Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the local tell went over NATS")

    with monkeypatch.context() as m:
        m.setattr(node._transport, "publish", no_network)
        m.setattr(node._transport, "request", no_network)
        for i in range(5):
            await node.tell("rt-log/local-tell", Append(i))
        assert await node.ask("rt-log/local-tell", Items()) == list(range(5))


async def test_local_tells_wait_for_a_full_bulkhead_and_lose_nothing(nats_url: str) -> None:
    settings = accord.NodeSettings(cluster=unique_cluster(), max_inflight_per_type=8)
    async with accord.Node([RtLog], nats=nats_url, settings=settings) as node:
        await eventually(lambda: len(node.held_shards()) == node.config.num_shards)
        assert await node.ask("rt-log/full", Items()) == []  # a live activation: the fast path
        peak = 0
        for i in range(300):
            await node.tell("rt-log/full", Append(i))
            peak = max(peak, node._bulkhead.load("rt-log").n)
        assert peak <= 8  # the bulkhead bounds the mailbox of local tells too
        assert node.stats.overloaded > 0  # ... by making the teller wait
        assert await node.ask("rt-log/full", Items()) == list(range(300))  # in order, none lost
        assert node._bulkhead.load("rt-log").n == 0


# -- topics ---------------------------------------------------------------------------------


async def test_publish_reaches_the_subscribed_agent_keyed_by_source(
    caller: Any,
) -> None:
    sent = await caller.publish("orders", "o1", OrderPlaced("first"))
    assert sent == 1
    await eventually(lambda: EVENTS["rt-orders/o1"] == ["first"], what="published order")


async def test_publish_to_a_topic_nobody_subscribes_reaches_no_agent(
    mesh: accord.Mesh,
) -> None:
    assert await mesh.publish("no-subscribers", "o1", OrderPlaced("lost")) == 0


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelled_ask_leaks_nothing_and_the_agent_keeps_serving(
    caller: Any, node: accord.Node, mesh: accord.Mesh
) -> None:
    key = "rt-blocker/cancel"
    GATES["g1"] = asyncio.Event()
    pending = asyncio.create_task(caller.ask(key, Block("g1")))
    await eventually(lambda: ("started", "g1") in EVENTS[key], what="handler to start")
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending

    resp_map = mesh._transport._waiting  # type: ignore[attr-defined]
    assert resp_map == {}  # no reply future left behind by the remote client

    GATES["g1"].set()  # the cancelled turn still completes inside the agent
    await eventually(lambda: ("finished", "g1") in EVENTS[key], what="cancelled turn to finish")
    GATES["g2"] = asyncio.Event()
    GATES["g2"].set()
    assert await caller.ask(key, Block("g2")) == 2  # same activation, still serving
    assert node.activation_count() == 1
    assert resp_map == {}


async def test_cancelling_many_pending_asks_leaves_the_mailbox_usable(caller: Any) -> None:
    key = "rt-blocker/many"
    GATES["slow"] = asyncio.Event()
    tasks = [asyncio.create_task(caller.ask(key, Block("slow"))) for _ in range(10)]
    await eventually(lambda: EVENTS[key], what="first turn to start")
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    GATES["slow"].set()
    GATES["after"] = asyncio.Event()
    GATES["after"].set()
    turns = await caller.ask(key, Block("after"))
    assert 1 <= turns <= 11
