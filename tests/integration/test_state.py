"""Durable state and delivery against a real nats-server with in-process nodes: dead letters and
`accord dlq`, exactly-once retries, event sourcing, eventual flushes, schema versions, bulkheads,
and state moving with a shard on handoff."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

import accord
from accord._ids import AgentId
from accord.engine._api import BucketSpec
from accord.state._events import EventLog
from accord.state._store import StateRecord, StateStore
from accord.testing import eventually_async

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from durable_app import Add, Flaky, Ledger, Read, Total  # noqa: E402


class Deposited(msgspec.Struct):
    amount: int


class Deposit(msgspec.Struct):
    amount: int


class Snapshot(msgspec.Struct):
    pass


class Book(msgspec.Struct):
    balance: int = 0
    ops: int = 0


class Journal(
    accord.Agent,
    type="journal",
    consistency="event_sourced",
    events=(Deposited,),
    snapshot_every=5,
    idle_timeout=0.3,
):
    state: Book

    def apply(self, event: object) -> None:
        assert isinstance(event, Deposited)
        self.state.balance += event.amount
        self.state.ops += 1

    @accord.handler
    async def deposit(self, msg: Deposit) -> int:
        self.emit(Deposited(msg.amount))
        return self.state.balance

    @accord.handler
    async def snapshot(self, msg: Snapshot) -> Book:
        return self.state


class Lazy(accord.Agent, type="lazy", consistency="eventual", flush_interval=0.2):
    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        return self.state.total


class OldShape(msgspec.Struct):
    total: str = "x"


class NewShape(msgspec.Struct):
    total: int = 0
    unit: str = "eur"


class Strict(accord.Agent, type="strict", state_version=2):
    state: NewShape

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


class Migrating(accord.Agent, type="migrating", state_version=2):
    state: NewShape

    @classmethod
    def migrate_state(cls, version: int, data: Any) -> NewShape:
        assert version == 1
        return NewShape(total=int(data["total"]) * 100, unit="cent")

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


class Slow(accord.Agent, type="slow"):
    @accord.handler
    async def add(self, msg: Add) -> int:
        await asyncio.sleep(msg.pause)
        return msg.n


AGENTS = [Flaky, Ledger, Journal, Lazy, Strict, Migrating, Slow]


async def _node(url: str, cluster: str, name: str = "n1", **settings: Any) -> accord.Node:
    node = accord.Node(AGENTS, nats=url, name=name,
                       settings=accord.NodeSettings(cluster=cluster, **settings))  # fmt: skip
    await node.start()
    await eventually_async(
        lambda: len(node.held_shards()) == node.config.num_shards, 20.0, "all shards held"
    )
    return node


async def _state_store(node: accord.Node, bucket: str) -> StateStore:
    return StateStore(await node._transport.bucket(BucketSpec(name=bucket), create=False))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


async def _acli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: a blocking call would stall this test's node (no lease renewals)."""
    return await asyncio.to_thread(_cli, *args)


