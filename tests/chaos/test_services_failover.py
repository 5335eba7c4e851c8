"""Services under node failure, with real node processes and real HTTP.

- 3 horizontal replicas on 3 nodes behind the load balancer of node-1; SIGKILL node-3: the replica
  comes back on a live node, the balancer stops using the dead one, a client looping through the
  balancer sees no failed request, and `web.replicas` goes not-kept then kept in the ledger.
- A single-instance failover service: SIGKILL its primary's node; the standby starts it only
  after the old lease expired, with a newer fencing token.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from accord.services import deploy, parse_spec, services
from accord.services._promises import store_for
from accord.testing import Cluster

from ._support import APP, ROOT, eventually

pytestmark = pytest.mark.chaos
WEB_APP = str(ROOT / "examples" / "services" / "web_app.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture
def cluster(tmp_path: Path, http_port: int) -> Iterator[Cluster]:
    args = {"node-1": ["--http-port", str(http_port)]}
    with Cluster(APP, 3, cluster="svcchaos", log_dir=tmp_path / "logs", node_args=args) as c:
        yield c


async def _deploy_when_nodes_are_up(mesh: Any, spec: Any, nodes: int) -> None:
    store = await store_for(mesh)

    async def up() -> bool | None:
        return True if len(await store.nodes()) >= nodes else None

    await eventually(up, 30, f"{nodes} nodes to be up")
    await deploy(mesh, spec)


async def _service(mesh: Any, name: str) -> dict[str, Any]:
    return next(s for s in await services(mesh) if s["name"] == name)


async def test_a_killed_nodes_replica_is_replaced_and_the_balancer_loses_no_request(
    cluster: Cluster, http_port: int
) -> None:
    spec = parse_spec({
        "name": "web", "command": [sys.executable, WEB_APP], "replicas": 3,
        "path_prefix": "/web", "health": {"interval": 0.25, "timeout": 0.5},
    })  # fmt: skip
    async with cluster.connect() as mesh:
        await _deploy_when_nodes_are_up(mesh, spec, 3)

        async def spread() -> dict[str, Any] | None:
            svc = await _service(mesh, "web")
            healthy = {i["node"] for i in svc["instances"] if i["status"] == "healthy"}
            return svc if healthy == {"node-1", "node-2", "node-3"} else None

        await eventually(spread, 30, "3 healthy replicas on 3 nodes")
        url = f"http://127.0.0.1:{http_port}/web/hello"
        seen: list[tuple[float, int, str]] = []  # (time, status, replica)
        stop = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                while not stop.is_set():
                    async with http.get(url) as r:
                        await r.read()
                        seen.append((time.time(), r.status, r.headers.get("X-Accord-Replica", "")))
                    await asyncio.sleep(0.01)

        async def balanced() -> bool | None:
            nodes = {rep.rsplit("@", 1)[-1] for _, s, rep in seen if s == 200}
            return True if {"node-1", "node-2", "node-3"} <= nodes else None

        clients = [asyncio.create_task(client()) for _ in range(4)]
        try:
            await eventually(balanced, 20, "the balancer to use all 3 replicas")
            t_kill = time.time()
            cluster.nodes["node-3"].kill()

            async def replaced() -> dict[str, Any] | None:
                svc = await _service(mesh, "web")
                ok = [i for i in svc["instances"] if i["status"] == "healthy" and i["node_alive"]
                      and i["node"] != "node-3"]  # fmt: skip
                return svc if len(ok) == 3 else None

            await eventually(replaced, 30, "a replacement replica on a live node")
            t_replaced = time.time()
            await asyncio.sleep(1.0)  # keep the clients going on the healed service
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
        failed = [(t, s, r) for t, s, r in seen if s != 200]
        late_dead = [r for t, s, r in seen if t > t_replaced and r.endswith("@node-3")]
        print(f"\nservices summary: requests={len(seen)} failed={len(failed)} "
              f"replaced_after={t_replaced - t_kill:.2f}s")  # fmt: skip
        assert failed == [], failed[:5]
        assert late_dead == []

        store = await store_for(mesh)

        async def dipped_and_recovered() -> list[str] | None:
            ledger = await store.ledger(promise="web.replicas")
            after = [a.outcome for a in ledger if a.at >= t_kill]
            if "not_kept" in after and "kept" in after[after.index("not_kept") :]:
                return after
            return None

        await eventually(dipped_and_recovered, 30, "web.replicas not kept, then kept again")


async def test_a_failover_service_moves_only_after_the_old_lease_expired(
    cluster: Cluster, tmp_path: Path
) -> None:
    events = tmp_path / "events.log"
    spec = parse_spec({
        "name": "solo", "command": [sys.executable, WEB_APP], "single_instance": True,
        "placement": {"policy": "failover"}, "lease_ttl": 2, "env": {"EVENTS_FILE": str(events)},
        "health": {"interval": 0.25},
    })  # fmt: skip
    async with cluster.connect() as mesh:
        await _deploy_when_nodes_are_up(mesh, spec, 3)

        async def primary() -> dict[str, Any] | None:
            svc = await _service(mesh, "solo")
            up = [i for i in svc["instances"] if i["status"] == "healthy"]
            return up[0] if len(up) == 1 else None

        first = await eventually(primary, 30, "the primary to be healthy")
        victim = first["node"]
        lease = next(x for x in await mesh._keeper().list() if x.name == "svc.solo")
        assert lease.token == first["token"]
        t_kill = time.time()
        cluster.nodes[victim].kill()

        async def moved() -> dict[str, Any] | None:
            got = await primary()
            return got if got is not None and got["node"] != victim else None

        second = await eventually(moved, 30, "the standby to take over")
        lines = events.read_text().splitlines()
        starts = [line.split() for line in lines if line.startswith("start")]
        assert [int(s[1]) for s in starts] == [first["token"], second["token"]]
        assert second["token"] > first["token"]
        new_start = float(starts[1][2])
        # The server expires the old lease TTL after its last renewal (at or after
        # lease.renewed_at); only then can the standby take it and start the process.
        assert new_start >= lease.renewed_at + lease.ttl - 0.05, (new_start, lease)
        print(f"\nfailover summary: took over {new_start - t_kill:.2f}s after SIGKILL "
              f"(lease ttl {lease.ttl}s), token {first['token']} -> {second['token']}")  # fmt: skip
