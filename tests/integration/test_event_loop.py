"""`accord node --loop uvloop` beside a node on asyncio's loop, in one authenticated TLS cluster
(uvloop's TLS transport is its own): each process really runs the loop it was given, both serve
asks, and the uvloop node stops gracefully on SIGTERM (exit 0, its shards handed off to the
other node, which then answers for every agent)."""

from __future__ import annotations

import asyncio
import functools
import runpy
from pathlib import Path

from accord.testing import Cluster, eventually, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "counter_app.py")
COUNTER = runpy.run_path(APP)


def _maps_uvloop(pid: int) -> bool:
    """Whether process `pid` has uvloop's extension module mapped (it imported uvloop)."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


def _logged_loop(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if "(event loop: " in line:
            return line.rsplit("(event loop: ", 1)[1].rstrip(")")
    return ""


async def test_a_uvloop_node_and_an_asyncio_node_serve_one_secure_cluster(tmp_path: Path) -> None:
    inc = COUNTER["Increment"](1)
    agents = [f"counter/loop{k}" for k in range(64)]
    # each loop named (not left to the default): also right under ACCORD_LOOP=uvloop
    node_args = {"node-1": ["--loop", "asyncio"], "node-2": ["--loop", "uvloop"]}
    with Cluster(APP, 2, secure=True, log_dir=tmp_path, node_args=node_args) as c:
        pids = {name: node.pid for name, node in c.nodes.items()}
        loops = {
            name: eventually(functools.partial(_logged_loop, tmp_path / f"{name}.log"), 30,
                             f"{name}'s start line")
            for name in pids
        }  # fmt: skip
        assert loops == {"node-1": "asyncio", "node-2": "uvloop"}, c.describe()
        assert not _maps_uvloop(pids["node-1"]) and _maps_uvloop(pids["node-2"])

        async with c.connect() as mesh:
            await wait_for_placement(mesh, set(pids), timeout=60)
            replies = await asyncio.gather(*(mesh.ask(a, inc, timeout=30) for a in agents))
            assert {r.pid for r in replies} == set(pids.values()), "both nodes answered"
            assert all(r.value == 1 for r in replies)
            stayed = {r.agent for r in replies if r.pid == pids["node-1"]}

            assert c.nodes["node-2"].stop() == 0, c.describe()  # SIGTERM: hand off, exit 0
            await wait_for_placement(mesh, {"node-1"}, timeout=60)
            replies = await asyncio.gather(*(mesh.ask(a, inc, timeout=30) for a in agents))
            assert {r.pid for r in replies} == {pids["node-1"]}
            # the example's counters live in memory: the ones that moved start again at 0
            assert {r.agent: r.value for r in replies} == {
                a: 2 if a in stayed else 1 for a in agents
            }
