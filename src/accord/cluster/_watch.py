"""The one KV watch loop: current values, then every change, restarted when it fails or stalls.

Membership, shard leases and the watched registries (`_watched.WatchedKV`) all follow a bucket
this way. A watch's consumer lives on one server; when that server is cut off or dies the watch
goes silent rather than failing, so a bucket that is written often (heartbeats, lease renewals)
treats `stall` seconds of silence as a dead watch and starts a new one (which replays the current
values: the callers' `apply` must take a value it has already seen).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from .._clock import Clock, LoopClock
from .._retry import Backoff
from ..engine._api import KV, Entry, RequestTimeout, Watch

log = logging.getLogger("accord.watch")

_QUIET = 3600.0  # the `next` timeout of a watch that has no stall limit: silence is fine


def _nothing() -> None:
    pass


async def follow(
    kv: KV,
    apply: Callable[[Entry], None],
    *,
    pattern: str = ">",
    stall: float | None = None,
    synced: Callable[[], None] = _nothing,
    restarted: Callable[[], None] = _nothing,
    clock: Clock | None = None,
    what: str = "bucket",
) -> None:
    """Run `apply` for each entry of `kv` matching `pattern`, forever (until cancelled).

    `synced` runs each time the current values have all been delivered (after every (re)start).
    With `stall`, a watch that delivered nothing for that long is replaced at once. A failed watch
    (or an `apply` that raised) is replaced after a capped backoff on `clock`. `restarted` runs
    before each replacement (e.g. so a neighbour restarts its own watch on the same server).
    """
    clock = clock or LoopClock()
    backoff = Backoff(0.2, 2.0)  # a healed partition is seen within ~2 s
    while True:
        watch: Watch | None = None
        try:
            watch = await kv.watch(pattern)
            while True:
                try:
                    entry = await watch.next(timeout=stall or _QUIET)
                except RequestTimeout:
                    if stall is None:
                        continue
                    log.info("watch of %s silent for %.0fs, restarting it", what, stall)
                    restarted()
                    break  # a new watch at once: this one's consumer is gone, not the engine
                if entry is None:
                    backoff.reset()
                    synced()
                else:
                    apply(entry)
        except Exception as exc:  # the engine's NotConnected, or a bug in `apply`: go on
            log.warning("watch of %s failed, restarting: %r", what, exc)
            restarted()
            await clock.sleep(backoff.next())
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):
                    await watch.stop()
