"""Delivery guarantees and durable state under crashes and pauses of real node processes.

- exactly-once: 10,000 increments over 100 ledgers survive two SIGKILLs with every counter exact;
- at-least-once: a SIGKILL with 5,000 messages in flight loses none (duplicates are counted);
- fencing: a SIGSTOPped owner's write after SIGCONT is refused; the new owner's state stands;
- CRDT: a paused owner and its successor both accept writes; the stored value is the merge.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import msgspec
import pytest

import accord
from accord._ids import AgentId, shard_of
from accord.engine._api import BucketSpec
from accord.state._store import StateRecord, StateStore
from accord.testing import Cluster, wait_for_placement

from ._support import ROOT, eventually, shard_owners

sys.path.insert(0, str(ROOT / "examples"))
from durable_app import Add, Counts, Read, Total

pytestmark = pytest.mark.chaos
APP = str(ROOT / "examples" / "durable_app.py")


async def _tell_until_stored(mesh: accord.Mesh, target: str, msg: Add, outcomes: dict[str, int]):
    """Tell durably; on OutcomeUnknown retry with the same msg_id (safe by contract)."""
    while True:
        try:
            await mesh.tell(target, msg, msg_id=msg.id, timeout=5)
            outcomes["acked"] += 1
            return
        except accord.OutcomeUnknown:
            outcomes["unknown_retried"] += 1


async def test_exactly_once_increments_survive_two_sigkills(tmp_path: Path) -> None:
    counters = [f"ledger/c{i}" for i in range(100)]
    per_counter = 100
    with Cluster(APP, 3, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            outcomes = {"acked": 0, "unknown_retried": 0}
            messages = [(counters[i % 100], Add(1, id=f"m{i}")) for i in range(100 * per_counter)]
            queue: asyncio.Queue[tuple[str, Add]] = asyncio.Queue()
            for item in messages:
                queue.put_nowait(item)

            async def sender() -> None:
                while not queue.empty():
                    target, msg = queue.get_nowait()
                    await _tell_until_stored(mesh, target, msg, outcomes)

            senders = [asyncio.create_task(sender()) for _ in range(64)]

            async def chaos() -> None:
                await eventually(lambda: asyncio.sleep(0, outcomes["acked"] > 2500 or None),
                                 60, "a quarter of the tells")  # fmt: skip
                cluster.nodes["node-2"].kill()
                await wait_for_placement(mesh, {"node-1", "node-3"})
                cluster.add_node("node-2")  # restart
                await wait_for_placement(mesh, {"node-1", "node-2", "node-3"})
                await eventually(lambda: asyncio.sleep(0, outcomes["acked"] > 6000 or None),
                                 60, "60% of the tells")  # fmt: skip
                cluster.nodes["node-2"].kill()
                await wait_for_placement(mesh, {"node-1", "node-3"})

            await asyncio.gather(chaos(), *senders)
            assert outcomes["acked"] == len(messages)

            async def totals() -> dict[str, int] | None:
                out = {}
                for c in counters:
                    try:
                        out[c] = await mesh.ask(c, Read(), timeout=5, delivery="at_most_once")
                    except accord.AccordError:
                        return None
                return out if all(v >= per_counter for v in out.values()) else None

            final = await eventually(totals, 120, "every ledger to reach its total", interval=0.5)
    print(f"exactly-once: {outcomes}; totals {set(final.values())}")
    assert final == dict.fromkeys(counters, per_counter)


async def test_at_least_once_loses_nothing_when_a_node_dies_mid_flight(tmp_path: Path) -> None:
    log = tmp_path / "processed.jsonl"
    env = {"ACCORD_PROCESS_LOG": str(log)}
    with Cluster(APP, 3, env=env, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            ids = [f"t{i}" for i in range(5000)]
            acked: set[str] = set()

            async def send(chunk: list[str]) -> None:
                for mid in chunk:
                    msg = Add(1, id=mid, pause=0.002)
                    while True:
                        try:
                            await mesh.tell(f"tally/a{hash(mid) % 50}", msg, msg_id=mid)
                            acked.add(mid)
                            break
                        except accord.OutcomeUnknown:
                            continue

            await asyncio.gather(*(send(ids[i::32]) for i in range(32)))

            def processed() -> list[str]:
                lines = log.read_text().splitlines() if log.exists() else []
                return [json.loads(line)["id"] for line in lines]

            # Every tell is stored; kill a node while most are still queued or running.
            assert len(set(processed())) < len(ids), "kill must happen mid-flight"
            cluster.nodes["node-3"].kill()
            await wait_for_placement(mesh, {"node-1", "node-2"})
            await eventually(
                lambda: asyncio.sleep(0, len(set(processed())) == len(ids) or None),
                120,
                "every acknowledged message processed",
                interval=0.2,
            )
            seen = processed()
    duplicates = len(seen) - len(set(seen))
    print(f"at-least-once: {len(acked)} acked, {len(seen)} processings, {duplicates} duplicates")
    assert acked == set(ids)
    assert set(seen) == acked


def _whole_lines(path: Path) -> list[str]:
    """The lines a node process finished appending to `path` (none if it is not there yet)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _turn_log(tmp_path: Path) -> dict[str, str]:
    """The env that makes a slow turn report that it is inside (examples/durable_app.py)."""
    return {"ACCORD_TURN_LOG": str(tmp_path / "turns.jsonl")}


