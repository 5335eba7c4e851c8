"""The `<svc>.replace` and `<svc>.latency` promises a service spec makes, assessed by the
services controller of one real node process and recorded in the ledger with their evidence; and
the controller's placement decision appended to the events stream (`events.placement`)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

import accord
from accord.services import deploy, parse_spec, services, undeploy
from accord.services._promises import store_for
from accord.services._store import Assessment
from accord.testing import Cluster
from tests.chaos._support import eventually

ROOT = Path(__file__).resolve().parents[2]
WEB_APP = str(ROOT / "examples" / "services" / "web_app.py")
CLUSTER = "svcprom"
SUBJECT = f"accord.{CLUSTER}.events.placement"
PLACEMENT_FIELDS = {"kind", "service", "by", "token", "at", "slots", "previous"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(str(ROOT / "examples" / "counter_app.py"), 1, cluster=CLUSTER) as c:
        yield c


@pytest.fixture
async def mesh(cluster: Cluster) -> AsyncIterator[accord.Mesh]:
    async with cluster.connect() as m:
        store = await store_for(m)

        async def live() -> list[Any] | None:
            return (await store.nodes()) or None

        await eventually(live, 30, "the node agent to be up")
        yield m


def _spec(name: str, **promises: float) -> Any:
    return parse_spec({
        "name": name, "command": [sys.executable, WEB_APP],
        "health": {"interval": 0.2, "grace": 10.0},
        # A crashed replica waits 2 s before its restart: the outage spans several 0.5 s ticks.
        "restart": {"backoff_initial": 2.0, "backoff_max": 2.0, "stable_after": 60},
        "promises": promises,
    })  # fmt: skip


async def _ledger_entry(
    mesh: accord.Mesh, promise: str, outcome: str, timeout: float = 30
) -> Assessment:
    store = await store_for(mesh)

    async def find() -> Assessment | None:
        return next((a for a in await store.ledger(promise=promise) if a.outcome == outcome), None)

    return await eventually(find, timeout, f"{promise} assessed {outcome}", interval=0.1)


async def _healthy_pid(mesh: accord.Mesh, name: str) -> int:
    async def pid() -> int | None:
        svc = next((s for s in await services(mesh) if s["name"] == name), None)
        insts = svc["instances"] if svc else []
        ok = [i for i in insts if i["status"] == "healthy" and i["pid"]]
        return int(ok[0]["pid"]) if ok else None

    return await eventually(pid, 30, f"a healthy replica of {name}", interval=0.1)


async def _crash_replica(mesh: accord.Mesh, name: str) -> int:
    """SIGKILL the healthy replica once the service's replicas promise was kept (the start is
    over, so what follows is an outage); return the killed PID."""
    await _ledger_entry(mesh, f"{name}.replicas", "kept")
    pid = await _healthy_pid(mesh, name)
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_replace_kept_when_a_crashed_replica_is_back_in_time(mesh: accord.Mesh) -> None:
    await deploy(mesh, _spec("mend", replace_within=30))
    try:
        killed = await _crash_replica(mesh, "mend")
        kept = await _ledger_entry(mesh, "mend.replace", "kept")
        assert kept.kind == "action" and kept.promiser == "service/mend"
        assert kept.evidence.startswith("replicas restored ")
        assert "after the loss (promised 30s)" in kept.evidence
        took = float(kept.evidence.split()[2].rstrip("s"))
        assert 1.5 <= took <= 30  # the 2 s restart backoff is in it
        assert await _healthy_pid(mesh, "mend") != killed
        store = await store_for(mesh)
        assert not [a for a in await store.ledger(promise="mend.replace") if a.outcome != "kept"]
    finally:
        await undeploy(mesh, "mend")


async def test_replace_not_kept_when_the_replica_is_back_too_late(mesh: accord.Mesh) -> None:
    await deploy(mesh, _spec("tardy", replace_within=0.5))
    try:
        await _crash_replica(mesh, "tardy")
        late = await _ledger_entry(mesh, "tardy.replace", "not_kept")
        assert late.kind == "action"
        assert late.evidence == "replicas still missing after 0.5s"
        await _healthy_pid(mesh, "tardy")  # it does come back, later than promised ...

        async def restored() -> Assessment | None:
            found = await (await store_for(mesh)).ledger(promise="tardy.replace")
            return next((a for a in found if a.evidence.startswith("replicas restored")), None)

        back = await eventually(restored, 30, "the restore of tardy assessed", interval=0.1)
        assert back.outcome == "not_kept"  # ... and the restore is recorded as late too
        assert "(promised 0.5s)" in back.evidence
    finally:
        await undeploy(mesh, "tardy")


async def test_latency_promise_kept_and_not_kept_by_probe_p95(mesh: accord.Mesh) -> None:
    await deploy(mesh, _spec("roomy", p95_latency_ms=60_000))
    await deploy(mesh, _spec("tight", p95_latency_ms=0.0001))  # no real probe is this fast
    try:
        kept = await _ledger_entry(mesh, "roomy.latency", "kept")
        assert kept.kind == "state" and kept.promiser == "service/roomy"
        assert kept.evidence.startswith("worst replica probe p95 ")
        assert kept.evidence.endswith("ms (target < 60000 ms)")
        missed = await _ledger_entry(mesh, "tight.latency", "not_kept")
        assert missed.evidence.endswith("ms (target < 0.0001 ms)")
        p95 = float(missed.evidence.split()[4])
        assert p95 > 0.0001
        store = await store_for(mesh)
        assert await store.ledger(promise="roomy.replace") == []  # no outage, no assessment
    finally:
        await undeploy(mesh, "roomy")
        await undeploy(mesh, "tight")


async def test_placement_decisions_are_appended_to_the_events_stream(
    mesh: accord.Mesh, cluster: Cluster
) -> None:
    await deploy(mesh, _spec("placed"))
    try:
        nc = await nats.connect(cluster.url)
        try:
            js = nc.jetstream()

            async def event() -> dict[str, Any] | None:
                seq = 0
                while True:  # every placement event, oldest first
                    try:
                        msg = await js.get_msg(
                            f"accord_{CLUSTER}_events", seq=seq + 1, next=True, subject=SUBJECT
                        )
                    except nats.js.errors.NotFoundError:
                        return None
                    data: dict[str, Any] = json.loads(msg.data)
                    if data["service"] == "placed":
                        return data
                    seq = int(msg.seq)

            placed = await eventually(event, 30, "the placement of 'placed' in the events")
        finally:
            await nc.close()
        assert set(placed) == PLACEMENT_FIELDS
        assert placed["kind"] == "placement" and placed["by"] == "node-1"
        assert placed["token"] >= 1 and placed["previous"] == []  # a new service
        [slot] = placed["slots"]
        assert slot["index"] == 0 and slot["node"] == "node-1" and slot["reason"]
    finally:
        await undeploy(mesh, "placed")
