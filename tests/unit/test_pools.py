"""Worker pools above the engine seam (in-memory engine): the `stateless` option's validation,
the per-node bound — at most `max_concurrency` handlers run, an ask beyond it is answered
`overloaded` and retried by the sender, tells beyond it wait — the type registry's `stateless`
flag, and a stopping node handing back its unfinished durable tells."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest

import accord
from accord._background import Background
from accord._codec import PROTOCOL_VERSION, Request, decode_reply, encode
from accord._directory import Directory
from accord._errors import ConfigurationError, Overloaded
from accord._mesh import Mesh
from accord.cluster._config import ClusterConfig, Names
from accord.cluster._watched import WatchedKV
from accord.delivery._pools import pool_ask_subject
from accord.engine._api import BucketSpec
from accord.engine.memory import MemoryEngine
from accord.runtime._pool import Pools
from accord.testing import eventually_async


class Job(msgspec.Struct):
    n: int


class Gate:
    """What the pool's handlers wait on, and the most of them seen running at once."""

    opened = asyncio.Event()
    running = 0
    peak = 0
    done: list[int] = []


class Gated(accord.Agent, type="gated", stateless=True, max_concurrency=2):
    @accord.handler
    async def work(self, job: Job) -> int:
        Gate.running += 1
        Gate.peak = max(Gate.peak, Gate.running)
        try:
            await Gate.opened.wait()
        finally:
            Gate.running -= 1
        Gate.done.append(job.n)
        return job.n


class State(msgspec.Struct):
    n: int = 0


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"consistency": "crdt"}, "consistency"),
        ({"delivery": "exactly_once"}, "exactly_once"),
        ({"failover": "degraded"}, "failover"),
        ({"state_ttl": 5}, "state_ttl"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 2.5}, "max_concurrency"),
    ],
)
def test_stateless_type_refuses_options_that_presume_an_owner_or_state(
    options: dict[str, object], why: str
) -> None:
    with pytest.raises(ConfigurationError, match=why):

        class Bad(accord.Agent, type="bad_pool", stateless=True, **options):  # type: ignore[call-arg]
            pass


def test_stateless_type_refuses_state() -> None:
    with pytest.raises(ConfigurationError, match="state"):

        class Stateful(accord.Agent, type="stateful_pool", stateless=True):
            state: State


def test_max_concurrency_needs_stateless() -> None:
    with pytest.raises(ConfigurationError, match="needs stateless=True"):

        class Plain(accord.Agent, type="plain_mc", max_concurrency=4):
            pass


def test_stateless_spec_keeps_its_bound_and_durable_tells() -> None:
    class Ok(accord.Agent, type="ok_pool", stateless=True, max_concurrency=3,
             delivery="at_least_once"):  # fmt: skip
        pass

    spec = Ok.__accord_spec__
    assert spec.stateless and spec.options.max_concurrency == 3 and not spec.durable
    assert not Gated.__accord_spec__.durable and Gated.__accord_spec__.options.max_concurrency == 2


@contextlib.asynccontextmanager
async def pool_node() -> AsyncIterator[tuple[MemoryEngine, Mesh, Pools]]:
    Gate.opened = asyncio.Event()
    Gate.running = Gate.peak = 0
    Gate.done = []
    engine = MemoryEngine(name="n1")
    node = Mesh(engine, Names("t"), ClusterConfig())
    pools = Pools(node, [Gated.__accord_spec__], engine, drain_timeout=1.0)
    await pools.start()
    client = Mesh(engine.connect("client"), Names("t"), ClusterConfig())
    try:
        yield engine, client, pools
    finally:
        Gate.opened.set()
        await pools.stop()


async def _raw_ask(engine: MemoryEngine, n: int) -> tuple[bool, str]:
    req = Request(v=PROTOCOL_VERSION, kind="ask", target=f"gated/{n}", type="Job",
                  body=msgspec.Raw(encode(Job(n))), timeout_ms=5000)  # fmt: skip
    reply, _ = decode_reply(await engine.request(pool_ask_subject(Names("t"), "gated"),
                                                 encode(req), 5.0))  # fmt: skip
    return reply.ok, "" if reply.error is None else reply.error.code


async def test_asks_beyond_max_concurrency_are_answered_overloaded_not_run() -> None:
    async with pool_node() as (engine, _, pools):
        held = [asyncio.create_task(_raw_ask(engine, n)) for n in range(2)]
        await eventually_async(lambda: Gate.running == 2, 5, "two handlers running")
        refused = await asyncio.gather(*(_raw_ask(engine, n) for n in range(2, 5)))
        assert refused == [(False, "overloaded")] * 3
        assert pools.status()["gated"]["inflight"] == 2
        Gate.opened.set()
        assert [await t for t in held] == [(True, "")] * 2
        assert sorted(Gate.done) == [0, 1] and Gate.peak == 2  # the refused ones never ran


