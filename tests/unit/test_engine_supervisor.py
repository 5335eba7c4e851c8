"""EngineSupervisor's restart policy above the process seam: a fake server whose process "exits"
at once stands in for a crashing nats-server (the real one is killed in tests/chaos)."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from accord import EngineError
from accord._retry import Backoff
from accord.engine._supervisor import EngineSupervisor, describe_exit
from accord.testing import eventually


class FakeServer:
    """Each started "process" exits with SIGKILL's status until `crashes` of them did; the next
    ones run until `stop()`. Starts listed in `failing_starts` (1-based) raise `EngineError`."""

    def __init__(self, crashes: int, failing_starts: Callable[[int], bool] = lambda n: False):
        self.crashes = crashes
        self.failing_starts = failing_starts
        self.url = ""
        self.starts = 0
        self.running = 0  # processes started successfully
        self._pid: int | None = None
        self._stopped = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def port(self) -> int:
        return 4222

    def start(self, timeout: float = 15.0) -> str:
        self.starts += 1
        if self.failing_starts(self.starts):
            self._pid = None
            raise EngineError("nats-server exited with code 1")
        self.running += 1
        self._pid = 1000 + self.starts
        self.url = "nats://127.0.0.1:4222"
        return self.url

    def wait(self) -> int | None:
        if self.running <= self.crashes:
            return -9
        self._stopped.wait()
        return 0

    def stop(self, grace: float = 5.0) -> None:
        self._stopped.set()
        self._pid = None


FAST = Backoff(0.001, 0.001)


def test_a_crash_loop_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    server = FakeServer(crashes=10**6)
    seen: list[EngineError] = []
    state = tmp_path / "engine.json"
    sup = EngineSupervisor(server, max_restarts=3, window=30, clock=lambda: 0.0, backoff=FAST,
                           state_file=state, on_give_up=seen.append)  # fmt: skip
    sup.start()
    assert sup.wait_given_up(5), "a server that always dies must end in a give-up"
    assert server.starts == 4, "first start + max_restarts restarts, then no more"
    assert sup.restarts == 3
    assert seen == [sup.failure]
    assert sup.failure is not None and "4 times within 30s" in str(sup.failure)
    assert "killed by SIGKILL" in str(sup.failure)
    doc = json.loads(state.read_text())
    assert doc["state"] == "failed" and doc["restarts"] == 3 and doc["pid"] is None
    sup.stop()
    assert not state.exists()


def test_failures_spread_beyond_the_window_are_restarted_every_time() -> None:
    server = FakeServer(crashes=8)
    ticks = itertools.count(0, 100)  # 100 s between failures, window 30 s: never a crash loop
    sup = EngineSupervisor(server, max_restarts=2, window=30, clock=lambda: float(next(ticks)),
                           backoff=FAST)  # fmt: skip
    sup.start()
    eventually(lambda: sup.restarts == 8, 5.0, "the condition")
    assert sup.failure is None and not sup.wait_given_up(0)
    assert sup.pids == [1000 + n for n in range(1, 10)]
    sup.stop()
    assert server.starts == 9, "no restart after stop()"


def test_restarts_that_fail_count_towards_the_crash_loop() -> None:
    server = FakeServer(crashes=1, failing_starts=lambda n: n > 1)  # dies once, never comes back
    sup = EngineSupervisor(server, max_restarts=3, window=30, clock=lambda: 0.0, backoff=FAST)
    sup.start()
    assert sup.wait_given_up(5)
    assert server.starts == 4 and sup.restarts == 0
    assert sup.failure is not None and "restart failed" in str(sup.failure)
    sup.stop()


def test_a_failing_first_start_raises_from_start() -> None:
    sup = EngineSupervisor(FakeServer(crashes=0, failing_starts=lambda n: True))
    with pytest.raises(EngineError, match="exited with code 1"):
        sup.start()


def test_exit_statuses_are_described_for_the_log() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(None) == "no process"
