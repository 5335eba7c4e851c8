"""What the runtime appends to a cluster's events stream `accord_<cluster>_events`, read back with
nats-py from a real nats-server: failure-detector transitions (`events.fd`), quorum decisions
(`events.decision`) and split-brain merges (`events.merge`), each with its documented fields.
Service placement decisions (`events.placement`) are in test_service_promises.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext

import accord
from accord.cluster._hlc import HybridClock
from accord.crdt import GCounter
from accord.state._store import MergeState

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from coord_app import Plan, Voter  # noqa: E402
from durable_app import Add, Counts, GCount, Read, Total  # noqa: E402

FD_FIELDS = {"observer", "node", "old", "new", "reason", "at"}
DECISION_FIELDS = {"id", "topic", "outcome", "yes", "no", "need", "voters", "votes",
                   "decided_by", "at"}  # fmt: skip
MERGE_FIELDS = {"agent", "from_node", "from_epoch", "hlc", "outcome", "by"}


class Plain(accord.Agent, type="ev_plain", failover="split_brain_allowed"):
    """Non-CRDT state: a merge is last-writer-wins by HLC."""

    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        return self.state.total

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


AGENTS = [Voter, GCount, Plain]


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _node(url: str, cluster: str, name: str) -> accord.Node:
    settings = accord.NodeSettings(cluster=cluster)
    node = accord.Node(AGENTS, nats=url, name=name, settings=settings)
    await node.start()
    return node


async def _events(js: JetStreamContext, cluster: str, kind: str) -> list[dict[str, Any]]:
    """Every event of `kind` in the cluster's events stream, oldest first (one read each)."""
    stream, subject = f"accord_{cluster}_events", f"accord.{cluster}.events.{kind}"
    out, seq = [], 0
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(json.loads(msg.data))
        seq = int(msg.seq)


async def _until_event(
    js: JetStreamContext, cluster: str, kind: str, match: Any, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        events = await _events(js, cluster, kind)
        found = [e for e in events if match(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} event matched in time; the stream has {events}")
        await asyncio.sleep(0.05)


_attempts = itertools.count()


def _fresh(name: str) -> str:
    """A cluster name of this attempt's own: a rerun on the module's server must not read the
    events an earlier attempt appended."""
    return f"{name}{next(_attempts)}"


async def test_failure_detector_transitions_are_appended(
    nats_url: str, js: JetStreamContext
) -> None:
    cluster = _fresh("evfd")
    n1 = await _node(nats_url, cluster, "fd-1")
    try:
        n2 = await _node(nats_url, cluster, "fd-2")
        joined = await _until_event(
            js, cluster, "fd", lambda e: e["observer"] == "fd-1" and e["node"] == "fd-2"
        )
        assert set(joined) == FD_FIELDS
        assert joined["new"] == "alive" and joined["reason"] == "joined"
        assert abs(joined["at"] - time.time()) < 60  # the observer's wall time, in seconds
        await n2.stop()
        left = await _until_event(
            js, cluster, "fd",
            lambda e: e["observer"] == "fd-1" and e["node"] == "fd-2" and e["new"] == "left",
        )  # fmt: skip
        assert set(left) == FD_FIELDS
        assert left["old"] in ("alive", "suspect") and left["reason"]
        assert left["at"] >= joined["at"]
    finally:
        await n1.stop()


async def test_quorum_decisions_are_appended(nats_url: str, js: JetStreamContext) -> None:
    cluster = _fresh("evdec")
    node = await _node(nats_url, cluster, "dec-1")
    try:
        voters = ["voter/a", "voter/b", "voter/no1"]
        decision = await node.propose("release", Plan(True), voters=voters, deadline=10)
        assert decision.outcome == "accepted"
        event = await _until_event(js, cluster, "decision", lambda e: e["id"] == decision.id)
        assert set(event) == DECISION_FIELDS
        assert event == msgspec.to_builtins(decision)  # the very decision, as recorded
        assert event["topic"] == "release" and event["voters"] == 3
        assert event["votes"] == {"voter/a": True, "voter/b": True, "voter/no1": False}
        assert (event["yes"], event["no"], event["need"]) == (2, 1, 2)
        assert len(await _events(js, cluster, "decision")) == 1  # decided once, recorded once
    finally:
        await node.stop()


async def test_split_brain_merges_are_appended(nats_url: str, js: JetStreamContext) -> None:
    """A merge as a cut-off node sends it after healing (at-least-once, through the mailbox),
    for a last-writer-wins agent (a newer and an older peer state) and a CRDT one."""
    cluster = _fresh("evmerge")
    node = await _node(nats_url, cluster, "mg-1")
    try:
        await node.ask("ev_plain/p", Add(5), timeout=10)
        await node.ask("ev_plain/q", Add(5), timeout=10)
        await node.ask("gcount/g", Add(3), timeout=10)
        newer = HybridClock(lambda: time.time() + 3600).now()  # an hour ahead: wins
        older = 1 << 16  # 1 ms after the epoch: loses

        def merge(state: msgspec.Struct, hlc: int) -> MergeState:
            return MergeState(msgspec.Raw(msgspec.msgpack.encode(state)), hlc, "mg-cut", 42)

        plain_new = merge(Total(100), newer)
        await node.tell("ev_plain/p", plain_new, delivery="at_least_once", msg_id="m1")
        await node.tell("ev_plain/q", merge(Total(100), older), delivery="at_least_once",
                        msg_id="m2")  # fmt: skip
        crdt = Counts(GCounter().increment("mg-cut:42~x", 4))
        await node.tell("gcount/g", merge(crdt, older), delivery="at_least_once", msg_id="m3")

        theirs = await _until_event(js, cluster, "merge", lambda e: e["agent"] == "ev_plain/p")
        assert set(theirs) == MERGE_FIELDS
        assert theirs == {"agent": "ev_plain/p", "from_node": "mg-cut", "from_epoch": 42,
                          "hlc": newer, "outcome": "theirs", "by": "mg-1"}  # fmt: skip
        ours = await _until_event(js, cluster, "merge", lambda e: e["agent"] == "ev_plain/q")
        assert ours["outcome"] == "ours" and ours["hlc"] == older
        merged = await _until_event(js, cluster, "merge", lambda e: e["agent"] == "gcount/g")
        assert merged["outcome"] == "merged" and merged["by"] == "mg-1"
        # The same peer state merged again (a repeated send): the merge is recorded once. A
        # newer state sent after it is recorded once its own event is in, so is the repeat's.
        await node.tell("ev_plain/p", plain_new, delivery="at_least_once", msg_id="m4")
        await node.tell("ev_plain/p", merge(Total(100), newer + 1), delivery="at_least_once",
                        msg_id="m5")  # fmt: skip
        await _until_event(js, cluster, "merge", lambda e: e["hlc"] == newer + 1)
        events = await _events(js, cluster, "merge")
        assert [e["hlc"] for e in events if e["agent"] == "ev_plain/p"] == [newer, newer + 1]
        # The events tell what the state says.
        assert await node.ask("ev_plain/p", Read(), timeout=10) == 100
        assert await node.ask("ev_plain/q", Read(), timeout=10) == 5
        assert await node.ask("gcount/g", Read(), timeout=10) == 7
    finally:
        await node.stop()