async def test_sender_retries_an_overloaded_ask_until_a_slot_frees_or_the_deadline() -> None:
    async with pool_node() as (_, client, pools):
        held = [asyncio.create_task(client.ask(f"gated/{n}", Job(n), timeout=5)) for n in (0, 1)]
        await eventually_async(lambda: Gate.running == 2, 5, "two handlers running")
        with pytest.raises(Overloaded):  # both slots held until the deadline: not processed
            await client.ask("gated/9", Job(9), timeout=0.3)
        refusals = pools.status()["gated"]["overloaded"]
        waiting = asyncio.create_task(client.ask("gated/2", Job(2), timeout=5))
        await eventually_async(
            lambda: pools.status()["gated"]["overloaded"] > refusals, 5, "a refusal"
        )
        Gate.opened.set()
        assert await waiting == 2 and [await t for t in held] == [0, 1]
        assert 9 not in Gate.done and Gate.peak == 2


async def test_durable_tells_beyond_max_concurrency_wait_and_all_run() -> None:
    async with pool_node() as (_, client, pools):
        for n in range(10):
            await client.tell(f"gated/{n}", Job(n), delivery="at_least_once")
        await eventually_async(lambda: Gate.running == 2, 5, "two handlers running")
        assert pools.status()["gated"]["running"] == 2
        Gate.opened.set()
        await eventually_async(lambda: len(Gate.done) == 10, 5, "every tell handled")
        assert sorted(Gate.done) == list(range(10)) and Gate.peak == 2


async def test_at_most_once_tells_beyond_max_concurrency_wait_and_all_run() -> None:
    async with pool_node() as (_, client, pools):
        for n in range(6):
            await client.tell(f"gated/{n}", Job(n))
        await eventually_async(lambda: Gate.running == 2, 5, "two handlers running")
        assert pools.status()["gated"]["inflight"] == 2  # the others wait in the subscription
        Gate.opened.set()
        await eventually_async(lambda: len(Gate.done) == 6, 5, "every tell handled")
        assert sorted(Gate.done) == list(range(6)) and Gate.peak == 2


async def test_the_type_registry_tells_clients_without_the_class_which_types_are_pools() -> None:
    engine = MemoryEngine()
    kv = await engine.bucket(BucketSpec(name="meta"))
    bg = Background()
    hosting = Directory(WatchedKV(kv, bg, prefix="type."), WatchedKV(None, bg), lambda t: None)
    await hosting.register([Gated.__accord_spec__])
    # A type no class of this process declares: only the registry can say it is a pool.
    await kv.put("type.remote_pool", msgspec.json.encode({"delivery": "at_most_once",
                                                          "stateless": True}))  # fmt: skip
    await kv.put("type.remote_plain", msgspec.json.encode({"delivery": "at_most_once"}))
    client = Directory(WatchedKV(kv, bg, prefix="type."), WatchedKV(None, bg), lambda t: None)
    assert client.known_pool("remote_pool") is None  # the registry is not loaded yet
    assert await client.pool("remote_pool") and not await client.pool("remote_plain")
    assert client.known_pool("gated") is True and client.known_pool("unknown") is False
    record = msgspec.json.decode((await kv.get("type.gated")).value)  # type: ignore[union-attr]
    assert record["stateless"] is True and record["max_concurrency"] == 2
    await bg.close()


async def test_a_stopping_node_hands_back_unfinished_durable_tells_at_once() -> None:
    async with pool_node() as (engine, client, first):
        for n in range(6):
            await client.tell(f"gated/{n}", Job(n), delivery="at_least_once")
        await eventually_async(lambda: Gate.running == 2, 5, "two handlers running")
        first._drain_timeout = 0.05  # the handlers under way do not finish in time
        await first.stop()
        assert Gate.done == []
        Gate.opened.set()
        other = engine.connect("n2")
        second = Pools(Mesh(other, Names("t"), ClusterConfig()), [Gated.__accord_spec__], other,
                       drain_timeout=1.0)  # fmt: skip
        await second.start()
        try:  # well within the 6 s ack wait: handed back, not timed out
            await eventually_async(
                lambda: len(Gate.done) == 6, 5, "every tell handled by the other node"
            )
        finally:
            await second.stop()
        assert sorted(Gate.done) == list(range(6))
