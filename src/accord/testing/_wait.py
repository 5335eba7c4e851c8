"""Waiting for a condition with a deadline, as tests should (never a bare sleep): poll a probe
until it gives something truthy, and fail with what was awaited once the deadline passes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    interval: float = 0.1,
) -> T:
    """Call `probe` every `interval` seconds until it returns something truthy, and return that.
    Raises AssertionError naming `what` when `timeout` seconds pass first (a test's failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def eventually_async(
    probe: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    interval: float = 0.05,
) -> T:
    """`eventually` inside an event loop: `probe` may be a plain function or return an
    awaitable (a coroutine function); the loop keeps running between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
