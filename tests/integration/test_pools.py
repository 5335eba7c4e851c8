"""Worker pools (`stateless` agent types) on a real nats-server and three real `accord node`
processes (examples/pool_app.py).

Proves: 1,000 asks made by workflows are answered and spread over every node; 1,000 asks made by
a plain client (which knows the type from the registry) are each handled exactly once, spread
over every node, and counted per node by the cluster status; durable tells survive the
SIGKILL of a worker: the tasks it had started and not finished are done by the other nodes, and
every task is done; workflow runs asking the pool across that kill complete (an ask in flight at
the worker's death times out and its step asks again).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accord._status import cluster_status
from accord.testing import Cluster, eventually_async, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "pool_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from pool_app import Batch, Task  # noqa: E402


def _entries(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("pools")
    metrics = {f"node-{i}": ["--metrics-port", "0"] for i in (1, 2, 3)}
    with Cluster(APP, 3, env={"ACCORD_POOL_LOG": str(tmp / "pool.jsonl")},
                 log_dir=tmp / "logs", node_args=metrics) as c:  # fmt: skip
        c.tmp = tmp  # type: ignore[attr-defined]
        yield c


async def test_workflow_asks_spread_over_every_node(cluster: Cluster) -> None:
    log = cluster.tmp / "pool.jsonl"  # type: ignore[attr-defined]
    log.unlink(missing_ok=True)
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes), timeout=60)
        runs = await asyncio.gather(
            *(mesh.start_workflow("fanout", f"b{i}", Batch(first=i * 50, n=50)) for i in
              range(20))
        )  # fmt: skip
        results = await asyncio.gather(*(run.result(timeout=120) for run in runs))
        by_node: Counter[str] = Counter()
        for r in results:
            by_node.update(r)
        assert sum(by_node.values()) == 1000  # one journaled answer per step
        assert set(by_node) == set(cluster.nodes), by_node  # every node served some
        # At least once: a run whose shard moved (a lease lost on a loaded machine) asks its
        # step under way again.
        done = {e["task"] for e in _entries(log) if e["event"] == "done"}
        assert done == set(range(1000))


async def test_client_asks_are_handled_exactly_once_over_every_node(cluster: Cluster) -> None:
    log = cluster.tmp / "pool.jsonl"  # type: ignore[attr-defined]
    log.unlink(missing_ok=True)
    async with cluster.connect() as mesh:  # a plain client: the pool is known from the registry
        await wait_for_placement(mesh, set(cluster.nodes), timeout=60)
        before = (await cluster_status(mesh, timeout=15))["pools"]["thumbnail"]
        slots = asyncio.Semaphore(48)

        async def ask(n: int) -> str:
            async with slots:
                done = await mesh.ask(f"thumbnail/{n}", Task(n, ms=2), timeout=30)
                assert done.n == n
                return str(done.node)

        by_node = Counter(await asyncio.gather(*(ask(n) for n in range(1000))))
        assert set(by_node) == set(cluster.nodes), by_node
        done = [e for e in _entries(log) if e["event"] == "done"]
        assert Counter(e["task"] for e in done) == Counter(range(1000))  # each exactly once
        assert Counter(e["node"] for e in done) == by_node
        after = (await cluster_status(mesh, timeout=15))["pools"]["thumbnail"]  # accord status
        assert set(after) == set(cluster.nodes)
        assert {n: after[n]["handled"] - before[n]["handled"] for n in after} == by_node
        assert {c["max_concurrency"] for c in after.values()} == {8}


async def _pool_metrics(url: str) -> dict[str, float]:
    """The pool type's handled asks, refused asks and bulkhead refusals on one node."""
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(5)) as r:
        text = await r.text()
    out = dict.fromkeys(("ok", "rejected", "bulkhead"), 0.0)
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            if m.labels.get("agent_type") != "thumbnail":
                continue
            if m.name == "accord_messages_total" and m.labels["kind"] == "ask":
                out[m.labels["outcome"]] = out.get(m.labels["outcome"], 0.0) + m.value
            elif m.name == "accord_bulkhead_rejected_total":
                out["bulkhead"] = m.value
    return out


