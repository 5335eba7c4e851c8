"""Quorum votes while voters' node processes are SIGKILLed mid-vote.

5 voters, 2 of them on a node killed while they deliberate: the vote is decided when 60% is still
reachable, expires otherwise, and the late votes redelivered after failover never change the
decision (never decided twice).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from accord._ids import shard_of
from accord.testing import Cluster, wait_for_placement

from ._support import ROOT, eventually, shard_owners

sys.path.insert(0, str(ROOT / "examples"))
from coord_app import Plan

pytestmark = pytest.mark.chaos
APP = str(ROOT / "examples" / "coord_app.py")


def _voters_on(owners: dict[int, tuple[str, int]], n: int, node: str, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        agent = f"voter/{prefix}{i}"
        if owners[shard_of(agent, 64)][0] == node:
            out.append(agent)
        i += 1
    return out


def _whole_lines(path: Path) -> set[str]:
    """The lines the voters finished appending to `path` (none if it is not there yet)."""
    return set(path.read_text().split("\n")[:-1]) if path.exists() else set()


@pytest.mark.parametrize("surviving_no", [False, True], ids=["reachable", "unreachable"])
async def test_vote_with_two_voters_killed_mid_vote(tmp_path: Path, surviving_no: bool) -> None:
    deliberating = tmp_path / "deliberating.log"
    env = {"ACCORD_VOTE_LOG": str(deliberating)}
    with Cluster(APP, 3, env=env, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            owners = shard_owners(await wait_for_placement(mesh, set(cluster.nodes)))
            doomed = _voters_on(owners, 2, "node-2", "d")
            alive = _voters_on(owners, 2, "node-1", "a")
            alive += _voters_on(owners, 1, "node-3", "no" if surviving_no else "a3")
            voters = alive + doomed
            vote = asyncio.create_task(
                mesh.propose("release", Plan(True, pause=0.6), voters=voters, deadline=1.8)
            )

            async def doomed_deliberating() -> bool | None:
                return set(doomed) <= _whole_lines(deliberating) or None

            # Both doomed voters got their request and are inside their 0.6 s deliberation.
            await eventually(doomed_deliberating, 10, "the doomed voters deliberating", 0.01)
            cluster.nodes["node-2"].kill()
            decision = await vote
            expected = "expired" if surviving_no else "accepted"
            assert decision.outcome == expected, decision
            assert not set(decision.votes) & set(doomed), "killed voters voted in time?"

            # After failover the doomed voters' requests are redelivered and they do vote ...
            ballots = mesh._ballots()
            record = await ballots.proposal(decision.id)
            assert record is not None

            async def all_votes() -> dict[str, bool] | None:
                votes = await ballots.votes(record)
                return votes if len(votes) == 5 else None

            late = await eventually(all_votes, 30, "the redelivered votes", interval=0.2)
            # ... but the decision stands: it was written once.
            assert await mesh.decision(decision.id) == decision
    print(f"{expected}: {decision.yes} yes / {decision.no} no of {decision.voters}; late {late}")
