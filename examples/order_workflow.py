"""A complete workflow, end to end: an order saga with an exactly-once stock agent, a durable
sleep, an approval signal, and compensation when shipping fails.

    python examples/order_workflow.py

Starts an embedded nats-server and one node in this process, runs two orders (one approved and
shipped, one whose shipping fails and is compensated), prints what happened, and stops
everything. With `accord up --app examples/order_workflow.py` the same types run on a cluster.
"""

from __future__ import annotations

import asyncio

import msgspec

import accord


class Order(msgspec.Struct):
    sku: str
    qty: int
    ship_to: str


class Reserve(msgspec.Struct):
    qty: int


class Release(msgspec.Struct):
    qty: int


class Approve(msgspec.Struct):
    by: str


class Stock(msgspec.Struct):
    available: int = 10


class Inventory(accord.Agent, type="inventory", delivery="exactly_once"):
    """One agent per SKU; exactly-once, so a workflow step asked again is not applied twice."""

    state: Stock

    @accord.handler
    async def reserve(self, msg: Reserve) -> int:
        if msg.qty > self.state.available:
            raise ValueError(f"only {self.state.available} left")
        self.state.available -= msg.qty
        return self.state.available

    @accord.handler
    async def release(self, msg: Release) -> int:
        self.state.available += msg.qty
        return self.state.available


async def charge(order: Order) -> str:
    return f"payment-{order.sku}-{order.qty}"  # a real step would call a payment API


async def refund(order: Order) -> None:
    print(f"  compensation: refund {order.sku} x{order.qty}")


async def ship(order: Order) -> str:
    if order.ship_to == "nowhere":
        raise RuntimeError("no courier delivers there")
    return f"tracking-{order.sku}"


QUICK = accord.Retry(attempts=3, initial=0.1, factor=2.0, max_interval=1.0)


class OrderFlow(accord.Workflow, type="order", version=1):
    async def run(self, ctx: accord.WorkflowContext, order: Order) -> str:
        left = await ctx.ask(f"inventory/{order.sku}", Reserve(order.qty))
        try:
            await ctx.step(charge, order, compensate=refund, retry=QUICK)
            approval = await ctx.wait_signal(Approve, timeout=30)
            if approval is None:
                raise RuntimeError("not approved in time")
            await ctx.sleep(0.5)  # a durable pause (say, a cooling-off period)
            tracking = await ctx.step(ship, order, retry=QUICK)
        except Exception:
            # a saga step that is itself an agent call: undo the reservation, exactly once
            await ctx.ask(f"inventory/{order.sku}", Release(order.qty))
            raise
        return f"{tracking} (approved by {approval.by}; {left} left)"


AGENTS = [Inventory, OrderFlow]


async def main() -> None:
    with accord.EmbeddedServer() as server:
        async with accord.Node(AGENTS, nats=server.url, name="example") as node:
            good = await node.start_workflow(OrderFlow, "o-1", Order("book", 2, "Lyon"))
            await good.signal(Approve(by="alice"))
            print("o-1:", await good.result(timeout=30))

            bad = await node.start_workflow(OrderFlow, "o-2", Order("book", 3, "nowhere"))
            await bad.signal(Approve(by="bob"))
            try:
                await bad.result(timeout=30)
            except accord.WorkflowFailed as exc:
                print(f"o-2: {exc.state} (compensated: {exc.compensated}): {exc.cause}")
            status = await bad.status()
            print(f"o-2: {status.steps_done} steps done, {status.attempts} failed attempts")


if __name__ == "__main__":
    asyncio.run(main())
