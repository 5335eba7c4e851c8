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

        async def merged() -> dict[str, dict[str, Any]] | None:
            found = await _merge_events(nats_cluster.urls, nats_cluster.client_options)
            by_agent = {e["agent"]: e for e in found or []}
            return by_agent if {theirs, ours, counter} <= set(by_agent) else None

        events = await eventually(merged, 90, "a merge event for each agent", interval=0.5)
        for a in (theirs, ours, counter):
            assert set(events[a]) == MERGE_FIELDS, events[a]
            assert events[a]["from_node"] == "node-h1" and events[a]["by"] in everyone
            assert events[a]["hlc"] > 0 and events[a]["from_epoch"] > 0
        assert events[theirs]["outcome"] == "theirs"
        assert events[ours]["outcome"] == "ours"
        assert events[counter]["outcome"] == "merged"

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