async def test_pool_runs_and_refusals_are_counted_in_each_nodes_metrics(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes), timeout=60)
        st = await cluster_status(mesh, timeout=15)
        urls = {n["name"]: n["metrics_url"] for n in st["nodes"]}
        before = {n: await _pool_metrics(u) for n, u in urls.items()}
        pools = st["pools"]["thumbnail"]
        # 120 asks at once against 3 nodes x 8 slots, 100 ms each: many find their node full
        # (answered `overloaded` and asked again), yet every one is answered.
        done = await asyncio.gather(*(mesh.ask(f"thumbnail/{n}", Task(n, ms=100), timeout=60)
                                      for n in range(30_000, 30_120)))  # fmt: skip
        assert sorted(d.n for d in done) == list(range(30_000, 30_120))
        after = {n: await _pool_metrics(u) for n, u in urls.items()}
        now = (await cluster_status(mesh, timeout=15))["pools"]["thumbnail"]
    refused = 0
    for n in urls:
        grew = {k: after[n][k] - before[n][k] for k in after[n]}
        handled = now[n]["handled"] - pools[n]["handled"]
        overloaded = now[n]["overloaded"] - pools[n]["overloaded"]
        assert grew["ok"] == handled, (n, grew, handled)  # one per handler run
        assert grew["rejected"] == grew["bulkhead"] == overloaded, (n, grew, overloaded)
        refused += overloaded
    assert refused > 0, "no ask found its node full: the refusal counts were not exercised"


async def test_sigkilled_workers_unfinished_durable_tasks_are_redone_elsewhere(
    cluster: Cluster,
) -> None:
    log = cluster.tmp / "pool.jsonl"  # type: ignore[attr-defined]
    log.unlink(missing_ok=True)
    tasks = range(10_000, 10_400)
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes), timeout=60)
        batches = [Batch(20_000 + 30 * i, 30, ms=100, timeout=3.0) for i in range(3)]
        runs = [await mesh.start_workflow("fanout", f"k{i}", b) for i, b in enumerate(batches)]
        await asyncio.gather(*(mesh.tell(f"thumbnail/{n}", Task(n, ms=150)) for n in tasks))

        def victim() -> str | None:  # a node in the middle of a durable task and of an ask
            open_: dict[str, dict[int, str]] = {}
            for e in _entries(log):
                open_.setdefault(str(e["node"]), {})[int(e["task"])] = str(e["event"])
            for node, events in open_.items():
                under_way = [t for t, ev in events.items() if ev == "start"]
                if len(open_) == 3 and min(under_way, default=0) < 20_000 <= max(
                    under_way, default=0
                ):
                    return node
            return None

        name = await eventually_async(victim, 30, "a node amid a durable task and an ask")
        cluster.nodes[name].kill()
        entries = _entries(log)
        by_victim = {e["task"]: e["event"] for e in entries if e["node"] == name}
        unfinished = {t for t, ev in by_victim.items() if ev == "start"}
        assert unfinished, "the victim had no task under way when it was killed"

        def all_done() -> bool:
            return {e["task"] for e in _entries(log) if e["event"] == "done"} >= set(tasks)

        await eventually_async(all_done, 60, "every task to be done")
        results = await asyncio.gather(*(run.result(timeout=60) for run in runs))
        assert sum(sum(r.values()) for r in results) == 90  # every ask step answered
        done = {e["task"] for e in _entries(log) if e["event"] == "done"}
        assert done >= set(range(20_000, 20_090))
        redone = {e["task"] for e in _entries(log) if e["event"] == "done" and e["node"] != name}
        assert unfinished <= redone  # the victim's unfinished tasks and asks, done by the others
