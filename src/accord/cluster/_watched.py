"""A locally cached, watched copy of a KV bucket (topic subscriptions, agent type modes).

The watch starts on first use; `get_all()` waits until the initial values have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js.kv import KeyValue

from .._background import Background

log = logging.getLogger("accord.registry")


class WatchedKV:
    def __init__(self, kv: KeyValue | None, bg: Background, prefix: str = "") -> None:
        self.kv = kv
        self._bg = bg
        self._prefix = prefix
        self._data: dict[str, bytes] = {}
        self._ready = asyncio.Event()
        self._started = False

    async def get_all(self, timeout: float = 5.0) -> dict[str, bytes]:
        if self.kv is None:
            return self._data
        if not self._started:
            self._started = True
            self._bg.spawn(self._watch(), name=f"accord-watch-{self._prefix or 'kv'}")
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        return self._data

    def loaded(self) -> dict[str, bytes] | None:
        """The values if no wait is needed (watch started and initial values in), else None."""
        if self.kv is None or self._ready.is_set():
            return self._data
        return None

    def set_local(self, key: str, value: bytes) -> None:
        self._data[key] = value

    async def _watch(self) -> None:
        assert self.kv is not None
        keys = f"{self._prefix}>" if self._prefix else ">"
        while True:
            try:
                watcher = await self.kv.watch(keys)
                async for entry in watcher:
                    if entry is None:
                        self._ready.set()
                        continue
                    key = entry.key.removeprefix(self._prefix)
                    if entry.operation in ("DEL", "PURGE") or entry.value is None:
                        self._data.pop(key, None)
                    else:
                        self._data[key] = entry.value
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch of %s failed, restarting: %s", self._prefix or "bucket", exc)
                await asyncio.sleep(0.5)
