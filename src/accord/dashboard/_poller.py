"""One snapshot shared by every viewer of the dashboard: gathered on demand, at most once per
`fresh` seconds however many pages and API clients ask, and never while nobody asks — so an
unwatched dashboard costs the cluster nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._errors import AccordError
from ._snapshot import Observer


class Poller:
    """`latest()` returns a snapshot no older than `fresh` seconds (single flight)."""

    def __init__(self, observer: Observer, *, fresh: float = 0.4, idle: float = 30.0) -> None:
        self.observer = observer
        self._fresh = fresh
        self._idle = idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._at = 0.0
        self._snap: dict[str, Any] | None = None
        self._error: str | None = None

    async def latest(self) -> dict[str, Any]:
        """The newest snapshot. Raises `AccordError` (e.g. `NotConnected`) when no node answers;
        the previous snapshot is then kept for the next successful call's rates."""
        self._rearm()
        async with self._lock:
            if self._snap is None or time.monotonic() - self._at >= self._fresh:
                started = time.monotonic()
                try:
                    self._snap = await self.observer.snapshot()
                    self._error = None
                except AccordError as exc:
                    self._error = f"{type(exc).__name__}: {exc}"
                    self._at = started
                    raise
                self._at = started
            elif self._error is not None:
                raise AccordError(self._error)
            return self._snap

    def _rearm(self) -> None:
        """After `idle` seconds without a request the observer's watches stop (started again by
        the next snapshot), so an unwatched dashboard has nothing running against the cluster."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle, self.observer.pause)

    def invalidate(self, section: str) -> None:
        """Drop cached data after an action changed it (the next `latest()` reads it again)."""
        self.observer.forget(section)
        self._at = 0.0
