"""Workflow lifecycle events on the bus: a node's runs publish `started` ... `completed` on a
topic (key = run id) that a monitoring consumer subscribes to like any other."""

from __future__ import annotations

import asyncio

import msgspec

import accord


class Order(msgspec.Struct):
    n: int


async def bump(n: int) -> int:
    return n + 1


class BusChain(accord.Workflow, type="bus_chain"):
    async def run(self, ctx: accord.WorkflowContext, order: Order) -> int:
        return await ctx.step(bump, order.n)


class RunEvent(msgspec.Struct):
    run: str
    event: str
    step: str = ""


async def test_lifecycle_events_reach_a_bus_subscriber(nats_url: str) -> None:
    settings = accord.NodeSettings(cluster="busflow")
    async with (
        accord.Node([BusChain], nats=nats_url, settings=settings) as node,
        accord.bus.connect(nats_url, partitions=2) as bus,
    ):
        stop = accord.bus.workflow_events(node, bus, topic="wf-events")
        seen: list[RunEvent] = []

        async def monitor(ev: RunEvent, d: accord.bus.Delivery) -> None:
            assert d.key == ev.run
            seen.append(ev)

        sub = await bus.subscribe("wf-events", group="monitoring", handler=monitor, min_idle=1)
        handle = await node.start_workflow(BusChain, "o-1", Order(41))
        assert await handle.result(timeout=30) == 42
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not any(e.event == "completed" for e in seen) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stop()
        await sub.stop()
    events = [e.event for e in seen if e.run == handle.id]
    assert events[0] == "started" and events[-1] == "completed", events
    assert "step_completed" in events
