"""The command line turns bad input and unreachable clusters into one clear error line and a
non-zero exit code — never a traceback or a hang — and serves the happy path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def accord(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    return subprocess.run(
        [sys.executable, "-m", "accord", *args], capture_output=True, text=True, timeout=60,
        env={**base, **(env or {})}, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ask", "counter/a", "Increment", "{not json"], 2, "not valid JSON"),
        (["ask", "counter/a", "Increment", "[1, 2]"], 2, "must be a JSON object"),
        (["ask", "no-slash", "Increment", "{}"], 2, "type/key"),
        (["ask", "counter/a", "Increment", "{}", "--nats", "localhost:4222"], 2, "nats://"),
        (["ask", "counter/a", "Increment", "{}", "--timeout", "0"], 2, "timeout"),
        (["status"], 2, "no cluster given"),
        (["dlq", "replay"], 2, "give sequence numbers or --all"),
        (["dlq", "list"], 2, "no cluster given"),
        (["node", "--app", "no/such/app.py", "--nats", "nats://127.0.0.1:1"], 2, "not found"),
        (["up", "--nodes", "2"], 2, "--app is required"),
        (["node", "--loop", "trio", "--app", "examples/counter_app.py"], 2, "event loop 'trio'"),
        (["up", "--nodes", "0", "--loop", "gevent"], 2, "choose one of asyncio, uvloop"),
        (["status", "--nats", "nats://127.0.0.1:1"], 1, "cannot connect"),
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    result = accord(*args, env={"ACCORD_HOME": str(tmp_path)})
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_bad_accord_loop_in_the_environment_is_a_clear_error(tmp_path: Path) -> None:
    result = accord("status", "--nats", "nats://127.0.0.1:1",
                    env={"ACCORD_HOME": str(tmp_path), "ACCORD_LOOP": "libuv"})  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip() == (
        "error: unknown event loop 'libuv' (--loop / $ACCORD_LOOP): choose one of asyncio, uvloop"
    )


def test_ask_tell_status_against_a_running_node(nats_url: str) -> None:
    env = {"ACCORD_NATS": nats_url}
    node = subprocess.Popen(
        [sys.executable, "-m", "accord", "node", "--app", "examples/counter_app.py", "--name",
         "cli-node", "--cluster", "cli"], cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        first = accord("ask", "counter/c1", "Increment", '{"by": 4}', "--cluster", "cli",
                       "--timeout", "30", env=env)  # fmt: skip
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["value"] == 4
        assert accord("tell", "counter/c1", "Increment", "{}", "--cluster", "cli",
                      env=env).returncode == 0  # fmt: skip
        status = accord("status", "--json", "--cluster", "cli", env=env)
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert [n["name"] for n in st["nodes"]] == ["cli-node"] and st["nodes"][0]["alive"]
        assert len(st["shards"]) == st["num_shards"]
        unknown = accord("ask", "counter/c1", "Nope", "{}", "--cluster", "cli", env=env)
        assert unknown.returncode == 1 and "UnknownMessageType" in unknown.stderr
    finally:
        node.terminate()
        assert node.wait(30) == 0
