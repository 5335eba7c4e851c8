"""`accord workflows` against real node processes: list and show runs, retry a compensated run
once its cause is fixed (it completes), signal and cancel runs; bad input is one clear line with
exit code 2; lifecycle events land in the cluster's events stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import accord
from accord.testing import Cluster, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "workflow_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from workflow_app import Job  # noqa: E402


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    return subprocess.run(
        [sys.executable, "-m", "accord", "workflows", *args, "--nats", url],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip


async def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, url, *args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("wfcli")
    env = {"ACCORD_STEP_LOG": str(tmp / "steps.jsonl"), "ACCORD_FIXED": str(tmp / "fixed")}
    with Cluster(APP, 2, env=env, log_dir=tmp / "logs") as c:
        c.tmp = tmp  # type: ignore[attr-defined]
        yield c


async def test_list_show_and_retry_after_the_fix(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        h = await mesh.start_workflow("saga", "cli-order", Job(1))
        with pytest.raises(accord.WorkflowFailed):
            await h.result(timeout=60)
        listed = await _cli(cluster.url, "--state", "compensated", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == ["saga/cli-order"]
        shown = await _cli(cluster.url, "show", "saga/cli-order", "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["status"]["state"] == "compensated"
        outcomes = [(s["name"], s["outcome"], s["attempts"]) for s in doc["steps"]]
        assert outcomes == [("reserve", "compensated", 1), ("charge", "compensated", 1),
                            ("ship", "failed", 3)]  # fmt: skip

        (cluster.tmp / "fixed").write_text("")  # type: ignore[attr-defined]
        retried = await _cli(cluster.url, "retry", "saga/cli-order")
        assert retried.returncode == 0, retried.stderr
        assert await h.result(timeout=60) == "shipped"
        log = cluster.tmp / "steps.jsonl"  # type: ignore[attr-defined]
        mine = [json.loads(x)["step"] for x in log.read_text().splitlines()]
        mine = [s for s, x in zip(mine, log.read_text().splitlines(), strict=True)
                if json.loads(x)["run"] == "saga/cli-order"]  # fmt: skip
        # undone steps are done again, then the fixed step succeeds
        assert mine == ["reserve", "charge", "ship", "ship", "ship", "refund", "release",
                        "reserve", "charge", "ship"]  # fmt: skip
        done = await _cli(cluster.url, "--state", "completed", "--type", "saga", "--json")
        assert [r["id"] for r in json.loads(done.stdout)] == ["saga/cli-order"]


async def test_signal_and_cancel_from_the_cli(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        a = await mesh.start_workflow("approval", "cli-a", Job(3600))
        await _eventually_waiting(a)
        wrong = await _cli(cluster.url, "signal", "approval/cli-a", "Approve", '{"by": 5}')
        assert wrong.returncode == 2 and "does not decode" in wrong.stderr, wrong.stderr
        sent = await _cli(cluster.url, "signal", "approval/cli-a", "Approve", '{"by": "ops"}')
        assert sent.returncode == 0, sent.stderr
        assert await a.result(timeout=60) == "approved by ops"
        b = await mesh.start_workflow("approval", "cli-b", Job(3600))
        cancelled = await _cli(cluster.url, "cancel", "approval/cli-b")
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
        assert (await b.status()).state == "cancelled"


async def _eventually_waiting(h: accord.WorkflowHandle) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (await h.status()).state != "waiting":
        assert loop.time() < deadline, "the run never waited"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "chain/never-started"], "no workflow run chain/never-started"),
        (["show", "no-slash"], "type/key"),
        (["signal", "approval/cli-a", "Approve", "{not json"], "not valid JSON"),
        (["--state", "sleeping"], "unknown state"),
        (["retry", "chain/never-started"], "no workflow run"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cluster: Cluster, args: list[str], message: str) -> None:
    result = cli(cluster.url, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_lifecycle_events_are_in_the_events_stream(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        h = await mesh.start_workflow("chain", "evented", Job(2))
        await h.result(timeout=60)
        js = mesh._transport.js
        subject = mesh.names.events_subject("workflow")
        seen: list[dict[str, object]] = []
        sub = await js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=2)
                except Exception:
                    break
                ev = msgspec.json.decode(msg.data)
                if ev["run"] == "chain/evented":
                    seen.append(ev)
        finally:
            await sub.unsubscribe()
        names = [e["event"] for e in seen]
        assert names == ["started", *["step_completed"] * 4, "completed"], seen
