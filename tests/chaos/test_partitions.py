"""Partition scenarios on a real 3-server NATS cluster in network namespaces (accord.netlab).

Each host namespace runs one nats-server (R3 JetStream, sync_interval: always) and one accord node
connected only to its local server. The servers run the configurations `accord server config`
generates for three machines: authentication (NKey users, role permissions) and TLS on client
connections and routes. The lease, state and membership streams are led by the
server that is cut off or killed (the slowest failover: all three must elect a new leader).
Clients in the test process record every operation in a history that `accord.history` checks;
each scenario prints a JSON report. Node and server logs stay in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import accord
from accord._ids import AgentId, shard_of
from accord.cluster._placement import assign
from accord.engine._api import BucketSpec, NoResponders
from accord.state._store import StateStore
from accord.testing import connect_retrying
from accord.testing import history as hist

from ._support import ROOT, ask_with_epoch, eventually

netlab = pytest.importorskip("accord.testing.netlab")
sys.path.insert(0, str(ROOT / "examples"))
from partition_app import Add, Read  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
APP = str(ROOT / "examples" / "partition_app.py")
HOSTS = ("h1", "h2", "h3")
NODE_LOG = os.environ.get("ACCORD_TEST_NODE_LOG", "info")  # "debug" to see lease attempts


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"needs the `{tool}` command (apt-get install iproute2 nftables)"
    return None


def _secure_configs(lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`accord server config` for the lab's three hosts (NKey users with role permissions, TLS
    on clients and routes, a route password, fsync always), as a user deploying on three
    machines would run it; the test process and the nodes use the `node` credential it
    wrote, through $ACCORD_CREDS / $ACCORD_TLS_CA."""
    from accord.engine._auth import Credentials

    out = tmp_path / "conf"
    ips = [lab.ip(h) for h in HOSTS]
    done = subprocess.run(
        [sys.executable, "-m", "accord", "server", "config", "--hosts", ",".join(ips),
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "ACCORD_HOME": str(tmp_path / "admin")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("ACCORD_CREDS", str(out / "node.creds"))
    monkeypatch.setenv("ACCORD_TLS_CA", str(out / "ca.pem"))
    opts = Credentials(out / "node.creds", out / "ca.pem").connect_options()
    return {"configs": {h: out / f"{lab.ip(h)}.conf" for h in HOSTS}, "client_options": opts}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = _usable()
    if reason:
        pytest.skip(reason)
    netlab.NetLab.cleanup_stale("accpart")
    nats_dir = tmp_path / "nats"  # server logs stay with the node logs for diagnosis
    with (
        netlab.NetLab("accpart", hosts=3) as lab,
        netlab.NatsCluster(
            lab, base_dir=nats_dir, **_secure_configs(lab, tmp_path, monkeypatch)
        ) as nats_cluster,
    ):
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
                 APP, "--name", f"node-{h}", "--replicas", "3", "--log-level", NODE_LOG],
                stdout=log, stderr=log,
            )  # fmt: skip
            log.close()
        lab.nats = nats_cluster
        lab.nodes = procs
        try:
            _wait_nodes_up(tmp_path, procs, 60)
            yield lab
            exited = {h: p.returncode for h, p in procs.items() if p.poll() is not None}
            assert not exited, f"node processes exited during the scenario: {exited}"
        finally:
            for p in procs.values():  # nodes before servers, so they can hand off
                netlab.stop_process(p, grace=10)


def _wait_nodes_up(logs: Path, procs: dict[str, Any], timeout: float) -> None:
    """Block until every node logged that its start finished (shards may be placed earlier)."""
    deadline = time.monotonic() + timeout
    waiting = set(procs)
    while waiting:
        for h in list(waiting):
            if procs[h].poll() is not None:
                raise AssertionError(f"node-{h} exited during start: {procs[h].returncode}")
            if f"node node-{h} up" in (logs / f"node-{h}.log").read_text(errors="replace"):
                waiting.discard(h)
        if waiting and time.monotonic() > deadline:
            raise AssertionError(f"nodes not up after {timeout}s: {sorted(waiting)}")
        time.sleep(0.1)


