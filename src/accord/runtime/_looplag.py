"""The loop monitor: notices a blocked event loop (a handler making a synchronous call) and says
which turn blocked it, while it is still blocked.

A periodic timer on the loop beats a heartbeat and measures how late it fires (`Stats.loop_lag_*`,
exported later as `accord_loop_lag_seconds`). A watchdog thread, one per node, checks the heartbeat:
a loop that stops beating is reported from the thread, before the stall costs the node its leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from types import FrameType

from .._agent import Agent
from .._observe import Observers
from ._activation import Activation
from ._settings import Stats

log = logging.getLogger("accord.looplag")


class LoopMonitor:
    """Watch `loop` (the running loop of the thread that calls `start`); report stalls longer
    than `threshold` seconds once each: from the thread while blocked, from the loop when over."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        threshold: float,
        interval: float = 0.1,
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        self._loop = loop
        self._stats = stats
        self.threshold = threshold
        self._interval = min(interval, threshold / 2)
        self._lock = threading.Lock()
        self._beat = time.monotonic()
        self._flagged = False  # the current stall was reported by the thread
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread = threading.get_ident()

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = self._loop.create_task(self._tick(), name="accord-loop-lag")
        self._thread = threading.Thread(target=self._watch, name="accord-loop-watchdog",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)

    async def _tick(self) -> None:
        loop, interval, stats = self._loop, self._interval, self._stats
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - due)
            with self._lock:
                self._beat = time.monotonic()
                flagged, self._flagged = self._flagged, False
            stats.loop_lag_last = lag
            if self._observe.active:
                self._observe.loop_lag(lag)
            if lag > stats.loop_lag_max:
                stats.loop_lag_max = lag
            if flagged:
                log.warning("event loop resumed after a stall of %.2fs", lag)
            elif lag >= self.threshold:
                stats.loop_stalls += 1
                log.warning("event loop stalled for %.2fs (a blocking call on the loop?)", lag)

    def _watch(self) -> None:
        """The watchdog thread: report a loop that stopped beating, once per stall."""
        limit = self._interval + self.threshold
        while not self._stop.wait(self._interval):
            with self._lock:
                blocked = time.monotonic() - self._beat
                if blocked < limit or self._flagged:
                    continue
                self._flagged = True
                self._stats.loop_stalls += 1
            where = self._blocker()
            log.warning("event loop blocked for %.2fs so far%s; a handler making a blocking call "
                        "should run in a thread (@accord.handler(executor=\"thread\"))",
                        blocked - self._interval, where)  # fmt: skip

    def _blocker(self) -> str:
        """Which turn the loop thread is running, read from its stack (only when reporting)."""
        frame: FrameType | None = sys._current_frames().get(self._loop_thread)
        top = frame
        agent = ""
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Agent | Activation):
                agent = str(getattr(owner, "id", "?"))
                break
            frame = frame.f_back
        if top is None:
            return ""
        at = f"{top.f_code.co_filename}:{top.f_lineno} in {top.f_code.co_qualname}"
        return f" by the turn of {agent} at {at}" if agent else f" at {at}"
