"""`accord up` end to end: it starts a nats-server and two node processes under its own
ACCORD_HOME, `accord status` and `accord ask` find them without a URL, and SIGINT or SIGTERM stops
every process it started (checked by PID) with exit code 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from accord.testing import eventually

ROOT = Path(__file__).resolve().parents[2]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> dict[int, str]:
    """PID -> command line of every live process below `pid` (what it started)."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for child in map(int, children):
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                out[child] = cmdline.replace(b"\0", b" ").decode()
                todo.append(child)
    return out


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_runs_a_cluster_that_status_and_ask_find_and_a_signal_stops_it(
    tmp_path: Path, stop_with: signal.Signals
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    env["ACCORD_HOME"] = str(home)
    out, err = open(tmp_path / "up.out", "w+"), open(tmp_path / "up.err", "w+")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "accord", "up", "--nodes", "2", "--app", "examples/counter_app.py"],
        cwd=ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    started: dict[int, str] = {}
    try:
        url_file = home / "url"
        url = eventually(
            lambda: url_file.exists() and url_file.read_text().strip(), 30, "the url file"
        )
        assert url.startswith("nats://")

        def two_alive() -> dict[str, Any] | None:
            done = _cli(env, "status", "--json")  # no --nats: found through ACCORD_HOME
            if done.returncode != 0:
                return None
            st: dict[str, Any] = json.loads(done.stdout)
            alive = [n for n in st["nodes"] if n["state"] == "alive"]
            owned = len(st["shards"]) == st["num_shards"]
            return st if len(alive) == 2 and owned else None

        st = eventually(two_alive, 60, "accord status to show 2 alive nodes owning every shard")
        assert sorted(n["name"] for n in st["nodes"]) == ["node-1", "node-2"]
        node_pids = {int(n["pid"]) for n in st["nodes"]}
        metrics = [n["metrics_url"] for n in st["nodes"]]  # each node got a free port
        for m in metrics:
            with urllib.request.urlopen(m, timeout=5) as page:
                assert page.status == 200 and b"accord_shards_owned" in page.read()

        asked = _cli(env, "ask", "counter/up1", "Increment", '{"by": 3}', "--timeout", "30")
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout)["value"] == 3
        again = _cli(env, "ask", "counter/up1", "Get", "{}")
        assert again.returncode == 0 and json.loads(again.stdout)["value"] == 3

        started = _descendants(up.pid)
        servers = {pid for pid, cmd in started.items() if "nats-server" in cmd}
        assert len(servers) == 1, started
        [server] = servers
        assert str(home / "data") in started[server]  # its data lives under ACCORD_HOME
        engine = json.loads((home / "engine.json").read_text())  # what `accord up` says it runs
        assert engine["pid"] == server and engine["url"] == url, engine
        assert node_pids <= set(started), (node_pids, started)  # the nodes status reports are its

        up.send_signal(stop_with)
        code = up.wait(60)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        assert code == 0, (stdout, stderr)
        assert "stopped." in stdout
        assert all(m in stdout for m in metrics), stdout  # `accord up` printed them
        assert "Traceback" not in stderr
        left = [pid for pid in started if _running(pid)]
        assert not left, {pid: started[pid] for pid in left}
        assert not url_file.exists()  # a later command does not find a dead cluster
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in started:  # never leave a process behind, even when an assert failed
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()
        err.close()
