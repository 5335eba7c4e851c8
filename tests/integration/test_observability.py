"""Metrics, health checks and JSON logs of real `accord node` processes (3, one nats-server,
one cluster for the module; the tests run in order and the last one stops the server).

Each node serves /metrics, /healthz and /readyz on a free port (`--metrics-port 0`) and
publishes the URL in its membership record, which is how these tests find it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

import accord
from accord._ids import shard_of
from accord._status import cluster_status
from accord.testing import Cluster, wait_for_placement
from tests.chaos._support import APP, Increment, eventually

NODES = ("node-1", "node-2", "node-3")
N_ASKS = 40


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("observability-logs")


@pytest.fixture(scope="module")
def cluster(logs: Path) -> Iterator[Cluster]:
    args = {n: ["--metrics-port", "0", "--log-format", "json"] for n in NODES}
    c = Cluster(APP, 3, log_dir=logs, node_args=args)
    with c:
        yield c
        for node in c.nodes.values():  # the last test stopped the server: no handoff possible
            node.kill()


@pytest.fixture
async def mesh(cluster: Cluster) -> AsyncIterator[accord.Mesh]:
    async with cluster.connect() as m:
        yield m


_SEEN: dict[str, str] = {}  # URLs read once: a node keeps its port for the module's life


async def _urls(mesh: accord.Mesh, names: tuple[str, ...] = NODES) -> dict[str, str]:
    """Each node's metrics URL, read from its membership record (once per node)."""
    assert mesh._buckets is not None
    out = {n: _SEEN[n] for n in names if n in _SEEN}
    members = mesh._buckets.members
    for name in (n for n in names if n not in out):
        # The record has a TTL: a heartbeat that ran late on a loaded machine lets it lapse
        # until the next one rewrites it.
        entry = await eventually(lambda n=name: members.get(f"node.{n}"), 20,
                                 f"{name}'s membership record")  # fmt: skip
        url = msgspec.json.decode(entry.value)["metrics_url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        out[name] = _SEEN[name] = url
    return out


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(5)) as r:
        return r.status, await r.text()


async def _sample(url: str, name: str, **labels: str) -> float:
    """The value of one sample on a /metrics page (0.0 when absent)."""
    status, text = await _get(url)
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def _ready(urls: dict[str, str], names: tuple[str, ...]) -> bool | None:
    codes = [(await _get(_base(urls[n]) + "/readyz"))[0] for n in names]
    return True if all(c == 200 for c in codes) else None


async def _warned(log: Path) -> list[dict[str, Any]] | None:
    """Every line of a node's log (JSON), once it says the connection was lost."""
    text = await asyncio.to_thread(log.read_text)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return records if any("connection lost" in r["message"] for r in records) else None


def _base(url: str) -> str:
    return url.removesuffix("/metrics")


async def test_n_asks_add_n_to_the_owning_nodes_messages_total(
    cluster: Cluster, mesh: accord.Mesh
) -> None:
    await wait_for_placement(mesh, set(NODES))
    urls = await _urls(mesh)
    agent = "counter/observed"
    await mesh.ask(agent, Increment(1))  # activated; the count below starts after this
    labels = {"agent_type": "counter", "kind": "ask", "outcome": "ok"}

    async def owner_now() -> str:
        st = await cluster_status(mesh, timeout=15)
        shard = shard_of(agent, st["num_shards"])
        return str(next(s["owner"] for s in st["shards"] if s["shard"] == shard))

    for _ in range(3):  # measured again if the shard moved meanwhile (a rebalance under load)
        first = await owner_now()
        before = {n: await _sample(u, "accord_messages_total", **labels) for n, u in urls.items()}
        for _ in range(N_ASKS):
            await mesh.ask(agent, Increment(1))
        after = {n: await _sample(u, "accord_messages_total", **labels) for n, u in urls.items()}
        if await owner_now() == first:
            break
    owner = first
    assert sum(after.values()) - sum(before.values()) == N_ASKS  # none lost, none counted twice
    assert after[owner] - before[owner] == N_ASKS
    assert all(after[n] == before[n] for n in NODES if n != owner)  # only the owner ran them
    assert await _sample(urls[owner], "accord_activations", agent_type="counter") >= 1
    count = await _sample(urls[owner], "accord_turn_duration_seconds_count", agent_type="counter")
    assert count >= N_ASKS + 1
    text = (await _get(urls[owner]))[1]
    assert "observed" not in text  # an agent key is never a label value


