"""Partition scenarios on a real 3-server NATS cluster in network namespaces (accord.netlab).

Each host namespace runs one nats-server (R3 JetStream, sync_interval: always) and one accord node
connected only to its local server. Clients in the test process record every operation in a
history that `accord.history` checks; each scenario prints a JSON report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import accord
from accord import history as hist
from accord._ids import shard_of
from accord._status import cluster_status

from ._support import ROOT, ask_with_epoch, eventually

netlab = pytest.importorskip("accord.netlab")
sys.path.insert(0, str(ROOT / "examples"))
from partition_app import Add, Read  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
APP = str(ROOT / "examples" / "partition_app.py")
HOSTS = ("h1", "h2", "h3")


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"needs the `{tool}` command (apt-get install iproute2 nftables)"
    return None


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    reason = _usable()
    if reason:
        pytest.skip(reason)
    netlab.NetLab.cleanup_stale("accpart")
    with netlab.NetLab("accpart", hosts=3) as lab, netlab.NatsCluster(lab) as nats_cluster:
        nats_cluster.wait_ready(60)
        # 8 shards instead of 64: every lease renewal is an fsynced R3 write on 3 servers that
        # share 2 cores here; the scenarios need shards on every node, not many of them.
        asyncio.run(_create_cluster(nats_cluster.urls, num_shards=8))
        procs = {}
        for h in HOSTS:
            log = open(tmp_path / f"node-{h}.log", "ab")  # noqa: SIM115
            procs[h] = lab.run(
                h,
                [sys.executable, "-m", "accord", "node", "--nats", nats_cluster.url(h), "--app",
                 APP, "--name", f"node-{h}", "--replicas", "3"],
                stdout=log, stderr=log,
            )  # fmt: skip
            log.close()
        lab.nats = nats_cluster
        lab.nodes = procs
        try:
            yield lab
        finally:
            for p in procs.values():  # nodes before servers, so they can hand off
                netlab.stop_process(p, grace=10)


async def _create_cluster(urls: list[str], num_shards: int) -> None:
    import nats as nats_py

    from accord.cluster._config import Names, open_cluster

    nc = await nats_py.connect(urls)
    try:
        await open_cluster(nc.jetstream(), Names("default"), num_shards=num_shards, replicas=3)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _mesh(urls: list[str], name: str | None = None) -> AsyncIterator[accord.Mesh]:
    """A client; JetStream can be slow to answer while three servers and nodes start up."""
    for attempt in range(10):
        try:
            cm = accord.connect(urls, name=name)
            mesh = await cm.__aenter__()
            break
        except accord.NotConnected:
            if attempt == 9:
                raise
            await asyncio.sleep(1)
    try:
        yield mesh
    finally:
        await cm.__aexit__(None, None, None)


async def _placed(mesh: accord.Mesh, nodes: set[str], timeout: float = 60) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        try:
            st = await cluster_status(mesh, timeout=1.0)
        except accord.AccordError:
            return None
        owners = {s["owner"] for s in st["shards"]}
        return st if len(st["shards"]) == st["num_shards"] and owners == nodes else None

    return await eventually(probe, timeout, f"placement over {sorted(nodes)}", interval=0.2)


def _agents_by_owner(st: dict[str, Any], agent_type: str, per_node: int) -> dict[str, list[str]]:
    """`per_node` agents of `agent_type` owned by each node."""
    owners = {s["shard"]: s["owner"] for s in st["shards"]}
    out: dict[str, list[str]] = {}
    i = 0
    while min((len(v) for v in out.values()), default=0) < per_node or len(out) < 3:
        agent = f"{agent_type}/k{i}"
        owner = owners[shard_of(agent, st["num_shards"])]
        out.setdefault(owner, [])
        if len(out[owner]) < per_node:
            out[owner].append(agent)
        i += 1
    return out


async def _writer(
    mesh: accord.Mesh, agents: list[str], history: hist.History, side: str, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        agent = random.choice(agents)
        op = history.invoke(agent, "write", side)
        try:
            value, epoch, node = await ask_with_epoch(mesh, agent, Add(1), 2.0, returns=int)
        except accord.DeliveryTimeout as exc:
            history.fail(op, unknown=exc.maybe_delivered)
        except accord.AccordError as exc:
            # A turn whose state write could not reach the majority: it may still apply? No —
            # JetStream acks only committed writes — but stay conservative and call it unknown.
            history.fail(op, unknown=getattr(exc, "remote_type", "") == "NotConnected")
        except Exception:
            history.fail(op, unknown=True)
        else:
            history.ok(op, node, epoch, value)
        await asyncio.sleep(0.01)


async def _read(mesh: accord.Mesh, agent: str) -> int:
    return int(await mesh.ask(agent, Read(), timeout=5, delivery="at_most_once"))


@pytest.mark.wip  # not yet passing on a 2-core VM: see the issue note (majority stalls)
async def test_partitioned_minority_never_double_owns_absolute_agents(lab: Any) -> None:
    nats_cluster = lab.nats
    async with (
        _mesh(nats_cluster.urls) as everywhere,
        _mesh([nats_cluster.url("h1")]) as minority,
        _mesh([nats_cluster.url("h2")]) as majority,
    ):
        st = await _placed(everywhere, {f"node-{h}" for h in HOSTS})
        groups = _agents_by_owner(st, "abs_counter", 10)
        agents = [a for group in groups.values() for a in group]
        history = hist.History()
        stop = asyncio.Event()
        writers = [asyncio.create_task(_writer(m, agents, history, side, stop))
                   for m, side in ((minority, "minority"), (majority, "majority"))
                   for _ in range(4)]  # fmt: skip
        await asyncio.sleep(2)
        cut_at = time.monotonic()
        lab.partition([{"h1"}, {"h2", "h3"}])
        moved = groups["node-h1"]

        async def minority_agents_served_by_majority() -> bool | None:
            done = [
                o for o in history.ops
                if o.agent in moved and o.outcome == "ok" and o.side == "majority"
                and o.node != "node-h1" and o.invoke > cut_at
            ]  # fmt: skip
            return True if {o.agent for o in done} == set(moved) else None

        await eventually(minority_agents_served_by_majority, 60, "takeover by the majority")
        failover = max(
            min(o.complete for o in history.ops if o.agent == a and o.outcome == "ok"
                and o.side == "majority" and o.node != "node-h1" and o.invoke > cut_at)
            for a in moved
        ) - cut_at  # fmt: skip
        await asyncio.sleep(3)
        lab.heal()
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*writers)
        await _placed(everywhere, {f"node-{h}" for h in HOSTS})
        final = {a: await _read(everywhere, a) for a in agents}
    violations = hist.single_owner_violations(history.ops)
    violations += hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, failover)
    print("absolute partition:", report.json())
    assert violations == []
    assert report.ok > 0 and failover > 0


@pytest.mark.wip  # not yet passing on a 2-core VM: see the issue note (majority stalls)
async def test_split_brain_crdt_counters_accept_on_both_sides_and_converge(lab: Any) -> None:
    nats_cluster = lab.nats
    async with (
        _mesh(nats_cluster.urls) as everywhere,
        _mesh([nats_cluster.url("h1")]) as minority,
        _mesh([nats_cluster.url("h2")]) as majority,
    ):
        st = await _placed(everywhere, {f"node-{h}" for h in HOSTS})
        agents = _agents_by_owner(st, "sb_counter", 5)["node-h1"]
        history = hist.History()
        stop = asyncio.Event()
        lab.partition([{"h1"}, {"h2", "h3"}])
        cut_at = time.monotonic()
        writers = [asyncio.create_task(_writer(m, agents, history, side, stop))
                   for m, side in ((minority, "minority"), (majority, "majority"))
                   for _ in range(2)]  # fmt: skip

        async def both_sides_accepting() -> bool | None:
            sides = {o.side for o in history.ops if o.outcome == "ok" and o.invoke > cut_at + 3}
            return True if sides == {"minority", "majority"} else None

        await eventually(both_sides_accepting, 60, "both sides to accept writes")
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*writers)
        lab.heal()
        ok = {a: sum(1 for o in history.ops if o.agent == a and o.outcome == "ok") for a in agents}
        unknown = {a: sum(1 for o in history.ops if o.agent == a and o.outcome == "unknown")
                   for a in agents}  # fmt: skip

        async def converged() -> dict[str, dict[str, int]] | None:
            try:
                seen = {a: {"minority": await _read(minority, a),
                            "majority": await _read(majority, a)} for a in agents}  # fmt: skip
            except accord.AccordError:
                return None
            good = all(len(set(v.values())) == 1 and ok[a] <= v["majority"] <= ok[a] + unknown[a]
                       for a, v in seen.items())  # fmt: skip
            return seen if good else None

        seen = await eventually(converged, 90, "convergence after heal", interval=0.5)
    final = {a: v["majority"] for a, v in seen.items()}
    violations = hist.convergence_violations(seen)
    violations += hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, accepted_by={
        side: sum(1 for o in history.ops if o.side == side and o.outcome == "ok")
        for side in ("minority", "majority")})  # fmt: skip
    print("split-brain partition:", report.json())
    assert violations == []
    assert (
        report.extra["accepted_by"]["minority"] > 0 and report.extra["accepted_by"]["majority"] > 0
    )


@pytest.mark.wip  # not yet passing on a 2-core VM: see the issue note (majority stalls)
async def test_killing_the_state_stream_leader_loses_no_acknowledged_write(lab: Any) -> None:
    nats_cluster = lab.nats
    async with _mesh(nats_cluster.urls) as everywhere:
        st = await _placed(everywhere, {f"node-{h}" for h in HOSTS})
        groups = _agents_by_owner(st, "abs_counter", 5)
        agents = [a for g in groups.values() for a in g]
        leader = await nats_cluster.leader_of("KV_accord_default_state")
        assert leader in HOSTS
        survivors = [h for h in HOSTS if h != leader]
        history = hist.History()
        stop = asyncio.Event()
        async with _mesh([nats_cluster.url(h) for h in survivors]) as client:
            writers = [asyncio.create_task(_writer(client, agents, history, "x", stop))
                       for _ in range(4)]  # fmt: skip
            await asyncio.sleep(2)
            killed_at = time.monotonic()
            nats_cluster.kill(leader)
            await asyncio.sleep(12)
            stop.set()
            await asyncio.gather(*writers)
            live = {f"node-{h}" for h in survivors}
            await _placed(client, live, timeout=60)
            final = {a: await _read(client, a) for a in agents}
    oks = sorted(o.complete for o in history.ops if o.outcome == "ok")
    before = [t for t in oks if t < killed_at]
    after = [t for t in oks if t > killed_at]
    pause = (after[0] - killed_at) if after else None
    violations = hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, pause, killed=leader)
    print("stream leader kill:", report.json())
    assert violations == []
    assert before and after, "writes must succeed before and after the leader kill"


async def test_election_under_partition_has_one_leader_and_fences_the_deposed(lab: Any) -> None:
    nats_cluster = lab.nats
    intervals: list[tuple[str, int, float, float]] = []  # (host, token, start, end)
    stop = asyncio.Event()

    async def campaign(host: str) -> None:
        async with _mesh([nats_cluster.url(host)], name=f"campaign-{host}") as mesh:
            async for term in mesh.election("partition-leader", ttl=2):
                start = time.monotonic()
                while term.valid and not stop.is_set():
                    await asyncio.sleep(0.01)
                intervals.append((host, term.token, start, time.monotonic()))
                if stop.is_set():
                    return

    campaigns = [asyncio.create_task(campaign(h)) for h in HOSTS]
    async with _mesh(nats_cluster.urls) as everywhere:

        async def current() -> Any:
            held = [i for i in await everywhere._keeper().list() if i.name == "partition-leader"]
            return held[0] if held else None

        first = await eventually(current, 30, "a first leader")
        deposed = first.holder.removeprefix("campaign-")
        majority_hosts = sorted(set(HOSTS) - {deposed})
        lab.partition([{deposed}, set(majority_hosts)])

        async with _mesh([nats_cluster.url(h) for h in majority_hosts]) as majority:

            async def new_leader() -> Any:
                try:
                    held = await majority._keeper().list()
                except accord.AccordError:
                    return None
                now = [i for i in held if i.name == "partition-leader"]
                return now[0] if now and now[0].token > first.token else None

            second = await eventually(new_leader, 60, "a leader on the majority side", 0.2)
        lab.heal()
        await asyncio.sleep(2)
        stop.set()
        await asyncio.wait(campaigns, timeout=20)
        await everywhere.fenced_write("job", b"leader output", second.token)
        with pytest.raises(accord.Fenced):
            await everywhere.fenced_write("job", b"stale", first.token)
    overlaps = [
        f"{a} overlaps {b}"
        for a in intervals
        for b in intervals
        if a[1] < b[1] and a[3] > b[2] + 0.05  # the older term outlived the newer one's start
    ]
    report = hist.report(hist.History(), overlaps, terms=len(intervals), deposed=deposed,
                         new_holder=second.holder)  # fmt: skip
    print("election partition:", report.json())
    assert second.holder != first.holder
    assert overlaps == []
