"""Placement overrides, live migration and heterogeneous nodes on a real nats-server with real
`accord node` processes (examples/placement_app.py, placement_gpu_app.py).

Proves: `mesh.migrate` under exactly-once traffic loses and doubles nothing and leaves the agent
on the target, never active in two processes at once, and a clean stop of its node hands it to
another node at once (the stop moves its override on); on nodes that host different agent types,
an agent of a type one node hosts lives there, fails fast with `AgentTypeNotFound` once that node
is gone, and a new node hosting the type takes it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgspec
import pytest

import accord
from accord.cluster._overrides import Override, override_key
from accord.testing import Cluster, NodeProcess, eventually_async, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "placement_app.py")
GPU_APP = str(ROOT / "examples" / "placement_gpu_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from placement_app import Add, Read, Where  # noqa: E402


def overlapping(log: Path, killed: dict[int, float] | None = None) -> list[str]:
    """Agents active in two processes at once, from the activation log (`killed`: pid -> the
    monotonic time it was SIGKILLed, which ends its activations)."""
    killed = killed or {}
    if not log.exists():
        return []
    spans: dict[str, list[tuple[float, float, int]]] = {}
    open_at: dict[tuple[str, int], float] = {}
    for line in log.read_text().splitlines():
        e = json.loads(line)
        key = (e["agent"], e["pid"])
        if e["event"] == "activate":
            open_at[key] = e["t"]
        elif key in open_at:
            spans.setdefault(e["agent"], []).append((open_at.pop(key), e["t"], e["pid"]))
    for (agent, pid), start in open_at.items():
        spans.setdefault(agent, []).append((start, killed.get(pid, float("inf")), pid))
    bad = []
    for agent, ss in spans.items():
        ss.sort()
        end, owner = float("-inf"), -1
        for start, stop, pid in ss:
            if start < end and pid != owner:
                bad.append(agent)
                break
            if stop > end:
                end, owner = stop, pid
    return bad


def _pids(status: dict[str, object]) -> dict[str, int]:
    return {n["name"]: n["pid"] for n in status["nodes"]}  # type: ignore[index, union-attr]


async def test_migrate_under_exactly_once_traffic(tmp_path: Path) -> None:
    log = tmp_path / "act.jsonl"
    with Cluster(APP, 3, env={"ACCORD_ACT_LOG": str(log)}, log_dir=tmp_path / "logs") as c:
        async with c.connect() as mesh:
            st = await wait_for_placement(mesh, set(c.nodes))
            pids = _pids(st)
            agent = "ledger/m"
            first = await mesh.ask(agent, Where())
            src = next(n for n, p in pids.items() if p == first)
            dst = next(n for n in sorted(pids) if n != src)
            sent = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                nonlocal sent
                i = 0
                while not stop.is_set():
                    await mesh.ask(agent, Add(1), msg_id=f"m-{i}", timeout=30)
                    sent += 1
                    i += 1

            task = asyncio.create_task(traffic())
            await eventually_async(lambda: sent >= 20, 30, "traffic before the move")
            epoch = await mesh.migrate(agent, dst)
            assert epoch > 0
            await eventually_async(lambda: sent >= 60, 30, "traffic after the move")
            stop.set()
            await task
            assert await mesh.ask(agent, Read(), timeout=10) == sent  # exact: none lost, none twice
            assert await mesh.ask(agent, Where()) == pids[dst]
            # Moving it where it is returns at once with the same epoch.
            assert await mesh.migrate(agent, dst) == epoch
            with pytest.raises(accord.AgentTypeNotFound):
                await mesh.migrate(agent, "no-such-node")

            # A clean stop of the node it was moved to hands it back at once: its override is
            # moved on by the stop itself (reason "its node stopped"), not re-placed after the
            # lease TTL on its next message (reason "its node left"), and nothing is lost.
            assert await asyncio.to_thread(c.nodes[dst].stop) == 0
            placed = await _override(mesh, agent)
            assert placed is not None and placed.node != dst
            assert placed.reason == "its node stopped"
            assert await mesh.ask(agent, Read(), timeout=10) == sent
            assert await mesh.ask(agent, Where()) == pids[placed.node]
    assert overlapping(log) == []


async def _override(mesh: accord.Mesh, agent: str) -> Override | None:
    entry = await mesh._buckets.leases.get(override_key(agent), leader=True)  # type: ignore[union-attr]
    return None if entry is None else msgspec.msgpack.decode(entry.value, type=Override)


async def test_heterogeneous_nodes(tmp_path: Path) -> None:
    log = tmp_path / "act.jsonl"
    env = {"ACCORD_ACT_LOG": str(log)}
    with Cluster(APP, 2, env=env, log_dir=tmp_path / "logs") as c:
        gpu = c.nodes["node-gpu"] = NodeProcess(c.url, GPU_APP, "node-gpu", env=env,
                                                log_dir=tmp_path / "logs").start()  # fmt: skip
        async with c.connect() as mesh:
            st = await wait_for_placement(mesh, set(c.nodes))
            pids = _pids(st)
            keys = [f"gpu/{i}" for i in range(20)]
            where = await asyncio.gather(*(mesh.ask(k, Where(), timeout=15) for k in keys))
            assert set(where) == {pids["node-gpu"]}  # every B agent on the one node hosting B
            echoes = await asyncio.gather(*(mesh.ask(f"echo/{i}", Where()) for i in range(30)))
            assert len(set(echoes)) == 3  # A agents spread over all three
            types = {n: sorted(m) for n, m in (await _member_types(mesh)).items()}
            assert "gpu" in types["node-gpu"] and "gpu" not in types["node-1"]

            gpu_pid = gpu.pid
            gpu.kill()
            killed = {gpu_pid: time.monotonic()}
            await wait_for_placement(mesh, {"node-1", "node-2"})
            t0 = time.monotonic()
            with pytest.raises(accord.AgentTypeNotFound):
                await mesh.ask("gpu/1", Where(), timeout=20)
            assert time.monotonic() - t0 < 5.0  # fast, not the 20 s deadline

            c.nodes["node-gpu2"] = NodeProcess(c.url, GPU_APP, "node-gpu2", env=env,
                                             log_dir=tmp_path / "logs").start()  # fmt: skip
            st = await wait_for_placement(mesh, {"node-1", "node-2", "node-gpu2"})
            new_pid = _pids(st)["node-gpu2"]

            async def moved() -> bool:
                try:
                    got = await asyncio.gather(*(mesh.ask(k, Where(), timeout=5) for k in keys))
                except accord.AccordError:
                    return False
                return set(got) == {new_pid}

            await eventually_async(moved, 30, "B agents on the new node hosting B")
    assert overlapping(log, killed) == []


async def _member_types(mesh: accord.Mesh) -> dict[str, list[str]]:
    data = await mesh._sender.transport_request(mesh.names.admin_subject, b"{}", 2.0)
    view = msgspec.json.decode(data)
    return {n: m["types"] for n, m in view["members"].items()}
