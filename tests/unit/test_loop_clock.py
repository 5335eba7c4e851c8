"""`LoopClock` never runs a timer or ends a sleep before its time on `time.monotonic`, on either
event loop. uvloop's timers run on libuv's cached millisecond loop time and fire up to ~1 ms
early; a lease expiry timer that fired early found its lease still valid, did nothing and was
never set again, so a node cut off from the cluster went on believing it held its shards."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest
import uvloop

from accord._clock import LoopClock

LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}
N = 300


def _run(loop: str, main: Callable[[], object]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())  # type: ignore[arg-type]


def _spin(seconds: float) -> None:
    """Keep the loop busy, so that a loop caching its time (uvloop) has a stale one."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.parametrize("loop", LOOPS)
def test_no_timer_runs_before_its_deadline(loop: str) -> None:
    early: list[float] = []

    async def main() -> None:
        clock, left, done = LoopClock(), [N], asyncio.Event()

        def timer(when: float) -> Callable[[], None]:
            def fire() -> None:
                if clock.now() < when:
                    early.append(when - clock.now())
                left[0] -= 1
                if not left[0]:
                    done.set()

            return fire

        rng = random.Random(7)
        for _ in range(N):
            _spin(0.0003)
            when = clock.now() + rng.uniform(0.001, 0.05)
            clock.call_at(when, timer(when))
        await asyncio.wait_for(done.wait(), 10)

    _run(loop, main)
    assert early == []


@pytest.mark.parametrize("loop", LOOPS)
def test_no_sleep_ends_early(loop: str) -> None:
    early: list[float] = []

    async def main() -> None:
        clock = LoopClock()

        async def one(seconds: float) -> None:
            _spin(0.0003)
            end = clock.now() + seconds
            await clock.sleep(seconds)
            if clock.now() < end:
                early.append(end - clock.now())

        rng = random.Random(11)
        await asyncio.gather(*(one(rng.uniform(0.001, 0.03)) for _ in range(100)))

    _run(loop, main)
    assert early == []


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancelled_timer_never_runs_and_a_past_deadline_runs_at_once(loop: str) -> None:
    ran: list[str] = []

    async def main() -> None:
        clock = LoopClock()
        for i in range(50):
            timer = clock.call_at(clock.now() + 0.005 + i * 0.0002, lambda: ran.append("cancelled"))
            timer.cancel()
        clock.call_at(clock.now() - 1.0, lambda: ran.append("past"))
        await asyncio.sleep(0.05)

    _run(loop, main)
    assert ran == ["past"]
