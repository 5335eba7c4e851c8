"""The dashboard's JSON API and `accord top` against 2 real node processes: paginated lists, bad
parameters as a 400 JSON error, the guarded dead-letter replay (the replayed message is delivered
again), requests to a foreign host name refused, and `accord top --once --json` listing the nodes.
Bad flags of both commands are one clear line with exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import accord
from accord.testing import Cluster, eventually, wait_for_placement

from .dashboard_proc import ROOT, dashboard_process, get

CLUSTER = "dashapi"
NODES = {"node-1", "node-2"}


async def _dead_letter(c: Cluster) -> None:
    """flaky/a fails every delivery (its fix file never exists), so it ends as a dead letter."""
    sys.path.insert(0, str(ROOT / "examples"))
    from durable_app import Add

    async with c.connect() as mesh:
        await wait_for_placement(mesh, NODES)
        with pytest.raises(accord.RemoteError, match="flaky is broken"):
            await mesh.ask("flaky/a", Add(1), timeout=30)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    never = tmp_path_factory.mktemp("fixed") / "never"
    with Cluster("examples/durable_app.py", 2, cluster=CLUSTER,
                 env={"ACCORD_FIXED": str(never)}) as c:  # fmt: skip
        asyncio.run(_dead_letter(c))
        with dashboard_process(c.url, CLUSTER) as url:
            yield c, url


def accord_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "accord", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip


def test_lists_are_paginated(dash: tuple[Cluster, str]) -> None:
    _, url = dash
    page = eventually(lambda: (p := get(f"{url}/api/shards?offset=10&limit=5")[1])["total"] == 64
                  and p, 30, "every shard owned")  # fmt: skip
    assert [s["shard"] for s in page["items"]] == [10, 11, 12, 13, 14]
    assert (page["offset"], page["limit"]) == (10, 5)
    assert all(s["owner"] in NODES and s["epoch"] > 0 for s in page["items"])
    status, nodes = get(f"{url}/api/nodes?limit=1")
    assert status == 200 and nodes["total"] == 2 and len(nodes["items"]) == 1
    status, rest = get(f"{url}/api/nodes?offset=1")
    assert [n["name"] for n in nodes["items"] + rest["items"]] == sorted(NODES)
    status, snap = get(f"{url}/api/snapshot")
    assert status == 200 and {n["name"] for n in snap["nodes"]} == NODES
    assert {"flaky", "ledger"} <= {t["type"] for t in snap["agent_types"]}


@pytest.mark.parametrize(
    ("query", "code", "message"),
    [
        ("/api/nodes?limit=0", 400, "limit must be between 1 and 1000"),
        ("/api/nodes?limit=5000", 400, "limit must be between 1 and 1000"),
        ("/api/nodes?limit=ten", 400, "limit must be an integer"),
        ("/api/shards?offset=-1", 400, "offset must be between"),
        ("/api/nope", 404, "no list 'nope'"),
        ("/static/../../etc/passwd", 404, ""),
    ],
)
def test_bad_parameters_get_a_json_error(
    dash: tuple[Cluster, str], query: str, code: int, message: str
) -> None:
    status, body = get(dash[1] + query)
    assert status == code and message in body["error"]


def test_a_foreign_host_name_is_refused(dash: tuple[Cluster, str]) -> None:
    status, body = get(f"{dash[1]}/api/nodes", headers={"Host": "evil.example:80"})
    assert status == 403 and "bound to loopback" in body["error"]


def test_dead_letter_replay_is_guarded_and_delivers_again(dash: tuple[Cluster, str]) -> None:
    _, url = dash
    letters = eventually(lambda: get(f"{url}/api/dlq")[1]["items"], 30, "a dead letter listed")
    seq = letters[0]["seq"]
    assert letters[0]["target"] == "flaky/a"
    replay = f"{url}/api/dlq/{seq}/replay"
    assert get(replay, method="POST")[0] == 403  # no custom header: a cross-site form
    foreign = {"X-Accord-Action": "replay", "Origin": "http://evil.example"}
    assert get(replay, method="POST", headers=foreign)[0] == 403
    ok = {"X-Accord-Action": "replay"}
    assert get(f"{url}/api/dlq/abc/replay", method="POST", headers=ok)[0] == 400
    assert get(f"{url}/api/dlq/999999/replay", method="POST", headers=ok)[0] == 404
    status, body = get(replay, method="POST", headers=ok)
    assert status == 200 and body["replayed"] == seq

    # Delivered again: it fails again, so it comes back as a new dead letter of flaky/a.
    def again() -> bool:
        items = get(f"{url}/api/dlq")[1]["items"]
        return seq not in {d["seq"] for d in items} and any(
            d["target"] == "flaky/a" and d["seq"] > seq for d in items
        )

    eventually(again, 30, "the replayed message dead-lettered again under a new sequence")


def test_top_once_json_lists_the_nodes(dash: tuple[Cluster, str]) -> None:
    c, _ = dash
    done = accord_cli("top", "--once", "--json", "--nats", c.url, "--cluster", CLUSTER)
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert {n["name"] for n in snap["nodes"]} == NODES
    assert all(n["state"] == "alive" and n["reachable"] for n in snap["nodes"])
    assert all(n["msgs_per_s"] is not None for n in snap["nodes"])  # two samples were taken
    assert snap["mailbox"]["dead_letters"] is not None
    plain = accord_cli("top", "--once", "--interval", "0.2", "--nats", c.url, "--cluster", CLUSTER)
    assert plain.returncode == 0 and "node-1" in plain.stdout and "accord top" in plain.stdout


def test_top_redraws_live_until_interrupted(dash: tuple[Cluster, str]) -> None:
    c, _ = dash
    master, slave = pty.openpty()  # rich draws live only on a terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord", "top", "--interval", "0.2", "--nats", c.url,
         "--cluster", CLUSTER], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"accord top") < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert seen.count(b"accord top") >= 3, seen[-2000:]  # the first screen and two redraws
    assert b"node-1" in seen and b"Traceback" not in seen


def test_a_dashboard_port_in_use_is_a_clear_error(dash: tuple[Cluster, str]) -> None:
    c, _ = dash
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = accord_cli("dashboard", "--port", port, "--nats", c.url, "--cluster", CLUSTER)
    assert done.returncode == 2 and "cannot listen on 127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["top", "--json"], "use it with --once"),
        (["top", "--interval", "0"], "--interval"),
        (["top", "--bogus"], "No such option"),
        (["dashboard", "--port", "70000"], "--port"),
        (["dashboard", "--interval", "5"], "--interval"),
        (["dashboard", "--host", " "], "--host must not be empty"),
        (["dashboard", "--log-format", "xml"], "--log-format must be text or json"),
    ],
)
def test_bad_flags_are_one_clear_line(args: list[str], message: str) -> None:
    # In-process: these are refused before anything connects (no process start to pay for).
    from typer.testing import CliRunner

    from accord._cli import app

    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)  # no traceback
