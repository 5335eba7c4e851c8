"""SIGKILL of the embedded nats-server: the supervisor reaps it and brings it back on the same port.

- the supervisor alone, on a real server: two kills, two restarts, same URL, old processes reaped;
- `accord up --nodes 2` under at-least-once traffic: two kills, each time the engine listens again
  within 1 s, every acknowledged tell is processed, nothing is left behind and `up` stops quickly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import accord
from accord.engine._server import EmbeddedServer
from accord.engine._supervisor import EngineSupervisor
from accord.testing import connect_retrying, wait_for_placement

from ._support import ROOT, eventually

sys.path.insert(0, str(ROOT / "examples"))
from durable_app import Add

pytestmark = pytest.mark.chaos
APP = str(ROOT / "examples" / "durable_app.py")
BACK_WITHIN = 1.0  # the bound: killed engine listening again within 1 s


def _server_id(port: int) -> str | None:
    """The server_id in the INFO a NATS server sends on connect, or None if nobody answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    return (
        str(json.loads(line.removeprefix(b"INFO "))["server_id"])
        if line.startswith(b"INFO ")
        else None
    )


def _state(pid: int) -> str | None:
    """The process state letter from /proc (Z: zombie), None once the process is gone (reaped)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except FileNotFoundError:
        return None
    return "?"


def _kill_and_time_return(pid: int, port: int, within: float = BACK_WITHIN) -> float:
    """SIGKILL `pid` (a nats-server on `port`); return the seconds until a *new* server answers on
    the same port. Fails if that takes more than `within` or the old process is not reaped."""
    before = _server_id(port)
    assert before is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while True:
        now = _server_id(port)
        if now is not None and now != before:
            took = time.monotonic() - t0
            break
        if time.monotonic() - t0 > within:
            raise AssertionError(f"nats-server not back on port {port} within {within}s")
        time.sleep(0.005)
    deadline = time.monotonic() + 1.0
    while _state(pid) is not None:  # a zombie stays in /proc with state Z until reaped
        assert time.monotonic() < deadline, f"killed nats-server {pid} not reaped: {_state(pid)}"
        time.sleep(0.005)
    return took


def test_the_supervisor_restarts_a_killed_server_on_its_port_and_reaps_it(tmp_path: Path) -> None:
    state = tmp_path / "engine.json"
    sup = EngineSupervisor(EmbeddedServer(tmp_path / "data"), state_file=state)
    url = sup.start()
    try:
        port = sup.server.port
        times = []
        for n in (1, 2):
            old = sup.pid
            assert old is not None
            times.append(_kill_and_time_return(old, port))
            deadline = time.monotonic() + 5
            while sup.restarts < n:  # the server answers just before the supervisor counts it
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert sup.pid not in (None, old) and sup.url == url
        deadline = time.monotonic() + 5
        while (doc := json.loads(state.read_text()))["restarts"] < 2:  # written after the count
            assert time.monotonic() < deadline, f"state file still says {doc}"
            time.sleep(0.005)
        assert doc["restarts"] == 2 and doc["pid"] == sup.pid and doc["port"] == port
        assert doc["last_exit"] == "killed by SIGKILL"
        print(f"supervisor alone: back after {[f'{t * 1000:.0f} ms' for t in times]}")
    finally:
        sup.stop()
    assert all(_state(p) is None for p in sup.pids), "every server process stopped and reaped"
    assert not state.exists()


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


async def test_accord_up_survives_two_engine_kills_under_at_least_once_traffic(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    processed_log = tmp_path / "processed.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    env.update(ACCORD_HOME=str(home), ACCORD_PROCESS_LOG=str(processed_log))
    out = open(tmp_path / "up.out", "wb")  # noqa: SIM115, ASYNC230
    up = subprocess.Popen(  # noqa: ASYNC220 (it runs for the whole test; Popen is what we kill)
        [sys.executable, "-m", "accord", "up", "--nodes", "2", "--app", APP],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    out.close()
    known: set[int] = set()  # every PID `up` started: checked gone at the end
    try:

        async def engine_running() -> dict[str, Any] | None:
            try:
                doc: dict[str, Any] = json.loads((home / "engine.json").read_text())
            except (FileNotFoundError, ValueError):
                return None
            return doc if doc["state"] == "running" and doc["pid"] else None

        engine = await eventually(engine_running, 30, "accord up's engine.json")
        url, port = engine["url"], engine["port"]
        known.add(engine["pid"])
        async with connect_retrying(url, creds=home / "auth" / "local.creds") as mesh:
            await wait_for_placement(mesh, {"node-1", "node-2"})
            known |= _children(up.pid)
            ids = [f"m{i}" for i in range(3000)]
            acked: set[str] = set()
            errors: Counter[str] = Counter()

            async def send(chunk: list[str]) -> None:
                for mid in chunk:
                    while True:
                        try:
                            await mesh.tell(f"tally/a{int(mid[1:]) % 50}", Add(1, id=mid),
                                            msg_id=mid, timeout=2)  # fmt: skip
                            acked.add(mid)
                            break
                        except accord.AccordError as exc:  # engine down: retry, same msg_id
                            errors[type(exc).__name__] += 1
                            await asyncio.sleep(0.05)

            def processed() -> list[str]:
                lines = processed_log.read_text().splitlines() if processed_log.exists() else []
                return [json.loads(line)["id"] for line in lines]

            back: list[float] = []
            replaced: list[float] = []
            acked_again: list[float] = []
            sent = set(ids)

            async def probe(n: int, t0: float) -> None:
                """Fresh tells (in-flight ones wait out their timeout) until one is acked."""
                for i in itertools.count():
                    mid = f"probe{n}-{i}"
                    sent.add(mid)
                    try:
                        await mesh.tell("tally/probe", Add(1, id=mid), msg_id=mid, timeout=0.5)
                    except accord.AccordError:
                        continue
                    acked.add(mid)
                    acked_again.append(time.monotonic() - t0)
                    return

            async def chaos() -> None:
                for n, threshold in ((1, 600), (2, 1600)):
                    await eventually(lambda t=threshold: asyncio.sleep(0, len(acked) > t or None),
                                     60, f"{threshold} acknowledged tells")  # fmt: skip
                    doc = await engine_running()
                    assert doc is not None
                    t0 = time.monotonic()
                    back.append(await asyncio.to_thread(_kill_and_time_return, doc["pid"], port))
                    await probe(n, t0)
                    doc = await eventually(
                        lambda n=n: engine_running_after(n), 5, f"engine.json of restart {n}"
                    )
                    known.add(doc["pid"])
                    await wait_for_placement(mesh, {"node-1", "node-2"})
                    replaced.append(time.monotonic() - t0)

            async def engine_running_after(n: int) -> dict[str, Any] | None:
                doc = await engine_running()
                return doc if doc is not None and doc["restarts"] == n else None

            traffic = asyncio.gather(chaos(), *(send(ids[i::32]) for i in range(32)))
            await asyncio.wait_for(traffic, 120)  # a sender retrying forever fails here
            assert set(ids) <= acked
            await eventually(lambda: asyncio.sleep(0, set(processed()) >= acked or None), 90,
                             "every acknowledged tell processed", interval=0.2)  # fmt: skip
            await wait_for_placement(mesh, {"node-1", "node-2"})
            seen = processed()
        assert up.poll() is None, "accord up keeps running across engine restarts"
        assert _children(up.pid) <= known, "no stray process of `up` beyond the ones known"
        up.send_signal(signal.SIGINT)  # Ctrl-C
        t0 = time.monotonic()
        rc = await asyncio.to_thread(up.wait, 20)
        stop_took = time.monotonic() - t0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in known:  # leave nothing behind, even when an assert above failed
            if _state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
    text = (tmp_path / "up.out").read_text()
    dups = len(seen) - len(set(seen))
    print(f"engine back after {[f'{t * 1000:.0f} ms' for t in back]}; placement over both "
          f"nodes {[f'{t:.2f} s' for t in replaced]} after each kill; tells acknowledged again "
          f"after {[f'{t * 1000:.0f} ms' for t in acked_again]}; client errors "
          f"{dict(errors)}; {len(seen)} processings of {len(acked)} acked ({dups} duplicates); "
          f"`up` stopped in {stop_took:.2f} s")  # fmt: skip
    assert rc == 0, text
    assert text.count("exited unexpectedly (killed by SIGKILL)") == 2, text
    assert "nats-server restarted 2 time(s)" in text
    assert acked <= set(seen) <= sent, "acked tells processed; nothing processed that was not sent"
    assert all(_state(pid) is None for pid in known), "every process of `up` stopped and reaped"
    assert stop_took < 10, f"stopping `accord up` took {stop_took:.1f} s"


async def test_accord_up_gives_up_on_a_crash_loop_and_exits_1_quickly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    env.update(ACCORD_HOME=str(home))
    up = subprocess.Popen(  # noqa: ASYNC220 (it runs for the whole test; Popen is what we kill)
        [sys.executable, "-m", "accord", "up", "--nodes", "1", "--app", APP],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    known: set[int] = set()
    try:

        async def running_after(n: int) -> dict[str, Any] | None:
            try:
                doc: dict[str, Any] = json.loads((home / "engine.json").read_text())
            except (FileNotFoundError, ValueError):
                return None
            ok = doc["state"] == "running" and doc["pid"] and doc["restarts"] == n
            return doc if ok else None

        doc = await eventually(lambda: running_after(0), 30, "accord up's engine.json")
        known |= {doc["pid"]} | _children(up.pid)
        for n in range(1, 6):  # default policy: 5 restarts within 30 s are tolerated...
            # later restarts of a burst wait a backoff delay first (up to 0.6 s for the 5th)
            await asyncio.to_thread(_kill_and_time_return, doc["pid"], doc["port"], 5.0)
            doc = await eventually(lambda n=n: running_after(n), 5, f"restart {n}")
            known.add(doc["pid"])
        assert up.poll() is None
        os.kill(doc["pid"], signal.SIGKILL)  # ...the 6th failure is a crash loop
        t0 = time.monotonic()
        output, _ = await asyncio.to_thread(up.communicate, timeout=20)
        gave_up_in = time.monotonic() - t0
        state_left = (home / "engine.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in known:
            if _state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
    text = output.decode()
    print(f"crash loop: `up` exited {up.returncode} {gave_up_in:.2f} s after the 6th kill")
    assert up.returncode == 1, text
    assert "error: EngineError: nats-server failed 6 times within 30s" in text, text
    assert "Traceback" not in text
    assert not state_left, "engine.json is removed once `up` stopped"
    assert all(_state(pid) is None for pid in known), "every process of `up` stopped and reaped"
    assert gave_up_in < 10, f"giving up and stopping took {gave_up_in:.1f} s"
