"""Worker pools (`stateless` agent types) on a real nats-server and three real `accord node`
processes (examples/pool_app.py).

Proves: 1,000 asks made by workflows are each handled exactly once and spread over every node,
with the registry showing the type as a pool; durable tells survive the SIGKILL of a worker:
the tasks it had started and not finished are done by the other nodes, and every task is done.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from accord.testing import Cluster, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "pool_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from pool_app import Batch, Task  # noqa: E402


def _entries(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def _until(probe, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("pools")
    with Cluster(APP, 3, env={"ACCORD_POOL_LOG": str(tmp / "pool.jsonl")},
                 log_dir=tmp / "logs") as c:  # fmt: skip
        c.tmp = tmp  # type: ignore[attr-defined]
        yield c


async def test_workflow_asks_spread_over_every_node_each_handled_once(cluster: Cluster) -> None:
    log = cluster.tmp / "pool.jsonl"  # type: ignore[attr-defined]
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        runs = await asyncio.gather(
            *(mesh.start_workflow("fanout", f"b{i}", Batch(first=i * 100, n=100)) for i in
              range(10))
        )  # fmt: skip
        results = await asyncio.gather(*(run.result(timeout=120) for run in runs))
        by_node: Counter[str] = Counter()
        for r in results:
            by_node.update(r)
        assert sum(by_node.values()) == 1000
        assert set(by_node) == set(cluster.nodes), by_node  # every node served some
        done = [e for e in _entries(log) if e["event"] == "done"]
        assert Counter(e["task"] for e in done) == Counter(range(1000))  # each exactly once
        assert Counter(e["node"] for e in done) == by_node
        direct = await mesh.ask("thumbnail/direct", Task(-1), timeout=10)  # a plain client's
        assert direct.n == -1 and direct.node in cluster.nodes


async def test_sigkilled_workers_unfinished_durable_tasks_are_redone_elsewhere(
    cluster: Cluster,
) -> None:
    log = cluster.tmp / "pool.jsonl"  # type: ignore[attr-defined]
    log.unlink(missing_ok=True)
    tasks = range(10_000, 10_300)
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        await asyncio.gather(*(mesh.tell(f"thumbnail/{n}", Task(n, ms=150)) for n in tasks))

        def victim() -> str | None:  # a node with tasks under way, once every node has some
            started = Counter(e["node"] for e in _entries(log) if e["event"] == "start")
            return max(started, key=started.__getitem__) if len(started) == 3 else None

        await _until(lambda: victim() is not None, 30, "every node to start tasks")
        name = victim()
        assert name is not None
        cluster.nodes[name].kill()
        entries = _entries(log)
        by_victim = {e["task"]: e["event"] for e in entries if e["node"] == name}
        unfinished = {t for t, ev in by_victim.items() if ev == "start"}
        assert unfinished, "the victim had no task under way when it was killed"

        def all_done() -> bool:
            return {e["task"] for e in _entries(log) if e["event"] == "done"} >= set(tasks)

        await _until(all_done, 60, "every task to be done")
        redone = {e["task"] for e in _entries(log) if e["event"] == "done" and e["node"] != name}
        assert unfinished <= redone  # the victim's unfinished tasks, done by the others
