"""When each shard lease will expire, as the dashboard sees it: the time the last write of the
key (acquire or renewal) reached our watch, plus the lease TTL. The server counts the TTL from
its own write, which came earlier, so this is an upper bound; no node reports anything for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from ..cluster._watch import follow
from ..engine._api import Entry

if TYPE_CHECKING:
    from .._mesh import Mesh


class LeaseClock:
    """Follows the leases bucket while started; `expiries` gives seconds left per shard."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._seen: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start following (idempotent); needs the mesh's cluster buckets."""
        buckets = self._mesh._buckets
        if self._task is None and buckets is not None:
            self._task = asyncio.get_running_loop().create_task(
                follow(buckets.leases, self._apply, pattern="shard.>", what="leases"),
                name="accord-dashboard-leases",
            )

    def pause(self) -> None:
        """Stop following without waiting (from a timer); `start` follows again."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self._seen.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _apply(self, entry: Entry) -> None:
        try:
            shard = int(entry.key.rpartition(".")[2])
        except ValueError:
            return
        if entry.deleted:
            self._seen.pop(shard, None)
        else:
            self._seen[shard] = time.time()

    def expiries(self, now: float) -> dict[int, float]:
        """Seconds until each lease seen expires at the latest (negative: overdue)."""
        ttl = self._mesh.config.lease_ttl
        return {s: round(at + ttl - now, 2) for s, at in self._seen.items()}
