"""Durable timers, reminders and signals survive a full restart (nats-server and every node), and
code that changed under a running run is reported as `NonDeterminism` naming the step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import accord
from accord.testing import Cluster, wait_for_placement

from ._support import ROOT, eventually

sys.path.insert(0, str(ROOT / "examples"))
from workflow_app import Approve, Job, Read, StartPing

pytestmark = pytest.mark.chaos
APP = str(ROOT / "examples" / "workflow_app.py")


async def _state(h: accord.WorkflowHandle, state: str) -> str | None:
    st = (await h.status()).state
    return st if st == state else None


async def test_timers_reminders_and_signals_survive_a_full_restart(tmp_path: Path) -> None:
    server = accord.EmbeddedServer(tmp_path / "nats")
    url = server.start()
    try:
        with Cluster(APP, 2, url=url, log_dir=tmp_path / "logs") as cluster:
            async with cluster.connect() as mesh:
                await wait_for_placement(mesh, set(cluster.nodes))
                began = time.time()
                nap = await mesh.start_workflow("sleeper", "nap", Job(6))
                early = await mesh.start_workflow("approval", "early", Job(3600, pause=5.0))
                await early.signal(Approve("before the restart"))
                await mesh.ask("pinger/p", StartPing(delay=5.0))
                await eventually(lambda: _state(nap, "waiting"), 20, "the sleep to begin")
            for node in cluster.nodes.values():
                node.kill()
            server.stop()  # the data directory is ours: kept
            server.start()
            for name in list(cluster.nodes):
                cluster.add_node(name)
            async with cluster.connect() as mesh:
                await wait_for_placement(mesh, set(cluster.nodes))
                woke = await mesh.workflow("sleeper/nap").result(timeout=60)
                assert woke >= began + 6.0
                approved = await mesh.workflow("approval/early").result(timeout=60)
                assert approved == "approved by before the restart"

                async def pinged() -> int | None:
                    n = await mesh.ask("pinger/p", Read())
                    return n if n else None

                assert await eventually(pinged, 30, "the reminder after the restart") == 1
    finally:
        server.stop()


async def test_changed_code_under_a_running_run_is_non_determinism(tmp_path: Path) -> None:
    env = {"ACCORD_STEP_NAME": "first"}
    with Cluster(APP, 2, env=env, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            h = await mesh.start_workflow("changing", "c1", Job(1))
            await eventually(lambda: _state(h, "waiting"), 20, "the run to wait for a signal")
            for node in cluster.nodes.values():
                node.stop()
            cluster.env["ACCORD_STEP_NAME"] = "renamed"  # a deploy that renamed step 1
            for name in list(cluster.nodes):
                cluster.add_node(name)
            await wait_for_placement(mesh, set(cluster.nodes))
            with pytest.raises(accord.WorkflowFailed) as failed:
                await h.result(timeout=60)
            assert failed.value.state == "failed"
            assert "step 1" in failed.value.cause and "'renamed'" in failed.value.cause
            assert "'first'" in failed.value.cause