async def _create_cluster(urls: list[str], num_shards: int) -> None:
    from accord.cluster._config import Names, open_cluster
    from accord.delivery._mailbox import ensure_streams
    from accord.engine._nats import NatsTransport
    from accord.engine._resolve import resolve_credentials

    # Created here, one at a time, rather than by three starting nodes at once: R3 stream
    # creation on 2 busy cores can outlast a node's 5 s JetStream API timeout.
    js = await NatsTransport.connect(urls, "test-setup", credentials=resolve_credentials(urls))
    try:
        names = Names("default")
        _, buckets = await open_cluster(js, names, num_shards=num_shards, replicas=3)
        await ensure_streams(js, names, 3)
        with contextlib.suppress(ImportError):  # the node agent's buckets (services)
            from accord.services._store import ServiceStore

            await ServiceStore.open(js, names, buckets.members, 3)
    finally:
        await js.close()


_mesh = connect_retrying  # retried: JetStream can be slow to answer while the lab starts


async def _placed(mesh: accord.Mesh, nodes: set[str], timeout: float = 60) -> dict[str, Any]:
    """Wait until every shard is owned, by all of `nodes` between them, in the view of every one
    of them alike (one node's view can be stale right after a heal), each holds what the others
    say it does, and the shards are where placement puts them for `nodes` (until then a node can
    still hand shards off: an agent picked by its owner here would move). Returns that
    placement as {"num_shards", "shards": [{shard, owner}]}."""

    async def view(node: str) -> dict[str, Any]:
        subject = f"{mesh.names.admin_subject}.{node}"
        return dict(msgspec.json.decode(await mesh._sender.transport_request(subject, b"{}", 1.0)))

    async def probe() -> dict[str, Any] | None:
        try:
            views = {node: await view(node) for node in nodes}
        except accord.AccordError:
            return None
        leases = [{int(s): o for s, (o, _) in v["leases"].items()} for v in views.values()]
        agreed = leases[0]
        num_shards = views[next(iter(nodes))]["num_shards"]
        if any(other != agreed for other in leases) or len(agreed) != num_shards:
            return None  # the nodes disagree, or a shard is free
        if set(agreed.values()) != nodes or any(
            {s for s, o in agreed.items() if o == node} != {int(s) for s in v["held"]}
            for node, v in views.items()
        ):
            return None  # a node without shards, or a handoff under way
        if agreed != assign(num_shards, sorted(nodes)):
            return None  # not yet where placement puts them: a rebalance is still to come
        shards = [{"shard": s, "owner": o} for s, o in sorted(agreed.items())]
        return {"num_shards": num_shards, "shards": shards}

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
        except NoResponders:
            history.fail(op, unknown=False)  # nobody subscribed: the server delivered it nowhere
        except Exception:
            # No reply in time, an error reply (e.g. a state write JetStream did not confirm),
            # a connection lost mid-request: the increment may or may not have been applied.
            history.fail(op, unknown=True)
        else:
            history.ok(op, node, epoch, value)
        await asyncio.sleep(0.01)


async def _read(mesh: accord.Mesh, agent: str) -> int:
    return int(await mesh.ask(agent, Read(), timeout=5, delivery="at_most_once"))


RAFT_GROUPS = ("KV_accord_default_leases", "KV_accord_default_state", "KV_accord_default_members")


async def _lead_from(nats_cluster: Any, host: str) -> None:
    """Make `host` lead the lease, state and membership streams: cutting it off (or killing it)
    then forces all three to elect a new leader — the slowest failover."""
    for stream in RAFT_GROUPS:
        await nats_cluster.move_leader(stream, host)


async def _stored_state(mesh: accord.Mesh, agent: str) -> Any:
    """The agent's state record as stored (for failure messages)."""
    with contextlib.suppress(Exception):
        bucket = BucketSpec(name=mesh.names.bucket("state"))
        store = StateStore(await mesh._transport.bucket(bucket, create=False))
        record, rev = await store.load(AgentId.parse(agent))
        if record is not None:
            state = msgspec.msgpack.decode(record.state)
            return {"epoch": record.epoch, "rev": rev, "state": state}
    return None


async def _async(value: Any) -> Any:
    """`value` as an awaitable, for `eventually` probes that need no I/O."""
    return value


def _answered_since(
    history: hist.History, agents: list[str], since: float, sides: set[str] | None = None
) -> dict[str, float] | None:
    """agent -> seconds from `since` to its first ok answer to an op invoked after `since` (on
    each of `sides`, latest side counts), once every agent has one; else None."""
    first: dict[tuple[str, str], float] = {}
    for o in history.ops:
        if o.outcome == "ok" and o.invoke > since and (sides is None or o.side in sides):
            key = (o.agent, o.side if sides else "")
            first[key] = min(first.get(key, o.complete), o.complete)
    out: dict[str, float] = {}
    for a in agents:
        times = [first.get((a, side)) for side in (sides or {""})]
        if any(t is None for t in times):
            return None
        out[a] = max(t for t in times if t is not None) - since
    return out