async def test_published_tells_count_as_publish_where_they_are_handled(
    cluster: Cluster, mesh: accord.Mesh
) -> None:
    """Summed over the nodes: a shard may move under load between reading its owner and the
    publishes (the ask test above checks "on the owning node only")."""
    urls = await _urls(mesh)
    await mesh.subscribe("ticks", "counter")

    async def count(kind: str) -> float:
        return sum([await _sample(url, "accord_messages_total", agent_type="counter", kind=kind,
                                  outcome="ok") for url in urls.values()])  # fmt: skip

    before = {k: await count(k) for k in ("publish", "tell")}
    for _ in range(N_ASKS):
        assert await mesh.publish("ticks", "published", Increment(1)) == 1

    async def counted() -> float | None:
        n = await count("publish") - before["publish"]
        return n if n >= N_ASKS else None

    assert await eventually(counted, 30, f"{N_ASKS} publishes counted") == N_ASKS
    assert await count("tell") == before["tell"]  # not counted as plain tells too


async def test_status_reports_the_stats_block(cluster: Cluster, mesh: accord.Mesh) -> None:
    data = await mesh._sender.transport_request(f"{mesh.names.admin_subject}.node-1", b"{}", 10)
    st = json.loads(data)
    stats = st["stats"]
    assert set(stats) == {"msgs_per_s", "p99_turn_ms", "loop_lag_ms", "activations", "per_type",
                          "dlq"}  # fmt: skip
    assert set(stats["per_type"]["counter"]) == {"activations", "msgs_per_s", "mailbox_pending"}
    assert st["metrics_url"] == (await _urls(mesh, ("node-1",)))["node-1"]
    assert "turns" in st["counters"]
    nodes = (await cluster_status(mesh, timeout=15))["nodes"]  # what `accord status --json` shows
    assert {n["name"]: n["metrics_url"] for n in nodes} == await _urls(mesh)


async def test_after_a_sigkill_survivors_take_shards_and_are_ready_again(
    cluster: Cluster, mesh: accord.Mesh
) -> None:
    urls = await _urls(mesh)
    survivors = ("node-1", "node-2")
    before = {n: await _sample(urls[n], "accord_shard_acquired_total") for n in survivors}
    await eventually(lambda: _ready(urls, NODES), 20, "/readyz of every node answering 200")
    cluster.nodes["node-3"].kill()

    async def grown() -> bool | None:
        now = {n: await _sample(urls[n], "accord_shard_acquired_total") for n in survivors}
        return True if all(now[n] > before[n] for n in survivors) else None

    await eventually(grown, 20, "both survivors acquiring node-3's shards")
    await wait_for_placement(mesh, set(survivors))

    await eventually(lambda: _ready(urls, survivors), 20, "/readyz of every survivor: 200")
    failovers = sum([await _sample(urls[n], "accord_failover_seconds_count") for n in survivors])
    assert failovers >= 1  # the shards of a dead owner count as failovers


async def test_healthz_fails_when_the_nats_connection_is_cut(
    cluster: Cluster, mesh: accord.Mesh, logs: Path
) -> None:
    urls = await _urls(mesh, ("node-1", "node-2"))
    for url in urls.values():
        status, body = await _get(_base(url) + "/healthz")
        assert status == 200, body
    await mesh.close()
    assert cluster.server is not None
    cluster.server.stop()

    async def unhealthy() -> list[dict[str, Any]] | None:
        got = [await _get(_base(u) + "/healthz") for u in urls.values()]
        if all(code == 503 for code, _ in got):
            return [json.loads(body) for _, body in got]
        return None

    bodies = await eventually(unhealthy, 15, "/healthz answering 503 on both nodes")
    assert all("heartbeats not confirmed" in b["reason"] for b in bodies)
    for name in urls:
        path = logs / f"{name}.log"
        records = await eventually(lambda p=path: _warned(p), 10, "a WARNING line")
        assert all({"time", "level", "node", "logger", "message"} <= set(r) for r in records)
        assert all(r["node"] == name for r in records)
        assert not [r for r in records if "exc" in r], "an expected disconnect logged a traceback"
        lost = [r for r in records if r["message"] == "NATS connection lost; reconnecting"]
        assert len(lost) == 1 and lost[0]["level"] == "WARNING"