async def test_failing_handler_is_dead_lettered_and_replayed_by_the_cli(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = tmp_path / "fixed"
    monkeypatch.setenv("ACCORD_FIXED", str(fixed))
    cluster = "dlq1"
    node = await _node(nats_url, cluster)
    try:
        with pytest.raises(accord.RemoteError) as err:
            await node.ask("flaky/x", Add(7), timeout=10)
        assert "flaky is broken" in str(err.value)
        listed = await _acli("dlq", "list", "--json", "--nats", nats_url, "--cluster", cluster)
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert len(entries) == 1
        entry = entries[0]
        assert entry["target"] == "flaky/x" and entry["type"] == "Add"
        assert entry["deliveries"] == 3  # max_deliver of Flaky
        assert "RuntimeError: flaky is broken" in entry["reason"]
        where = ("--nats", nats_url, "--cluster", cluster)
        shown = await _acli("dlq", "show", str(entry["seq"]), *where)
        assert shown.returncode == 0 and '"n": 7' in shown.stdout

        fixed.touch()  # the bug is fixed; replay the dead letter
        replay = await _acli("dlq", "replay", str(entry["seq"]), *where)
        assert replay.returncode == 0, replay.stderr

        async def total() -> int:
            return int(await node.ask("flaky/x", Read(), timeout=5, delivery="at_most_once"))

        for _ in range(200):
            if await total() == 7:
                break
            await asyncio.sleep(0.05)
        assert await total() == 7
        empty = await _acli("dlq", "list", "--json", "--nats", nats_url, "--cluster", cluster)
        assert json.loads(empty.stdout) == []
        bad = await _acli("dlq", "show", "999", "--nats", nats_url, "--cluster", cluster)
        assert bad.returncode == 2 and "no dead letter" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        await node.stop()


async def test_exactly_once_retry_returns_the_recorded_reply(nats_url: str) -> None:
    node = await _node(nats_url, "eo1")
    try:
        async with accord.connect(nats_url, cluster="eo1") as mesh:
            first = await mesh.ask("ledger/r", Add(5), timeout=10, msg_id="pay-1")
            again = await mesh.ask("ledger/r", Add(5), timeout=10, msg_id="pay-1")
            other = await mesh.ask("ledger/r", Add(1), timeout=10, msg_id="pay-2")
            await mesh.tell("ledger/r", Add(100), msg_id="pay-3")
            await mesh.tell("ledger/r", Add(100), msg_id="pay-3")  # a retried tell
            final = await mesh.ask("ledger/r", Read(), timeout=10)
    finally:
        await node.stop()
    assert (first, again, other, final) == (5, 5, 6, 106)


async def test_event_sourced_state_from_snapshot_and_replay_equals_full_log(nats_url: str) -> None:
    node = await _node(nats_url, "es1")
    agent = AgentId("journal", "j1")
    try:
        amounts = [(i * 7) % 13 + 1 for i in range(23)]
        for a in amounts:
            await node.ask(agent, Deposit(a), timeout=10)
        await eventually_async(lambda: agent not in node._table.live, 20.0, "idle deactivation")
        rebuilt = await node.ask(agent, Snapshot(), timeout=10)  # snapshot + replay
        log = EventLog(node._transport, "accord_es1_es", "accord.es1.es")
        folded = Book()

        def fold(ev: Any) -> None:
            folded.balance += ev.amount
            folded.ops += 1

        await log.replay(agent, 0, {"Deposited": Deposited}, fold)
        record, _ = await (await _state_store(node, "accord_es1_state")).load(agent)
    finally:
        await node.stop()
    # The last snapshot holds 20 events (snapshot_every=5); the other 3 came from replay.
    assert record is not None and record.events_count == 20 and record.events_seq > 0
    assert rebuilt == folded == Book(balance=sum(amounts), ops=23)


async def test_eventual_state_is_written_behind_within_the_flush_interval(nats_url: str) -> None:
    node = await _node(nats_url, "ev1")
    agent = AgentId("lazy", "l1")
    store = await _state_store(node, "accord_ev1_state")
    try:
        for _ in range(3):
            await node.ask(agent, Add(2), timeout=5)

        async def stored_total() -> int | None:
            record, _ = await store.load(agent)
            if record is None or not bytes(record.state):
                return None
            return msgspec.msgpack.decode(record.state, type=Total).total

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while await stored_total() != 6 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert await stored_total() == 6
    finally:
        await node.stop()


async def test_undecodable_state_is_a_clear_error_never_a_reset(nats_url: str) -> None:
    node = await _node(nats_url, "sv1")
    store = await _state_store(node, "accord_sv1_state")
    try:
        for agent_type in ("strict", "migrating"):
            raw = msgspec.Raw(msgspec.msgpack.encode({"total": "12"}))
            old = StateRecord(agent=f"{agent_type}/a", schema=1, state=raw)
            await store.save(AgentId(agent_type, "a"), old, 0)
        with pytest.raises(accord.StateError) as err:
            await node.ask("strict/a", Read(), timeout=5)
        assert "strict/a" in str(err.value) and "v1" in str(err.value)
        record, _ = await store.load(AgentId("strict", "a"))
        assert record is not None and msgspec.msgpack.decode(record.state) == {"total": "12"}
        assert await node.ask("migrating/a", Read(), timeout=5) == 1200
    finally:
        await node.stop()


async def test_bulkhead_refuses_work_beyond_the_per_type_limit(nats_url: str) -> None:
    node = await _node(nats_url, "bh1", max_inflight_per_type=4)
    try:
        async with accord.connect(nats_url, cluster="bh1") as mesh:
            results = await asyncio.gather(
                *(mesh.ask(f"slow/s{i}", Add(i, pause=0.5), timeout=5) for i in range(12)),
                return_exceptions=True,
            )
    finally:
        await node.stop()
    overloaded = [r for r in results if isinstance(r, accord.Overloaded)]
    served = [r for r in results if isinstance(r, int)]
    assert overloaded and served, results
    assert len(served) <= 4 + 1  # the bulkhead bounds what runs concurrently
    assert node.stats.overloaded == len(overloaded)


async def test_state_moves_with_its_shard_on_handoff(nats_url: str) -> None:
    cluster = f"mv{uuid.uuid4().hex[:6]}"
    first = await _node(nats_url, cluster, "first")
    second: accord.Node | None = None
    try:
        agents = [f"ledger/m{i}" for i in range(40)]
        for i, a in enumerate(agents):
            await first.ask(a, Add(i + 1), timeout=10)
        second = accord.Node(AGENTS, nats=nats_url, name="second",
                             settings=accord.NodeSettings(cluster=cluster))  # fmt: skip
        await second.start()
        await eventually_async(
            lambda: len(second.held_shards()) > 10, 20.0, "the joiner to take shards"
        )
        await eventually_async(
            lambda: len(first.held_shards()) + len(second.held_shards()) == 64,
            20.0,
            "stable placement",
        )
        held = second.held_shards()
        moved = [a for a in agents if accord._ids.shard_of(a, 64) in held]
        assert moved, "some agents must now live on the joiner"
        totals = [await second.ask(a, Read(), timeout=10) for a in agents]
    finally:
        if second is not None:
            await second.stop()
        await first.stop()
    assert totals == [i + 1 for i in range(40)]


async def test_circuit_breaker_opens_on_repeated_failures_of_one_target(nats_url: str) -> None:
    node = await _node(nats_url, "cb1")
    try:
        breaker = accord.BreakerSettings(failures=3, reset_after=60)
        async with accord.connect(nats_url, cluster="cb1", breaker=breaker) as mesh:
            for _ in range(3):
                with pytest.raises(accord.RemoteError):
                    await mesh.ask("flaky/cb", Add(1), timeout=5, delivery="at_most_once")
            with pytest.raises(accord.CircuitOpen):
                await mesh.ask("flaky/cb", Add(1), timeout=5, delivery="at_most_once")
            # other targets are unaffected
            assert await mesh.ask("ledger/cb", Read(), timeout=5, delivery="at_most_once") == 0
    finally:
        await node.stop()