async def test_partitioned_minority_never_double_owns_absolute_agents(lab: Any) -> None:
    nats_cluster = lab.nats
    everyone = {f"node-{h}" for h in HOSTS}
    async with (
        _mesh(nats_cluster.urls) as everywhere,
        _mesh([nats_cluster.url("h1")]) as minority,
        _mesh([nats_cluster.url("h2")]) as majority,
    ):
        await _lead_from(nats_cluster, "h1")
        st = await _placed(everywhere, everyone)
        groups = _agents_by_owner(st, "abs_counter", 10)
        agents = [a for group in groups.values() for a in group]
        history = hist.History()
        stop = asyncio.Event()
        writers = [asyncio.create_task(_writer(m, agents, history, side, stop))
                   for m, side in ((minority, "minority"), (majority, "majority"))
                   for _ in range(4)]  # fmt: skip
        both = {"minority", "majority"}
        await eventually(
            lambda: _async(_answered_since(history, agents, 0, both)), 30, "traffic before the cut"
        )
        cut_at = time.monotonic()
        lab.partition([{"h1"}, {"h2", "h3"}])
        moved = groups["node-h1"]

        async def minority_agents_served_by_majority() -> dict[str, float] | None:
            return _answered_since(history, moved, cut_at, {"majority"})

        taken = await eventually(minority_agents_served_by_majority, 60, "takeover by majority")
        failover = max(taken.values())
        healed_at = time.monotonic()
        lab.heal()
        # Recovery: every agent answers again on both sides (the minority's server rejoined).
        back = await eventually(
            lambda: _async(_answered_since(history, agents, healed_at, both)),
            60,
            "every agent answering on both sides after the heal",
            interval=0.2,
        )
        stop.set()
        await asyncio.gather(*writers)
        await _placed(everywhere, everyone)
        placed_s = time.monotonic() - healed_at
        final = {a: await _read(everywhere, a) for a in agents}
    violations = hist.single_owner_violations(history.ops)
    violations += hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, round(failover, 2),
                         recovered_after_heal_s=round(max(back.values()), 2),
                         placed_after_heal_s=round(placed_s, 2))  # fmt: skip
    print("absolute partition:", report.json())
    assert violations == []
    assert report.ok > 0 and failover > 0


