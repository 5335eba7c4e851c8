"""Split-brain merges after a real network partition (accord.testing.netlab): `split_brain_allowed`
agents written on both sides merge on heal — plain state by last writer (hybrid logical clock),
CRDT state by merging — and each merge is appended to `accord.<cluster>.events.merge` with its
documented fields. The lab (3 servers, 3 nodes in network namespaces) is test_partitions.py's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest

import accord
from accord import Degraded
from accord.testing import connect_retrying

from ._support import eventually
from .test_partitions import HOSTS, _agents_by_owner, _placed, _read, lab

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
__all__ = ["lab"]  # the fixture, imported for use here

from partition_app import Add, Read, SetTo  # noqa: E402  (on sys.path through test_partitions)

MERGE_FIELDS = {"agent", "from_node", "from_epoch", "hlc", "outcome", "by"}


async def _cut_off(mesh: accord.Mesh, probe: str) -> bool | None:
    """True once node-h1 serves as cut off: a degraded agent's write there is refused."""
    try:
        await mesh.ask(probe, Add(1), timeout=3, delivery="at_most_once")
    except Degraded:
        return True
    except accord.AccordError:
        return None
    return None


async def _until_ok(mesh: accord.Mesh, agent: str, msg: Any, what: str) -> int:
    async def attempt() -> int | None:
        try:
            return int(await mesh.ask(agent, msg, timeout=3, delivery="at_most_once"))
        except accord.AccordError:
            return None

    return await eventually(attempt, 60, what, interval=0.2)


async def _merge_events(urls: list[str], options: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every merge event, oldest first; None while JetStream does not answer (after a heal the
    servers elect stream leaders again). `options`: the lab's credentials and TLS."""
    nc = await nats.connect(urls, **options)
    try:
        js, out, seq = nc.jetstream(), [], 0
        while True:
            try:
                msg = await js.get_msg("accord_default_events", seq=seq + 1, next=True,
                                       subject="accord.default.events.merge")  # fmt: skip
            except nats.js.errors.NotFoundError:
                return out
            except (nats.errors.Error, TimeoutError):
                return None
            out.append(json.loads(msg.data))
            seq = int(msg.seq)
    finally:
        await nc.close()


async def test_split_brain_writes_merge_on_heal_and_each_merge_is_an_event(lab: Any) -> None:
    nats_cluster = lab.nats
    everyone = {f"node-{h}" for h in HOSTS}
    async with (
        connect_retrying(nats_cluster.urls) as everywhere,
        connect_retrying([nats_cluster.url("h1")]) as minority,
        connect_retrying([nats_cluster.url("h2")]) as majority,
    ):
        st = await _placed(everywhere, everyone)
        [probe] = _agents_by_owner(st, "deg_counter", 1)["node-h1"]
        theirs, ours = _agents_by_owner(st, "sb_register", 2)["node-h1"]
        [counter] = _agents_by_owner(st, "sb_counter", 1)["node-h1"]
        for a in (theirs, ours):  # in memory on node-h1 before the cut
            assert await everywhere.ask(a, SetTo(10), timeout=10) == 10
        assert await everywhere.ask(counter, Add(1), timeout=10) == 1
        for a in (theirs, ours, counter, probe):  # the minority's client knows the types
            await minority.ask(a, Read(), timeout=10)

        lab.partition([{"h1"}, {"h2", "h3"}])
        cut_at = time.monotonic()
        await eventually(lambda: _cut_off(minority, probe), 60, "node-h1 serving cut off")
        # `ours`: the cut-off side writes first, the majority later (its write is the newer).
        assert await minority.ask(ours, SetTo(1), timeout=5) == 1
        assert await minority.ask(counter, Add(1), timeout=5) == 2
        assert await _until_ok(majority, ours, SetTo(2), "the majority serving `ours`") == 2
        # `theirs`: the majority writes first, the cut-off side later (its write is the newer).
        assert await _until_ok(majority, theirs, SetTo(2), "the majority serving `theirs`") == 2
        assert await minority.ask(theirs, SetTo(1), timeout=5) == 1
        assert await _until_ok(majority, counter, Add(1), "the majority's counter") == 2
        both_served_s = time.monotonic() - cut_at

        lab.heal()

        async def merged() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None:
            found = await _merge_events(nats_cluster.urls, nats_cluster.client_options) or []
            from_cut_off = {e["agent"]: e for e in found if e.get("from_node") == "node-h1"}
            return (found, from_cut_off) if {theirs, ours, counter} <= set(from_cut_off) else None

        found, events = await eventually(
            merged, 90, "a merge event of node-h1's state for each agent", interval=0.5
        )
        # The majority may have served an agent before its lease ran out, on whichever of its
        # nodes took the ask (standby): that node's state is merged into the owner as well.
        for e in found:
            assert set(e) == MERGE_FIELDS, e
            assert e["from_node"] in everyone and e["by"] in everyone, e
            assert e["hlc"] > 0 and e["from_epoch"] > 0, e
        recorded = [(e["agent"], e["from_node"], e["from_epoch"], e["hlc"]) for e in found]
        assert len(recorded) == len(set(recorded)), f"a merge recorded twice: {found}"
        # `theirs`: the cut-off side's write is the newest of all, so it is adopted wherever.
        assert events[theirs]["outcome"] == "theirs", found
        # `ours`: the majority's write is the newer. node-h1's state is kept over what the owner
        # holds only if the majority's write had not reached the owner yet (served in standby
        # elsewhere); that write then comes later, and is adopted in turn.
        later = [e for e in found if e["agent"] == ours and e["from_node"] != "node-h1"]
        assert events[ours]["outcome"] == "ours" or any(e["outcome"] == "theirs" for e in later), (
            found
        )
        assert all(e["outcome"] == "merged" for e in found if e["agent"] == counter), found

        await _placed(everywhere, everyone, timeout=90)
        expected = {theirs: 1, ours: 2, counter: 3}  # 1 before the cut, +1 on each side

        async def converged() -> dict[str, int] | None:
            try:
                seen = {a: await _read(everywhere, a) for a in expected}
            except accord.AccordError:
                return None
            return seen if seen == expected else None

        await eventually(converged, 60, f"the merged values {expected}", interval=0.5)
    print(f"split-brain merge: both sides served {both_served_s:.1f}s after the cut")
