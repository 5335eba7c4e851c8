"""A locally cached, watched copy of a KV bucket (topic subscriptions, agent type modes).

The watch starts on first use; `get_all()` waits until the initial values have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib

from .._background import Background
from .._errors import AccordError, NotConnected
from ..engine._api import KV, Entry, NoResponders, NotFound, Refused, RequestTimeout
from ._watch import follow


class WatchedKV:
    def __init__(self, kv: KV | None, bg: Background, prefix: str = "") -> None:
        self.kv = kv
        self._bg = bg
        self._prefix = prefix
        self._data: dict[str, bytes] = {}
        self._ready = asyncio.Event()
        self._started = False
        self._confirming = False

    async def get_all(self, timeout: float = 5.0) -> dict[str, bytes]:
        """Every value; the first call waits (up to `timeout`) for the initial ones.

        Raises `NotConnected` when they have not arrived by then: an empty answer would be
        taken for "no subscriptions" or "no such type", which the engine did not say.
        """
        if self.kv is None:
            return self._data
        if not self._started:
            self._started = True
            self._bg.spawn(self._watch(), name=f"accord-watch-{self._prefix or 'kv'}")
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), max(0.0, timeout))
            if not self._ready.is_set():
                what = f"{self.kv.name} ({self._prefix}*)" if self._prefix else self.kv.name
                raise NotConnected(f"the registry {what} did not load within {timeout:.1f}s")
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
        await follow(
            self.kv,
            self._apply,
            pattern=f"{self._prefix}>" if self._prefix else ">",
            synced=self._synced,
            what=self._prefix or self.kv.name,
        )

    def _synced(self) -> None:
        if self._data or self._ready.is_set() or self._confirming:
            self._ready.set()
            return
        # nats-py's watcher can say "all current values delivered" before the first one arrived
        # (its pending count races with delivery): an empty registry is confirmed from the
        # server's key index before anyone is told "no subscriptions" or "no such type".
        self._confirming = True
        self._bg.spawn(self._confirm_empty(), name=f"accord-watch-confirm-{self._prefix or 'kv'}")

    async def _confirm_empty(self) -> None:
        assert self.kv is not None
        try:
            for key in await self.kv.keys():
                if not key.startswith(self._prefix) or key.removeprefix(self._prefix) in self._data:
                    continue
                entry = await self.kv.get(key)
                if entry is not None and not entry.deleted:
                    self._data.setdefault(key.removeprefix(self._prefix), entry.value)
        except (AccordError, Refused, NotFound, RequestTimeout, NoResponders):
            pass  # the watch goes on: whatever it delivers still lands
        finally:
            self._ready.set()

    def _apply(self, entry: Entry) -> None:
        key = entry.key.removeprefix(self._prefix)
        if entry.deleted:
            self._data.pop(key, None)
        else:
            self._data[key] = entry.value
