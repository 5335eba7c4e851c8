"""Services on one real node process: deploy / services / explain / logs / undeploy through the
CLI, invalid specs and conflicting promises, a crash-looping app, and the `accord.promise` API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import accord
from accord.services import PromiseConflict, Verdict, deploy, parse_spec, promise, services
from accord.services._promises import store_for
from accord.testing import Cluster
from tests.chaos._support import eventually

ROOT = Path(__file__).resolve().parents[2]
WEB_APP = str(ROOT / "examples" / "services" / "web_app.py")


def accord_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord", *args, "--nats", url, "--cluster", "svc"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(str(ROOT / "examples" / "counter_app.py"), 1, cluster="svc") as c:
        yield c


@pytest.fixture
async def mesh(cluster: Cluster) -> AsyncIterator[accord.Mesh]:
    async with cluster.connect() as m:
        await eventually(lambda: _live_nodes(m), 30, "the node to be up")
        yield m


async def _live_nodes(mesh: accord.Mesh) -> list[Any] | None:
    return (await (await store_for(mesh)).nodes()) or None


async def _service(mesh: accord.Mesh, name: str) -> dict[str, Any] | None:
    return next((s for s in await services(mesh) if s["name"] == name), None)


def _spec_file(tmp_path: Path, name: str, body: str) -> str:
    f = tmp_path / f"{name}.toml"
    f.write_text(f'name = "{name}"\ncommand = ["{sys.executable}", "{WEB_APP}"]\n{body}')
    return str(f)


def test_cli_deploys_lists_explains_logs_and_undeploys(cluster: Cluster, tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, "hello", 'path_prefix = "/hello"\n[health]\ninterval = 0.3\n')
    done = accord_cli(cluster.url, "deploy", spec)
    deadline = time.monotonic() + 30
    while done.returncode != 0 and "no live node" in done.stderr and time.monotonic() < deadline:
        time.sleep(0.5)
        done = accord_cli(cluster.url, "deploy", spec)
    assert done.returncode == 0, done.stderr
    assert "deployed hello" in done.stdout

    def listed() -> dict[str, Any]:
        out = accord_cli(cluster.url, "services", "--json")
        assert out.returncode == 0, out.stderr
        return {s["name"]: s for s in json.loads(out.stdout)}

    deadline = time.monotonic() + 30
    while listed()["hello"]["healthy"] != 1:
        assert time.monotonic() < deadline, listed()
        time.sleep(0.3)
    inst = listed()["hello"]["instances"][0]
    assert inst["node"] == "node-1" and inst["pid"] and inst["port"] and inst["restarts"] == 0
    os.kill(inst["pid"], 0)  # the process really runs

    table = accord_cli(cluster.url, "services")
    assert "hello" in table.stdout and "healthy" in table.stdout
    why = accord_cli(cluster.url, "services", "explain", "hello")
    assert why.returncode == 0 and "slot 0 (replica) -> node-1" in why.stdout, why.stdout
    deadline = time.monotonic() + 10
    while "listening on" not in (logs := accord_cli(cluster.url, "logs", "hello")).stdout:
        assert time.monotonic() < deadline, logs
        time.sleep(0.3)
    promises = json.loads(accord_cli(cluster.url, "promises", "--json").stdout)
    assert {"hello.replicas", "hello.replace"} <= {p["name"] for p in promises["promises"]}

    gone = accord_cli(cluster.url, "undeploy", "hello")
    assert gone.returncode == 0, gone.stderr
    deadline = time.monotonic() + 15
    while _pid_alive(inst["pid"]):
        assert time.monotonic() < deadline, "undeployed replica still running"
        time.sleep(0.1)
    assert "hello" not in listed()
    again = accord_cli(cluster.url, "undeploy", "hello")
    assert again.returncode == 2 and "no service named 'hello'" in again.stderr


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("replicas = 0\n", "replicas: must be 1-100"),
        ("[health]\ninterval = 'soon'\n", "health.interval: Expected `float`"),
        ("replcas = 2\n", "replcas: unknown field"),
        ("[placement]\npolicy = 'anywhere'\n", "placement.policy"),
    ],
)
def test_cli_refuses_invalid_specs_naming_the_field(
    cluster: Cluster, tmp_path: Path, body: str, message: str
) -> None:
    out = accord_cli(cluster.url, "deploy", _spec_file(tmp_path, "bad", body))
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


async def test_conflicting_promises_are_rejected_with_an_explanation(
    mesh: accord.Mesh,
) -> None:
    cmd = [sys.executable, WEB_APP]
    with pytest.raises(PromiseConflict, match=r"3 replicas on distinct nodes promised, but only 1"):
        await deploy(mesh, parse_spec({"name": "wide", "command": cmd, "replicas": 3}))
    first = parse_spec({"name": "one", "command": cmd, "port": 18931, "single_instance": True})
    await deploy(mesh, first)
    try:
        clash = parse_spec({"name": "two", "command": cmd, "port": 18931, "single_instance": True})
        with pytest.raises(PromiseConflict, match="port 18931 is already promised to service"):
            await deploy(mesh, clash)
        assert await _service(mesh, "two") is None
    finally:
        from accord.services import undeploy

        await undeploy(mesh, "one")


async def test_a_crash_looping_app_backs_off_and_its_promise_is_not_kept(
    mesh: accord.Mesh, cluster: Cluster
) -> None:
    spec = parse_spec({
        "name": "crashy", "command": [sys.executable, WEB_APP], "env": {"CRASH_AFTER": "0.05"},
        "health": {"interval": 0.2, "grace": 1.0},
        "restart": {"backoff_initial": 0.2, "backoff_max": 3.0, "stable_after": 60},
    })  # fmt: skip
    await deploy(mesh, spec)
    node_pid = cluster.nodes["node-1"].pid
    cpu0, t0 = _cpu_seconds(node_pid), time.monotonic()
    delays: list[float] = []

    async def backoffs() -> list[float] | None:
        svc = await _service(mesh, "crashy")
        inst = svc["instances"][0] if svc and svc["instances"] else None
        backing_off = inst and inst["status"] == "backoff" and inst["next_restart_in"]
        if backing_off and (not delays or inst["restarts"] > delays_restarts[-1]):
            delays.append(inst["next_restart_in"])
            delays_restarts.append(inst["restarts"])
        return delays if len(delays) >= 5 else None

    delays_restarts: list[int] = []
    try:
        await eventually(backoffs, 60, "five restarts", interval=0.05)
        cpu = (_cpu_seconds(node_pid) - cpu0) / (time.monotonic() - t0)
        # Exponential: the 5th delay is far above the 1st (jitter is ±20 %), capped at 3 s.
        assert delays[-1] > 2.5 * delays[0], delays
        assert max(delays) <= 3.0 * 1.2
        assert cpu < 0.5, f"node used {cpu:.0%} of a core while its app crash-looped"
        store = await store_for(mesh)

        async def not_kept() -> bool | None:
            ledger = await store.ledger(promise="crashy.replicas")
            return True if any(a.outcome == "not_kept" for a in ledger) else None

        await eventually(not_kept, 20, "crashy.replicas assessed not kept")
    finally:
        from accord.services import undeploy

        await undeploy(mesh, "crashy")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_promise_is_verified_remediated_and_recorded_in_the_ledger(
    mesh: accord.Mesh,
) -> None:
    healthy = {"ok": False}
    remediated = asyncio.Event()

    async def verify() -> Verdict:
        return Verdict(healthy["ok"], f"ok={healthy['ok']}")

    async def remediate() -> None:
        healthy["ok"] = True
        remediated.set()

    async with promise(mesh, "cache.warm", verify, promiser="agent/cache", every=0.2,
                       remediation=remediate, claims=["port:17001"]) as p:  # fmt: skip
        await asyncio.wait_for(remediated.wait(), 10)
        await eventually(lambda: _ready(p.last == "kept"), 10, "promise kept after remediation")
        with pytest.raises(PromiseConflict, match=r"already promised by promise/cache\.warm"):
            async with promise(mesh, "other", verify, promiser="x", claims=["port:17001"]):
                pass
    store = await store_for(mesh)
    outcomes = [a.outcome for a in await store.ledger(promise="cache.warm")]
    assert outcomes[0] == "not_kept" and "kept" in outcomes
    async with promise(mesh, "other", verify, promiser="x", claims=["port:17001"]):
        pass  # the claim was withdrawn with the first promise


async def _ready(value: bool) -> bool | None:
    return True if value else None
