"""Coordination on a real nats-server: named leases and fencing tokens, elections, fenced writes,
quorum decisions (never decided twice), barriers and counters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

import accord


class Plan(msgspec.Struct):
    approve: bool


class Voter(accord.Agent, type="coord-voter"):
    @accord.handler
    async def vote(self, req: accord.VoteRequest) -> bool:
        plan = msgspec.msgpack.decode(req.proposal, type=Plan)
        return plan.approve or self.id.key.startswith("yes")


@pytest.fixture
async def mesh(nats_url: str) -> AsyncIterator[accord.Mesh]:
    cluster = f"co{uuid.uuid4().hex[:8]}"
    node = accord.Node([Voter], nats=nats_url, settings=accord.NodeSettings(cluster=cluster))
    async with node, accord.connect(nats_url, cluster=cluster) as m:
        yield m


async def test_a_lease_has_one_holder_and_tokens_grow_with_each_holder(mesh: accord.Mesh) -> None:
    async with mesh.lease("jobs", ttl=2) as first:
        assert first.valid
        with pytest.raises(accord.LeaseLost):
            async with mesh.lease("jobs", ttl=2, timeout=0.5):
                pass
    assert not first.valid and first.lost.is_set()  # released on exit
    async with mesh.lease("jobs", ttl=2) as second:
        assert second.token > first.token
        with pytest.raises(accord.LeaseLost):
            first.check()


async def test_a_deposed_holders_token_is_refused_by_fenced_write(mesh: accord.Mesh) -> None:
    async with mesh.lease("writer", ttl=2) as old:
        await mesh.fenced_write("report", b"v1", old.token)
    async with mesh.lease("writer", ttl=2) as new:
        await mesh.fenced_write("report", b"v2", new.token)
    with pytest.raises(accord.Fenced):
        await mesh.fenced_write("report", b"stale", old.token)
    assert await mesh.fenced_read("report") == (new.token, b"v2")


async def test_competing_campaigns_have_at_most_one_leader(mesh: accord.Mesh) -> None:
    terms: list[tuple[int, int]] = []  # (campaigner, token)
    active: set[int] = set()
    overlaps: list[set[int]] = []

    async def campaign(i: int) -> None:
        async for term in mesh.election("sched", ttl=2):
            if active:
                overlaps.append({*active, i})
            active.add(i)
            terms.append((i, term.token))
            await asyncio.sleep(0.2)
            active.discard(i)
            return  # resign; another campaigner wins the next term

    for _ in range(2):
        await asyncio.gather(*(campaign(i) for i in range(3)))
    assert overlaps == [], "two leaders at once"
    assert len(terms) == 6
    tokens = [t for _, t in terms]
    assert tokens == sorted(tokens) and len(set(tokens)) == 6, "each term has a newer token"


async def test_quorum_accepts_rejects_and_records_every_vote(mesh: accord.Mesh) -> None:
    voters = [f"coord-voter/v{i}" for i in range(5)]
    accepted = await mesh.propose("deploy", Plan(True), voters=voters, deadline=10)
    assert accepted.outcome == "accepted" and accepted.need == 3 and accepted.yes >= 3
    rejected = await mesh.propose("deploy", Plan(False), voters=voters, deadline=10)
    assert rejected.outcome == "rejected" and rejected.no >= 3
    assert await mesh.decision(accepted.id) == accepted
    mixed = ["coord-voter/yes1", "coord-voter/yes2", "coord-voter/yes3", "coord-voter/n1",
             "coord-voter/n2"]  # fmt: skip
    three_of_five = await mesh.propose("deploy", Plan(False), voters=mixed, deadline=10)
    assert three_of_five.outcome == "accepted"  # 60% of 5 = 3 yes votes


async def test_a_proposal_is_never_decided_twice(mesh: accord.Mesh) -> None:
    from accord.coord._quorum import ProposalRecord

    ballots = mesh._ballots()
    record = ProposalRecord(id=uuid.uuid4().hex, topic="t", voters=["a/1", "a/2"], quorum=0.6,
                            proposer="test", created_at=0.0)  # fmt: skip
    await ballots.open(record)
    decisions = await asyncio.gather(
        *(
            ballots.decide(record, o, {}, f"racer{i}")
            for i, o in enumerate(["accepted", "expired", "rejected", "expired"] * 5)
        )
    )
    assert len({(d.outcome, d.decided_by) for d in decisions}) == 1
    assert await ballots.decision(record.id) == decisions[0]


async def test_a_vote_that_cannot_reach_quorum_in_time_expires(mesh: accord.Mesh) -> None:
    ghosts = [f"nobody-hosts-this/v{i}" for i in range(3)]
    voters = ["coord-voter/yes1", "coord-voter/yes2", *ghosts]  # 2 reachable of 5
    decision = await mesh.propose("deploy", Plan(True), voters=voters, deadline=1.5)
    assert decision.outcome == "expired"
    assert decision.yes == 2 and decision.need == 3


async def test_barrier_releases_when_all_parties_arrived(mesh: accord.Mesh) -> None:
    results = await asyncio.gather(
        *(mesh.barrier("phase1", 4, member=f"m{i}", timeout=10) for i in range(4))
    )
    assert results == [4, 4, 4, 4]
    with pytest.raises(accord.DeliveryTimeout):
        await mesh.barrier("phase2", 2, member="alone", timeout=0.3)


async def test_counter_adds_from_many_tasks_are_not_lost(mesh: accord.Mesh) -> None:
    await asyncio.gather(*(mesh.counter_add("hits", 1) for _ in range(50)))
    assert await mesh.counter("hits") == 50


async def test_cli_lists_leases_with_holder_and_token(mesh: accord.Mesh, nats_url: str) -> None:
    import json
    import subprocess
    import sys

    async with mesh.lease("nightly-report", ttl=5) as lease:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "accord", "leases", "--json", "--nats", nats_url,
            "--cluster", mesh.names.cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    listed = {e["name"]: e for e in json.loads(out)}
    assert listed["nightly-report"]["holder"] == mesh.name
    assert listed["nightly-report"]["token"] == lease.token
