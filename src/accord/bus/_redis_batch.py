"""Fewer, bigger Redis commands for the bus: commands issued in one loop tick (or while a few
round trips are on the wire) go in one round trip, the `XREADGROUP >` reads of one consumer's
partitions go in one multi-stream read, and one `WAITAOF` fence confirms many publishes.

With `appendfsync always` Redis fsyncs once per event-loop iteration before replying, so what
counts is how many round trips (and connections) an event needs, not how many commands. The
round trips themselves are `_redis_wire.Lanes`'.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._redis_wire import Lanes

#: round trips of commands one client keeps on the wire at once
MAX_INFLIGHT = 4
FENCE_TTL_MS = 60_000  # the fence key outlives its producer by at most this


def _fail(futs: list[asyncio.Future[Any]], exc: BaseException) -> None:
    """A round trip failed: so did every command in it. A cancellation goes on up (the waiters
    see a connection error)."""
    for fut in futs:
        if not fut.done():
            fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
    if not isinstance(exc, Exception):
        raise exc


class Pipeliner:
    """`run(*args)`: one command, sent with the others issued in the same tick (or while
    `max_inflight` round trips are on the wire) in one round trip of `lanes`. Returns its raw
    reply; raises the `ResponseError` the server answered it with, or what the connection
    raised (for every command of that round trip); the caller maps redis-py's errors."""

    def __init__(self, lanes: Lanes, max_inflight: int = MAX_INFLIGHT) -> None:
        self.lanes = lanes
        self.max_inflight = max_inflight
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._inflight = 0

    async def run(self, *args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, fut))
        self._kick()
        # No shield: the future is this caller's alone; cancelled, the flush skips it.
        return await fut

    def _kick(self) -> None:
        # Group commit: at most `max_inflight` round trips on the wire; what is issued meanwhile
        # waits for one of them and goes with the others as the next one (fewer, bigger round
        # trips under load, each waiting at most one round trip longer).
        if self._queue and not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        await asyncio.sleep(0)
        self._scheduled = False
        batch, self._queue = self._queue, []
        self._inflight += 1
        try:
            results = await self.lanes.roundtrip([args for args, _fut in batch])
        except BaseException as exc:  # the connection failed: none of them is confirmed
            _fail([fut for _args, fut in batch], exc)
            return
        finally:
            self._inflight -= 1
            self._kick()
        for (_args, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)


class Fence:
    """Group commit of `WAITAOF` (`appendfsync everysec`): `confirm()`, called once a write's
    reply has arrived, returns how many local fsyncs cover that write (1, or 0 if none within
    the second).

    Why this is sound (Redis/Valkey `call()` and `waitaofCommand`): a connection's `woff` is the
    global replication offset right after its last write that propagated, and `WAITAOF` waits
    until the global fsynced offset reaches the `woff` of its own connection. The fence writes a
    key of its own (`SET key 1 PX`) and then sends `WAITAOF` on the same connection: that write
    is executed after every write whose reply had arrived before the fence was sent, so its
    offset is larger than theirs, and the fsync that covers it covers them too. A `WAITAOF` on
    a connection that wrote nothing returns at once and confirms nothing, which is why the
    fence writes. One fence is on the wire at a time; writes whose replies arrive meanwhile wait
    for the next one (each publish waits at most two fsync periods). The writes themselves do
    not wait for a fence: their replies (with `everysec`, at once) are what readers see."""

    def __init__(self, lanes: Lanes, key: str) -> None:
        self.lanes = lanes
        self.key = key
        self._waiting: list[asyncio.Future[int]] = []
        self._task: asyncio.Task[None] | None = None

    async def confirm(self) -> int:
        """Wait for a fence sent after now; raises what its connection raised."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._kick()
        return await fut  # this caller's alone: cancelled, the fence skips it

    def _kick(self) -> None:
        if self._waiting and self._task is None:
            self._task = asyncio.create_task(self._send())

    async def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            wrote, waited = await self.lanes.roundtrip(
                [("SET", self.key, b"1", "PX", FENCE_TTL_MS), ("WAITAOF", 1, 0, 1000)]
            )
            if isinstance(wrote, Exception):  # no write of its own: its WAITAOF proves nothing
                raise wrote
            local = 0 if isinstance(waited, Exception) else int(waited[0])
        except BaseException as exc:  # the fence failed: none of them is confirmed
            _fail(batch, exc)
            return
        finally:
            self._task = None
            self._kick()
        for fut in batch:
            if not fut.done():
                fut.set_result(local)


class _Demand:
    __slots__ = ("deadline", "fut", "key", "limit")

    def __init__(self, key: str, limit: int, deadline: float, fut: asyncio.Future[Any]) -> None:
        self.key, self.limit, self.deadline, self.fut = key, limit, deadline, fut


class ReadMux:
    """The new-entry reads of one (group, consumer) over all its partitions' streams: the reads
    asked for in one tick become one `XREADGROUP … STREAMS k1 k2 … > > …` that blocks at most
    until the earliest caller's deadline (so no read outlives the lease its caller checked). A
    caller whose stream got nothing is read again with the next batch until its deadline."""

    def __init__(self, lanes: Lanes, group: str, consumer: str) -> None:
        self.lanes = lanes
        self.group = group
        self.consumer = consumer
        self._queue: list[_Demand] = []
        self._reads: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    async def read(self, key: str, limit: int, block: float) -> list[Any]:
        """Up to `limit` new entries of `key` (`[(id, fields), ...]`), waiting up to `block`."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._enqueue(_Demand(key, limit, self._loop.time() + block, fut))
        return await fut  # type: ignore[no-any-return]

    def _enqueue(self, d: _Demand) -> None:
        if not self._queue:
            task = asyncio.create_task(self._read())
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)
        self._queue.append(d)

    async def _read(self) -> None:
        # two ticks: a partition whose read just returned asks again in the next one
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        batch, self._queue = self._queue, []
        now = self._loop.time()
        live: dict[str, _Demand] = {}
        for d in batch:
            if d.fut.done():
                continue
            if d.deadline - now < 0.001 or d.key in live:  # due (or a stray second ask)
                d.fut.set_result([])
                continue
            live[d.key] = d
        if not live:
            return
        block = max(1, int((min(d.deadline for d in live.values()) - now) * 1000))
        count = min(d.limit for d in live.values())
        read = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "BLOCK", block,
                "STREAMS", *live, *[">"] * len(live))  # fmt: skip
        try:
            (reply,) = await self.lanes.roundtrip([read])
            if isinstance(reply, Exception):  # e.g. NOGROUP: the group was removed
                raise reply
        except BaseException as exc:
            _fail([d.fut for d in live.values()], exc)
            return
        for stream, entries in reply or []:  # hiredis: [[stream, [[id, [f, v, …]], …]], …]
            got = live.pop(stream.decode() if isinstance(stream, bytes) else str(stream), None)
            if got is not None and not got.fut.done():
                # a cancelled caller's entries stay pending with us
                got.fut.set_result([(eid, dict(zip(f[::2], f[1::2], strict=True)))
                                    for eid, f in entries if f is not None])  # fmt: skip
        for d in live.values():  # nothing for these yet: again with the next read
            if not d.fut.done():
                self._enqueue(d)