async def _pause_owner_mid_turn(
    cluster: Cluster, mesh: accord.Mesh, agent: str, msg: Add
) -> tuple[str, int, asyncio.Task[object]]:
    """Start a slow turn on `agent`'s owner, SIGSTOP the owner mid-turn, wait for takeover.

    Returns the paused owner, its epoch for the agent's shard, and the pending ask.
    """
    st = await wait_for_placement(mesh, set(cluster.nodes))
    owner, epoch = shard_owners(st)[shard_of(agent, mesh.config.num_shards)]
    await mesh.ask(agent, Read(), timeout=10)  # activate it on its owner
    turn = asyncio.create_task(mesh.ask(agent, msg, timeout=8))
    log = Path(cluster.env["ACCORD_TURN_LOG"])

    async def inside() -> bool | None:
        return any(json.loads(line)["id"] == agent for line in _whole_lines(log)) or None

    # The handler reports it changed the state and entered its pause (5 s): stop the owner now.
    await eventually(inside, 5, f"the owner of {agent} inside its slow turn", interval=0.01)
    cluster.nodes[owner].signal(signal.SIGSTOP)
    await wait_for_placement(mesh, set(cluster.nodes) - {owner}, timeout=30)
    return owner, epoch, turn


async def _state_store(mesh: accord.Mesh) -> StateStore:
    bucket = BucketSpec(name=mesh.names.bucket("state"))
    return StateStore(await mesh._transport.bucket(bucket, create=False))


async def test_fencing_a_resumed_owner_cannot_overwrite_the_new_owners_state(
    tmp_path: Path,
) -> None:
    agent = AgentId.parse("slow_ledger/f1")
    with Cluster(APP, 3, env=_turn_log(tmp_path), log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            store = await _state_store(mesh)
            owner, old_epoch, stale_turn = await _pause_owner_mid_turn(
                cluster, mesh, str(agent), Add(1000, pause=5)
            )
            seen_by_old_owner, old_revision = await store.load(agent)
            assert seen_by_old_owner is not None and seen_by_old_owner.epoch == old_epoch
            for _ in range(5):  # the new owner accepts and persists writes
                await mesh.ask(agent, Add(1), timeout=10)
            cluster.nodes[owner].signal(signal.SIGCONT)
            with pytest.raises(accord.DeliveryTimeout):
                await stale_turn  # the resumed owner never answers with its stale epoch
            record, _ = await store.load(agent)
            value = await mesh.ask(agent, Read(), timeout=10)
            # The write the old owner would make: its epoch, on the revision it last saw.
            stale = StateRecord(agent=str(agent), epoch=old_epoch, state=msgspec.Raw(
                msgspec.msgpack.encode(Total(1000))))  # fmt: skip
            with pytest.raises(accord.Fenced):
                await store.save(agent, stale, old_revision)
            after, _ = await store.load(agent)
    assert value == 5, "the stale owner's +1000 must not be in the state"
    assert record is not None and after is not None
    assert record.epoch > old_epoch, "the new owner's writes carry its newer epoch"
    assert after.state == record.state, "the refused write left the state untouched"


async def test_crdt_writes_accepted_by_two_owners_merge(tmp_path: Path) -> None:
    agent = "gcount/g1"
    with Cluster(APP, 3, env=_turn_log(tmp_path), log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            owner, _, stale_turn = await _pause_owner_mid_turn(
                cluster, mesh, agent, Add(1000, pause=5)
            )
            for _ in range(7):  # the successor accepts writes too
                await mesh.ask(agent, Add(1), timeout=10)
            cluster.nodes[owner].signal(signal.SIGCONT)
            with pytest.raises(accord.DeliveryTimeout):
                await stale_turn
            store = await _state_store(mesh)

            async def merged() -> int | None:
                record, _ = await store.load(AgentId.parse(agent))
                if record is None:
                    return None
                value = msgspec.msgpack.decode(record.state, type=Counts).hits.value
                return value if value == 1007 else None

            total = await eventually(merged, 20, "the stored counter to hold both sides' writes")
    assert total == 1007