async def test_split_brain_crdt_counters_accept_on_both_sides_and_converge(lab: Any) -> None:
    nats_cluster = lab.nats
    everyone = {f"node-{h}" for h in HOSTS}
    async with (
        _mesh(nats_cluster.urls) as everywhere,
        _mesh([nats_cluster.url("h1")]) as minority,
        _mesh([nats_cluster.url("h2")]) as majority,
    ):
        await _lead_from(nats_cluster, "h1")
        st = await _placed(everywhere, everyone)
        agents = _agents_by_owner(st, "sb_counter", 5)["node-h1"]
        history = hist.History()
        stop = asyncio.Event()
        lab.partition([{"h1"}, {"h2", "h3"}])
        cut_at = time.monotonic()
        writers = [asyncio.create_task(_writer(m, agents, history, side, stop))
                   for m, side in ((minority, "minority"), (majority, "majority"))
                   for _ in range(2)]  # fmt: skip

        async def both_sides_accepting() -> dict[str, float] | None:
            # every agent written on both sides, once the majority has taken the shards over
            return _answered_since(history, agents, cut_at + 3, {"minority", "majority"})

        await eventually(both_sides_accepting, 60, "both sides to accept writes")

        async def routes_dropped() -> bool | None:
            # Until the servers close the routes across the cut, what they queued to the other
            # side is delivered when it heals, to the cut-off node too (applied twice).
            seen = await asyncio.to_thread(lambda: {h: nats_cluster.routed(h) for h in HOSTS})
            crossing = "h1" in seen["h2"] | seen["h3"] or bool(seen["h1"] & {"h2", "h3"})
            return None if crossing else True

        await eventually(routes_dropped, 30, "the servers to drop the routes across the cut")
        stop.set()
        await asyncio.gather(*writers)
        healed_at = time.monotonic()
        lab.heal()
        ok = {a: sum(1 for o in history.ops if o.agent == a and o.outcome == "ok") for a in agents}
        unknown = {a: sum(1 for o in history.ops if o.agent == a and o.outcome == "unknown")
                   for a in agents}  # fmt: skip

        last: list[Any] = []

        async def converged() -> dict[str, dict[str, int]] | None:
            try:
                seen = {a: {"minority": await _read(minority, a),
                            "majority": await _read(majority, a)} for a in agents}  # fmt: skip
            except accord.AccordError as exc:
                last[:] = [exc]
                return None
            last[:] = [seen]
            good = all(len(set(v.values())) == 1 and ok[a] <= v["majority"] <= ok[a] + unknown[a]
                       for a, v in seen.items())  # fmt: skip
            return seen if good else None

        try:
            seen = await eventually(converged, 90, "convergence after heal", interval=0.5)
        except AssertionError as exc:
            stored = {a: await _stored_state(everywhere, a) for a in agents}
            by_side = {a: {side: sum(1 for o in history.ops if o.agent == a and o.side == side
                                     and o.outcome == "ok") for side in ("minority", "majority")}
                       for a in agents}  # fmt: skip
            raise AssertionError(f"{exc}; ok {ok} ({by_side}), unknown {unknown}, last read "
                                 f"{last}, stored {stored}") from None  # fmt: skip
        converged_s = time.monotonic() - healed_at
        await _placed(everywhere, everyone)
        placed_s = time.monotonic() - healed_at
    final = {a: v["majority"] for a, v in seen.items()}
    violations = hist.convergence_violations(seen)
    violations += hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, accepted_by={
        side: sum(1 for o in history.ops if o.side == side and o.outcome == "ok")
        for side in ("minority", "majority")}, converged_after_heal_s=round(converged_s, 2),
        placed_after_heal_s=round(placed_s, 2))  # fmt: skip
    print("split-brain partition:", report.json())
    assert violations == []
    assert (
        report.extra["accepted_by"]["minority"] > 0 and report.extra["accepted_by"]["majority"] > 0
    )


async def test_killing_the_state_stream_leader_loses_no_acknowledged_write(lab: Any) -> None:
    nats_cluster = lab.nats
    everyone = {f"node-{h}" for h in HOSTS}
    async with _mesh(nats_cluster.urls) as everywhere:
        st = await _placed(everywhere, everyone)
        groups = _agents_by_owner(st, "abs_counter", 5)
        agents = [a for g in groups.values() for a in g]
        leader = await nats_cluster.leader_of("KV_accord_default_state")
        assert leader in HOSTS
        await _lead_from(nats_cluster, leader)
        survivors = [h for h in HOSTS if h != leader]
        history = hist.History()
        stop = asyncio.Event()
        async with _mesh([nats_cluster.url(h) for h in survivors]) as client:
            await _placed(client, everyone)
            writers = [asyncio.create_task(_writer(client, agents, history, "x", stop))
                       for _ in range(4)]  # fmt: skip
            await eventually(
                lambda: _async(_answered_since(history, agents, 0)), 30, "traffic before the kill"
            )
            killed_at = time.monotonic()
            nats_cluster.kill(leader)
            back = await eventually(
                lambda: _async(_answered_since(history, agents, killed_at)),
                60,
                "every agent answering after the kill",
                interval=0.2,
            )
            stop.set()
            await asyncio.gather(*writers)
            # The killed server's node reconnects to a surviving server (nats-py learns the
            # cluster's servers from the one it was given) and keeps its place.
            await _placed(client, everyone, timeout=60)
            final = {a: await _read(client, a) for a in agents}
    oks = sorted(o.complete for o in history.ops if o.outcome == "ok")
    # The pause: the longest time without any acknowledged write, from the kill until every
    # agent had answered again (writes in flight at the kill may still complete first).
    window = [killed_at] + [t for t in oks if killed_at < t <= killed_at + max(back.values())]
    pause = max(b - a for a, b in itertools.pairwise(window))
    violations = hist.lost_write_violations(history.ops, final)
    report = hist.report(history, violations, round(pause, 2), killed=leader,
                         all_agents_back_s=round(max(back.values()), 2))  # fmt: skip
    print("stream leader kill:", report.json())
    assert violations == []
    assert any(t < killed_at for t in oks) and len(window) > 1, "writes before and after the kill"


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
        # The servers re-form the routes and JetStream re-elects where the healed server
        # campaigned meanwhile: wait until the cluster is whole again.
        await asyncio.to_thread(nats_cluster.wait_ready, 60)
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
