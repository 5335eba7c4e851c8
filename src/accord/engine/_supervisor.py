"""Supervision of the embedded engine: notice that the nats-server exited, reap it, restart it.

`EngineSupervisor` owns one thread that starts the server, blocks in `wait()` on it (reaping is what
keeps a killed server from lingering as a zombie) and restarts it on the same port and data
directory. Rapid repeated failures are a crash loop: it gives up with a clear `EngineError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .._errors import EngineError
from .._retry import Backoff

log = logging.getLogger("accord.engine")


class Supervised(Protocol):
    """What the supervisor needs of a server process (`EmbeddedServer` is one)."""

    url: str

    @property
    def pid(self) -> int | None: ...

    @property
    def port(self) -> int: ...

    def start(self, timeout: float = 15.0) -> str:
        """Start a process; return its URL once it accepts connections, or raise `EngineError`."""
        ...

    def wait(self) -> int | None:
        """Block until the process exits, reap it, return its exit status (None: no process)."""
        ...

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the process by PID and release what it owns."""
        ...


def describe_exit(status: int | None) -> str:
    """`-9` -> 'killed by SIGKILL', `1` -> 'exit code 1'."""
    if status is None:
        return "no process"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


class EngineSupervisor:
    """Keeps `server` running until `stop()`; restarts it each time it exits on its own.

    - `restarts`: restarts done so far; `pids`: every PID it started, oldest first.
    - Crash loop: when more than `max_restarts` failures (exits, or restarts that fail) fall within
      `window` seconds, it stops trying, sets `failure` and calls `on_give_up(failure)` from its
      thread. The first failure in a quiet window restarts at once; later ones wait a `backoff`
      delay, so a broken server is not spun on.
    - `state_file`: a JSON summary (pid, url, port, restarts, last exit, state) rewritten on every
      change, for operators and `accord status`; removed by `stop()`.
    `clock` (monotonic seconds) and `backoff` are injectable for tests.
    """

    def __init__(
        self,
        server: Supervised,
        *,
        max_restarts: int = 5,
        window: float = 30.0,
        state_file: Path | None = None,
        on_give_up: Callable[[EngineError], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if max_restarts < 0 or window <= 0:
            raise ValueError("max_restarts must be >= 0 and window > 0")
        self.server = server
        self.max_restarts = max_restarts
        self.window = window
        self.state_file = state_file
        self.restarts = 0
        self.pids: list[int] = []
        self.failure: EngineError | None = None
        self.last_exit: str | None = None
        self._on_give_up = on_give_up
        self._clock = clock
        self._backoff = backoff or Backoff(0.05, 1.0)
        self._start_timeout = start_timeout
        self._failures: deque[float] = deque()
        self._stopping = threading.Event()
        self._gave_up = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never interleave
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> str:
        """Start the server from the supervisor's thread (PR_SET_PDEATHSIG ties the server to the
        thread that forks it, so that thread must outlive it); return its URL. A failing first
        start raises `EngineError` here: there is nothing to supervise yet."""
        if self._thread is not None:
            raise RuntimeError("EngineSupervisor.start() called twice")
        first: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(first,), name="accord-engine-supervisor", daemon=True
        )
        self._thread.start()
        return first.result()

    def wait_given_up(self, timeout: float | None = None) -> bool:
        """Block until the supervisor gave up (True) or `timeout` passed (False)."""
        return self._gave_up.wait(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Stop supervising, then terminate the server by PID (SIGTERM, SIGKILL after `grace`)."""
        with self._lock:
            self._stopping.set()
            self.server.stop(grace)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    # -- the supervisor's thread ------------------------------------------------------------------

    def _run(self, first: concurrent.futures.Future[str]) -> None:
        try:
            url = self.server.start(self._start_timeout)
        except BaseException as exc:
            first.set_exception(exc)
            return
        self._started()
        first.set_result(url)
        try:
            while self._watch_once():
                pass
        except Exception as exc:  # a bug here must not leave the engine silently unsupervised
            log.exception("engine supervisor failed")
            self._give_up(EngineError(f"engine supervisor failed: {exc}"))

    def _watch_once(self) -> bool:
        """Wait for the server to exit and bring it back; False when supervision ends."""
        pid = self.server.pid
        status = self.server.wait()  # blocks; reaps the child so no zombie is left
        if self._stopping.is_set():
            return False
        died_at = self._clock()
        self.last_exit = describe_exit(status)
        log.warning("nats-server (pid %s) exited unexpectedly (%s); restarting it on port %d",
                    pid, self.last_exit, self.server.port)  # fmt: skip
        self._write_state("restarting")
        while True:
            if not self._count_failure():
                return False
            if not self._pause():
                return False
            with self._lock:
                if self._stopping.is_set():
                    return False
                try:
                    self.server.start(self._start_timeout)
                except (EngineError, OSError) as exc:  # OSError: the binary could not be run
                    self.last_exit = f"restart failed: {exc}"
                    log.warning("nats-server restart on port %d failed: %s", self.server.port, exc)
                    continue
            self.restarts += 1
            self._started()
            log.info("nats-server back at %s (pid %s) %.0f ms after it exited; %d restart(s)",
                     self.server.url, self.server.pid, (self._clock() - died_at) * 1000,
                     self.restarts)  # fmt: skip
            return True

    def _count_failure(self) -> bool:
        """Record a failure now; False (and give up) when it makes a crash loop."""
        now = self._clock()
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if not self._failures:
            self._backoff.reset()
        self._failures.append(now)
        if len(self._failures) > self.max_restarts:
            self._give_up(EngineError(
                f"nats-server failed {len(self._failures)} times within {self.window:.0f}s "
                f"(last: {self.last_exit}); not restarting it again"))  # fmt: skip
            return False
        return True

    def _pause(self) -> bool:
        """No delay after the first failure of a quiet window; backoff after that. False when
        stop() came meanwhile."""
        if len(self._failures) <= 1:
            return not self._stopping.is_set()
        return not self._stopping.wait(self._backoff.next())

    def _give_up(self, failure: EngineError) -> None:
        self.failure = failure
        log.error("%s", failure)
        self._write_state("failed")
        self._gave_up.set()
        if self._on_give_up is not None:
            self._on_give_up(failure)

    def _started(self) -> None:
        if self.server.pid is not None:
            self.pids.append(self.server.pid)
        self._write_state("running")

    def _write_state(self, state: str) -> None:
        if self.state_file is None:
            return
        doc = {
            "state": state,
            "pid": self.server.pid if state == "running" else None,
            "url": self.server.url,
            "port": self.server.port,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "updated": time.time(),
        }
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.state_file)  # readers never see a half-written file
        except OSError as exc:  # the state file is informative; supervision goes on without it
            log.debug("cannot write %s: %s", self.state_file, exc)
