"""Clocks: the monotonic time and timers a component runs on, injected so that unit tests can move
time by hand (`VirtualClock`, trio's `MockClock` idea) instead of sleeping.

`LoopClock` is the real one: `time.monotonic` and the running event loop's timers. Never compare
two processes' clocks: every duration accord judges is measured on one machine's monotonic time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        """Run `fn` once `now()` reaches `when` (at once if it already has)."""

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""


class LoopClock:
    """`time.monotonic` with the running loop's timers (the loop's clock is monotonic too, but may
    differ by an offset, so deadlines are converted).

    A loop's timers may also fire a little early on `time.monotonic`: uvloop's run on libuv's
    millisecond loop time, read once per loop iteration, and fire up to ~1 ms before the
    deadline. Code such as a lease's expiry (`now() >= valid_until` in the timer) relies on
    `call_at` and `sleep` never returning early, so both wait out what is left."""

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        return _LoopTimer(asyncio.get_running_loop(), when, fn)

    async def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await asyncio.sleep(seconds)
        while (left := end - time.monotonic()) > 0:  # woken early (uvloop): the rest
            await asyncio.sleep(left)


class _LoopTimer:
    """A loop timer that runs `fn` once `time.monotonic()` has reached `when`: fired early, it
    sets itself again for the rest."""

    __slots__ = ("_fn", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float, fn: Callable[[], None]):
        self._loop, self._when, self._fn = loop, when, fn
        self._handle = loop.call_later(max(0.0, when - time.monotonic()), self._fire)

    def _fire(self) -> None:
        left = self._when - time.monotonic()
        if left > 0:
            self._handle = self._loop.call_later(left, self._fire)
        else:
            self._fn()

    def cancel(self) -> None:
        self._handle.cancel()


class _Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time that moves only when a test calls `advance`. Timers and sleepers due by then run in
    time order; each `advance` lets the event loop run the tasks they wake before returning."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _Timer]] = []

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        timer = _Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        timer = self.call_at(self._now + max(0.0, seconds), wake)
        try:
            await fut
        finally:
            timer.cancel()

    async def advance(self, seconds: float, *, settle: int = 20) -> None:
        """Move time forward by `seconds`, firing what falls due on the way, in order; after each
        step yield to the loop `settle` times so woken tasks run (and may set new timers)."""
        until = self._now + seconds
        while True:
            await _settle(settle)
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if not self._timers or self._timers[0][0] > until:
                break
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            timer.fn()
        self._now = until
        await _settle(settle)


async def _settle(times: int) -> None:
    for _ in range(times):
        await asyncio.sleep(0)
