"""A single-instance failover service under a network partition (accord.netlab): the node cut off
from the NATS majority stops its instance before the lease can be re-granted, the standby on the
majority starts it with a newer fencing token, and the two instances never overlap — checked from
the start/stop times the app itself writes with its token."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import accord
from accord.services import deploy, parse_spec, services
from accord.services._promises import store_for

from ._support import ROOT, eventually
from .test_partitions import lab  # noqa: F401  (the 3-host netlab fixture)

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
WEB_APP = str(ROOT / "examples" / "services" / "web_app.py")


def _intervals(events: Path) -> dict[int, list[float]]:
    """token -> [start, stop] (stop = +inf while running), from the app's own records."""
    out: dict[int, list[float]] = {}
    for line in events.read_text().splitlines():
        kind, token, at, *_ = line.split()
        if kind == "start":
            out[int(token)] = [float(at), float("inf")]
        elif kind == "stop" and int(token) in out:
            out[int(token)][1] = float(at)
    return out


async def test_a_partitioned_primary_stops_before_the_standby_starts(
    lab: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    events = tmp_path / "events.log"
    spec = parse_spec({
        "name": "solo", "command": [sys.executable, WEB_APP], "single_instance": True,
        "placement": {"policy": "failover"}, "lease_ttl": 2, "env": {"EVENTS_FILE": str(events)},
        "health": {"interval": 0.25},
    })  # fmt: skip
    async with accord.connect(lab.nats.urls, name="svc-partition-client") as mesh:

        async def placed() -> bool | None:
            try:
                await deploy(mesh, spec)
                return True
            except accord.AccordError:
                return None

        await eventually(placed, 60, "the service to be deployable on 3 nodes", interval=0.5)

        async def primary(exclude: str | None = None) -> dict[str, Any] | None:
            try:
                svc = next(s for s in await services(mesh) if s["name"] == "solo")
            except accord.AccordError:  # the client's server is electing leaders
                return None
            up = [i for i in svc["instances"] if i["status"] == "healthy" and i["node"] != exclude]
            return up[0] if len(up) == 1 else None

        first = await eventually(primary, 60, "the primary to be healthy")
        cut = first["node"].removeprefix("node-")
        others = [h for h in ("h1", "h2", "h3") if h != cut]
        t_cut = time.time()
        lab.partition([{cut}, set(others)])
        lab.isolate_client_from(cut)

        async def moved() -> dict[str, Any] | None:
            return await primary(exclude=first["node"])

        second = await eventually(moved, 60, "the standby on the majority to take over")
        took = time.time() - t_cut
        spans = _intervals(events)
        old, new = spans[first["token"]], spans[second["token"]]
        assert second["token"] > first["token"]
        assert old[1] < new[0], f"overlap: old ran until {old[1]}, new started at {new[0]}"
        lab.heal()

        async def settled_after_heal() -> bool | None:
            try:
                live = {n.name for n in await (await store_for(mesh)).nodes(fresh_within=2.0)}
                svc = next(s for s in await services(mesh) if s["name"] == "solo")
            except accord.AccordError:  # JetStream catching up after the heal
                return None
            up = [i for i in svc["instances"] if i["status"] == "healthy"]
            running = sum(1 for span in _intervals(events).values() if span[1] == float("inf"))
            return True if len(live) == 3 and len(up) == 1 and running == 1 else None

        # Back together: three live nodes and one healthy instance (wherever the controller keeps
        # it); the app's own records must show no overlap over the whole run.
        await eventually(settled_after_heal, 60, "one healthy instance on a healed cluster")
        spans = _intervals(events)
        ordered = sorted(spans.values())
        overlaps = [(a, b) for a, b in itertools.pairwise(ordered) if a[1] > b[0]]
        print(f"\nservice partition summary: old stopped {old[1] - t_cut:.2f}s after the cut, new "
              f"started {new[0] - t_cut:.2f}s after it (observed {took:.2f}s); tokens "
              f"{sorted(spans)}; overlaps {len(overlaps)}")  # fmt: skip
        assert overlaps == []
        by_start = [token for _, token in sorted((span[0], token) for token, span in spans.items())]
        assert by_start == sorted(spans), f"fencing tokens not increasing with starts: {by_start}"
        assert sum(1 for s in spans.values() if s[1] == float("inf")) == 1
