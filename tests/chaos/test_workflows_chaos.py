"""Workflow runs survive SIGKILLs of the nodes running them (real node processes).

- 200 runs of the 4-step `chain` on 3 nodes, two nodes SIGKILLed one after the other mid-run:
  every run completes with the right result, each run's journal holds each step once, and the
  exactly-once counter applied exactly the number of `ctx.ask` steps; 100 runs of `noop5` (five
  asks in a row, journaled together with the run's end) started just before the second kill
  complete too, each step journaled once, each ask applied once;
- a durable sleep fires after the node that ran the sleeping run was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from accord._ids import shard_of
from accord.testing import Cluster, wait_for_placement
from accord.workflows._model import WfStep

from ._support import ROOT, eventually, shard_owners

sys.path.insert(0, str(ROOT / "examples"))
from workflow_app import Job, Read, Total

pytestmark = pytest.mark.chaos
APP = str(ROOT / "examples" / "workflow_app.py")
RUNS = 200
NOOP = 100


async def test_runs_complete_exactly_once_through_two_sigkills(tmp_path: Path) -> None:
    env = {"ACCORD_STEP_LOG": str(tmp_path / "steps.jsonl")}
    with Cluster(APP, 3, env=env, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            handles = await asyncio.gather(
                *(mesh.start_workflow("chain", f"k{i}", Job(i, pause=2.0)) for i in range(RUNS))
            )
            done: set[str] = set()

            async def progress() -> bool | None:
                await asyncio.sleep(0)
                return True if len(done) > 0 or time.monotonic() > started + 1.0 else None

            async def wait_all() -> list[int]:
                async def one(i: int) -> int:
                    r = await handles[i].result(timeout=80)
                    done.add(handles[i].id)
                    return int(r)

                return await asyncio.gather(*(one(i) for i in range(RUNS)))

            started = time.monotonic()
            results_task = asyncio.create_task(wait_all())
            await eventually(progress, 10, "the runs to be under way")
            cluster.nodes["node-2"].kill()  # mid step 1 of most runs
            await wait_for_placement(mesh, {"node-1", "node-3"})
            assert len(done) < RUNS, "the first kill came after every run ended"
            noops = await asyncio.gather(
                *(mesh.start_workflow("noop5", f"n{i}", Job(i)) for i in range(NOOP))
            )
            cluster.nodes["node-3"].kill()
            await wait_for_placement(mesh, {"node-1"})
            results = await results_task

            assert results == [2 * i + 1 + 10 for i in range(RUNS)]
            for h in handles:
                journal = await h.journal()
                steps = Counter(e.n for e in journal.entries if isinstance(e, WfStep))
                assert steps == {1: 1, 2: 1, 3: 1, 4: 1}, (h.id, journal.entries)
            applied = 0
            for k in range(5):
                total = await mesh.ask(f"wf_counter/{k}", Read(), returns=Total)
                applied += total.applied
            assert applied == 2 * RUNS
            await asyncio.gather(*(h.result(timeout=80) for h in noops))
            for h in noops:
                journal = await h.journal()
                steps = Counter(e.n for e in journal.entries if isinstance(e, WfStep))
                assert steps == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}, (h.id, journal.entries)
            applied = 0
            for k in range(50):
                total = await mesh.ask(f"wf_counter/b{k}", Read(), returns=Total)
                applied += total.applied
            assert applied == 5 * NOOP
            # The kills landed mid-step: some local steps ran again (at-least-once) — yet the
            # journals above hold each step once and the asks were applied once.
            ran = len((tmp_path / "steps.jsonl").read_text().splitlines())
            assert ran > 2 * RUNS, "no step was interrupted by the kills"
            print(f"local steps run {ran} times for {2 * RUNS} journaled")


async def test_sleep_fires_after_its_node_was_killed(tmp_path: Path) -> None:
    with Cluster(APP, 3, log_dir=tmp_path / "logs") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            began = time.time()
            h = await mesh.start_workflow("sleeper", "nap", Job(5))
            st = await eventually(
                lambda: _state(h, "waiting"), 20, "the run to be in its durable sleep"
            )
            assert st == "waiting"
            from accord._status import cluster_status

            owners = shard_owners(await cluster_status(mesh, timeout=15))
            owner = owners[shard_of("sleeper/nap", mesh.config.num_shards)][0]
            cluster.nodes[owner].kill()
            woke = await h.result(timeout=60)
            assert woke >= began + 5.0  # the journaled `now()` after the sleep
            assert (await h.status()).state == "completed"


async def _state(h, state: str) -> str | None:  # type: ignore[no-untyped-def]
    st = (await h.status()).state
    return st if st == state else None
