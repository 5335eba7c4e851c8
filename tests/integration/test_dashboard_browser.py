"""The web dashboard in a real headless Chromium against a live 3-node cluster: it shows the three
nodes alive, replays a dead letter from its button, and a node that is SIGKILLed turns dead on the
page within 3 s, without a reload.
A screenshot is kept ($ACCORD_ARTIFACTS or the test's tmp_path); browser and driver are stopped
by PID and none of their processes may outlive the test."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from accord.testing import Cluster, wait_for_placement

from .dashboard_proc import ROOT, dashboard_process

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()),
    reason="needs the Debian chromium and chromium-driver packages (.ci/run installs them)",
)
CLUSTER = "dashb"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1100")  # fmt: skip


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc), so none can be left behind unnoticed."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(
    cond: Callable[[], bool], timeout: float, what: str, seen: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}; page shows {seen()}")
        time.sleep(0.05)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    service = Service("/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=opts, service=service)
    driver_pid = service.process.pid
    try:
        yield driver
    finally:
        spawned = _descendants(driver_pid) | {driver_pid}
        driver.quit()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in spawned):
            time.sleep(0.05)
        stray = sorted(p for p in spawned if _alive(p))
        for p in stray:  # by PID, and still a failure: quit() should have ended them
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        assert not stray, f"browser processes outlived driver.quit(): {stray}"


def _states(driver: Any) -> dict[str, str]:
    """Node -> state as the page shows it, read in one script (the rows are redrawn live)."""
    script = """return Object.fromEntries([...document.querySelectorAll('#nodes tr[data-node]')]
        .map((r) => [r.dataset.node, r.dataset.state]));"""
    states: dict[str, str] = driver.execute_script(script)
    return states


async def _traffic(c: Cluster, agents: int) -> None:
    """Asks, so the page has activations to show, and one dead letter (flaky/x fails every
    delivery: its fix file never exists) for the replay button."""
    sys.path.insert(0, str(ROOT / "examples"))
    from durable_app import Add

    import accord

    async with c.connect() as mesh:
        await wait_for_placement(mesh, set(c.nodes))
        await asyncio.gather(*(mesh.ask(f"tally/t{i}", Add(1), timeout=20)
                               for i in range(agents)))  # fmt: skip
        with pytest.raises(accord.RemoteError):
            await mesh.ask("flaky/x", Add(1), timeout=30)


def _replay_from_the_page(driver: Any) -> None:
    """Click the dead letter's replay button and accept the confirmation, as an operator would:
    the page's own POST passes the guard and the letter goes back to its mailbox."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def button() -> Any:
        found = driver.find_elements(By.CSS_SELECTOR, "#dlq button[data-seq]")
        return found[0] if found else False

    WebDriverWait(driver, 30).until(lambda _d: button())
    # Found and clicked in one script: a table redrawn in between would leave a stale element.
    driver.execute_script("document.querySelector('#dlq button[data-seq]').click()")
    WebDriverWait(driver, 30).until(expected_conditions.alert_is_present()).accept()
    result = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "dlq-result").text or False
    )
    assert result.startswith("replayed "), result


def test_dashboard_shows_three_nodes_alive_then_a_killed_one_dead(tmp_path: Path) -> None:
    artifacts = Path(os.environ.get("ACCORD_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {"ACCORD_FIXED": str(tmp_path / "never")}
    with (
        Cluster("examples/durable_app.py", 3, cluster=CLUSTER, env=env,
                log_dir=tmp_path / "logs") as c,
        dashboard_process(c.url, CLUSTER) as url,
        chromium(tmp_path / "profile") as driver,
    ):  # fmt: skip
        asyncio.run(_traffic(c, 30))
        driver.get(url)
        shown = functools.partial(_states, driver)
        _wait(lambda: list(shown().values()) == ["alive"] * 3, 60, "three nodes alive", shown)
        assert driver.title == "accord dashboard"
        _replay_from_the_page(driver)
        driver.get_screenshot_as_file(str(artifacts / "dashboard-alive.png"))

        c.nodes["node-3"].signal(signal.SIGKILL)
        _wait(lambda: shown().get("node-3") == "dead", 3.0, "node-3 shown dead", shown)
        assert _states(driver)["node-1"] == "alive"
        shot = artifacts / "dashboard.png"
        driver.get_screenshot_as_file(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("ACCORD_UPDATE_SCREENSHOT"):
            shutil.copy(shot, ROOT / "docs" / "img" / "dashboard.png")
