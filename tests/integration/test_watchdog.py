"""The turn watchdog and the loop monitor on a real nats-server, with an in-process Node.

A handler past its type's `turn_timeout` answers `TurnTimeout` (in-process and over the wire) and
the agent answers the next message from a fresh activation; a handler blocking the loop is
reported while it blocks; with `executor="thread"` the same blocking call leaves the loop free.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec
import pytest

import accord
from accord import Agent, handler

_instances = itertools.count(1)
#: What a blocking handler read at the end of its block (the loop still blocked), by agent id.
OBSERVED: dict[str, int] = {}


class Tally(msgspec.Struct):
    n: int = 0


class Nap(msgspec.Struct):
    seconds: float


class Stubborn(msgspec.Struct):
    """Sleep, ignoring the first cancellation (the turn watchdog's) but not the second."""


class Add(msgspec.Struct):
    by: int = 1


class Seen(msgspec.Struct):
    n: int
    instance: int


class Block(msgspec.Struct):
    seconds: float


class Ping(msgspec.Struct):
    pass


class WdSlow(Agent, type="wd-slow", turn_timeout=0.5):
    state: Tally

    async def on_activate(self) -> None:
        self.instance = next(_instances)

    @handler
    async def nap(self, msg: Nap) -> str:
        self.state.n += 100  # rolled back when the turn times out
        await asyncio.sleep(msg.seconds)
        return "rested"

    @handler
    async def stubborn(self, msg: Stubborn) -> str:
        self.state.n += 1000
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # cancelled again by the node's stop
        return "never"

    @handler(executor="thread")
    def grind(self, msg: Block) -> str:
        self.state.n += 10_000
        time.sleep(msg.seconds)  # in a worker thread: the watchdog cannot stop it, only leave it
        return "ground"

    @handler
    async def add(self, msg: Add) -> Seen:
        self.state.n += msg.by
        return Seen(self.state.n, self.instance)


class Flaky(msgspec.Struct):
    key: str
    stuck_for: int  # attempts that hang past turn_timeout before one returns


class Mark(msgspec.Struct):
    key: str


#: What the durable agent saw, in order, by key.
SEEN: dict[str, list[str]] = {}


class WdDurable(Agent, type="wd-durable", delivery="at_least_once", turn_timeout=0.5,
                max_deliver=3):  # fmt: skip
    @handler
    async def flaky(self, msg: Flaky) -> int:
        seen = SEEN.setdefault(msg.key, [])
        seen.append("flaky")
        if seen.count("flaky") <= msg.stuck_for:
            await asyncio.sleep(60)
        return len(seen)

    @handler
    async def mark(self, msg: Mark) -> None:
        SEEN.setdefault(msg.key, []).append("mark")


class WdBlock(Agent, type="wd-block"):
    @handler
    async def block(self, msg: Block) -> None:
        time.sleep(msg.seconds)  # noqa: ASYNC251 - the mistake under test: blocks the loop
        # Read while the loop is still blocked: only the watchdog thread can have counted it.
        OBSERVED[str(self.id)] = cast(accord.Node, self.mesh).stats.loop_stalls

    @handler(executor="thread")
    def block_in_thread(self, msg: Nap) -> str:
        time.sleep(msg.seconds)
        return "done"

    @handler
    async def ping(self, msg: Ping) -> str:
        return "pong"


async def eventually(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := condition()):
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
async def node(nats_url: str) -> AsyncIterator[accord.Node]:
    settings = accord.NodeSettings(cluster=f"wd-{uuid.uuid4().hex[:12]}", num_shards=8,
                                   drain_timeout=2.0)  # fmt: skip
    async with accord.Node([WdSlow, WdBlock, WdDurable], nats=nats_url, settings=settings) as n:
        await eventually(lambda: len(n.held_shards()) == 8, "node to hold every shard")
        yield n


async def test_a_turn_past_turn_timeout_gets_turn_timeout_and_the_agent_answers_next(
    node: accord.Node, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = await node.ask("wd-slow/a", Add(1), timeout=10)
    with pytest.raises(accord.TurnTimeout, match="turn_timeout"):
        await node.ask("wd-slow/a", Nap(30), timeout=10)
    after = await node.ask("wd-slow/a", Add(1), timeout=10)
    assert after.n == 2, "the timed-out turn's state change was not rolled back"
    assert after.instance != first.instance, "the abandoned activation was not replaced"
    assert node.stats.turn_timeouts == 1
    assert any("ran past turn_timeout" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)  # fmt: skip

    async with accord.connect(nats_url, cluster=node.names.cluster, name="wd-client") as client:
        with pytest.raises(accord.TurnTimeout):
            await client.ask("wd-slow/b", Nap(30), timeout=10)
        assert (await client.ask("wd-slow/b", Add(5), timeout=10)).n == 5


async def test_a_handler_ignoring_cancellation_does_not_hold_up_the_next_message(
    node: accord.Node,
) -> None:
    with pytest.raises(accord.TurnTimeout):
        await node.ask("wd-slow/c", Stubborn(), timeout=10)
    # The stuck handler is still sleeping; the fresh activation does not wait for it.
    assert (await node.ask("wd-slow/c", Add(7), timeout=10)).n == 7


async def test_a_thread_handler_past_turn_timeout_is_left_running_and_the_agent_answers(
    node: accord.Node,
) -> None:
    with pytest.raises(accord.TurnTimeout):
        await node.ask("wd-slow/t", Block(1.5), timeout=10)
    assert (await node.ask("wd-slow/t", Add(3), timeout=10)).n == 3


async def test_a_timed_out_mailbox_delivery_is_retried_first_by_the_fresh_activation(
    node: accord.Node,
) -> None:
    with pytest.raises(accord.TurnTimeout):
        await node.ask("wd-durable/d", Flaky("d", stuck_for=1), timeout=10)
    await node.tell("wd-durable/d", Mark("d"), delivery="at_least_once")
    await eventually(lambda: SEEN.get("d") == ["flaky", "flaky", "mark"], "retry, then next")
    # An attempt that always hangs is dead-lettered after max_deliver (3) attempts.
    await node.tell("wd-durable/e", Flaky("e", stuck_for=9), delivery="at_least_once")
    await node.tell("wd-durable/e", Mark("e"), delivery="at_least_once")
    await eventually(lambda: SEEN.get("e") == ["flaky"] * 3 + ["mark"], "3 attempts, then next")
    await eventually(lambda: node.stats.dead_lettered == 1, "the message to be dead-lettered")
    assert node.stats.turn_timeouts == 4


async def test_a_handler_blocking_the_loop_is_reported_while_it_blocks(
    node: accord.Node, caplog: pytest.LogCaptureFixture
) -> None:
    before = node.stats.loop_stalls
    # A tell: a 3 s block costs the node its 2 s shard leases, so an ask's reply is withheld.
    await node.tell("wd-block/x", Block(3.0))
    during = await eventually(lambda: OBSERVED.get("wd-block/x"), "the blocking turn to end")
    assert during > before, "the stall was not reported while the loop was blocked"
    blocked = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert blocked and "wd-block/x" in blocked[0], blocked
    assert "test_watchdog.py" in blocked[0], "the report should point at the blocking line"
    # Once the loop runs again, its monitor records how late it was.
    await eventually(lambda: node.stats.loop_lag_max >= 1.0, "the stall to be measured", 5.0)
    assert node.status()["counters"]["loop_stalls"] == node.stats.loop_stalls


async def test_a_blocking_handler_in_a_thread_leaves_the_loop_serving(nats_url: str) -> None:
    settings = accord.NodeSettings(cluster=f"wd-{uuid.uuid4().hex[:12]}", num_shards=8,
                                   loop_lag_warning=1.0)  # fmt: skip
    async with accord.Node([WdBlock], nats=nats_url, settings=settings) as node:
        await eventually(lambda: len(node.held_shards()) == 8, "node to hold every shard")
        before = node.stats.loop_stalls
        blocking = asyncio.ensure_future(node.ask("wd-block/t", Nap(2.0), timeout=30))
        pongs = 0
        while not blocking.done():
            assert await node.ask("wd-block/other", Ping(), timeout=5) == "pong"
            pongs += 1
            await asyncio.sleep(0.05)
        assert await blocking == "done"
        assert pongs >= 5, "other agents were not served while the thread handler blocked"
        assert node.stats.loop_stalls == before
