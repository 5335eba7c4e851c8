"""An engine that fails surfaces as an `accord.AccordError` from every public `Mesh` method: no
nats-py exception, no internal signal of the engine seam (`NoResponders`, `RequestTimeout`,
`WrongRevision`, `NotFound`, `Refused`) ever reaches a caller. Above the seam: the in-memory engine
with its fault injection (`down()`), so the failure is certain and immediate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

import accord
from accord.cluster._config import Names, open_cluster
from accord.engine.memory import MemoryEngine


class Ping(msgspec.Struct):
    n: int = 0


class Echo(accord.Workflow, type="fail-echo"):
    async def run(self, ctx: accord.WorkflowContext, job: Ping) -> int:
        return job.n


class Svc(accord.Agent, type="svc"):
    @accord.handler
    async def ping(self, msg: Ping) -> int:
        return msg.n


@pytest.fixture
async def mesh_and_engine() -> AsyncIterator[tuple[accord.Mesh, MemoryEngine]]:
    engine = MemoryEngine()
    names = Names("fail")
    config, buckets = await open_cluster(engine, names)
    mesh = accord.Mesh(engine, names, config, buckets)
    try:
        yield mesh, engine
    finally:
        engine.up()
        await mesh.close()


async def _lease(m: accord.Mesh) -> None:
    async with m.lease("jobs", ttl=2, timeout=0.5):
        pass


async def _election(m: accord.Mesh) -> None:
    async for _ in m.election("leader", ttl=2):
        break


CALLS: dict[str, Callable[[accord.Mesh], Awaitable[Any]]] = {
    "ask": lambda m: m.ask("svc/a", Ping(), timeout=0.5),
    "ask durable": lambda m: m.ask("svc/a", Ping(), timeout=0.5, delivery="exactly_once"),
    "ask_json": lambda m: m.ask_json("svc/a", "Ping", b"{}", timeout=0.5),
    "tell": lambda m: m.tell("svc/a", Ping()),
    "tell durable": lambda m: m.tell("svc/a", Ping(), delivery="at_least_once", timeout=0.5),
    "tell_json": lambda m: m.tell_json("svc/a", "Ping", b"{}"),
    "publish": lambda m: m.publish("news", "a", Ping()),
    "publish_json": lambda m: m.publish_json("news", "a", "Ping", b"{}"),
    "subscribe": lambda m: m.subscribe("news", "svc"),
    "register_types": lambda m: m.register_types([Svc.__accord_spec__]),
    "lease": _lease,
    "fenced_write": lambda m: m.fenced_write("report", b"x", 1),
    "fenced_read": lambda m: m.fenced_read("report"),
    "propose": lambda m: m.propose("t", 1, voters=["svc/v1"], deadline=0.5),
    "decision": lambda m: m.decision("p1"),
    "barrier": lambda m: m.barrier("b", 2, timeout=0.5),
    "counter_add": lambda m: m.counter_add("c", 1),
    "counter": lambda m: m.counter("c"),
    "start_workflow": lambda m: m.start_workflow(Echo, "k", Ping(1), timeout=0.5),
    "delete_state": lambda m: m.delete_state("svc/a"),
    "migrate": lambda m: m.migrate("svc/a", "n2", timeout=0.5),
}


def test_every_public_mesh_method_is_covered() -> None:
    """A new public method must be added to CALLS (or to the reasons below)."""
    public = {n for n in dir(accord.Mesh) if not n.startswith("_")}
    # a property; closing; campaigns until it can; a handle by id (no I/O until used)
    not_calls = {"name", "close", "election", "workflow"}
    assert public - not_calls == {k.split()[0] for k in CALLS}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_an_engine_that_is_down_surfaces_as_an_accord_error(
    mesh_and_engine: tuple[accord.Mesh, MemoryEngine], call: str
) -> None:
    mesh, engine = mesh_and_engine
    engine.down()
    try:
        await CALLS[call](mesh)
    except accord.AccordError:
        pass  # the contract: one of accord's errors, whatever it is
    # A call that does not fail while the engine is down must be one that promises nothing
    # from it: an at-most-once tell or publish handed to a dead connection raises too.
    else:
        pytest.fail(f"{call} returned normally while the engine was down")
