"""Fewer, bigger Redis commands for the bus: commands issued in one loop tick (or while a few
pipelines are on the wire) go in one pipeline, and the `XREADGROUP >` reads of one consumer's
partitions go in one multi-stream read.

With `appendfsync always` Redis fsyncs once per event-loop iteration before replying, so what
counts is how many round trips (and pool connections) an event needs, not how many commands.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

#: pipelines one client keeps on the wire at once (the pool has 64 connections)
MAX_INFLIGHT = 4
_FSYNCED = "_accord_fsynced"  # marks a queued command that wants the pipeline's WAITAOF


class Pipeliner:
    """`run(*args, **options)`: one command, sent with the others issued in the same tick (or
    while `max_inflight` pipelines are on the wire) as one non-transactional pipeline.
    Raises what the command (or the connection) raised; the caller maps redis-py's errors.
    `options` are redis-py's response options (e.g. `parse_justid=True` for `XCLAIM … JUSTID`):
    a reply its parser chokes on would leave the rest of the pipeline's replies unread."""

    def __init__(self, client: aioredis.Redis, max_inflight: int = MAX_INFLIGHT) -> None:
        self.r = client
        self.max_inflight = max_inflight
        self._queue: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._inflight = 0

    async def run(self, *args: Any, **options: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, options, fut))
        self._kick()
        return await asyncio.shield(fut)  # a cancelled caller does not fail the others

    async def run_fsynced(self, *args: Any) -> tuple[Any, int]:
        """One write command, then `WAITAOF 1 0 1000` at the end of its pipeline (on its own
        connection: WAITAOF waits for the writes of its connection only): the command's reply
        and how many local fsyncs confirmed it (0: not within the second). One WAITAOF covers
        every write of the pipeline: a WAITAOF per write would make each wait for an fsync."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, {_FSYNCED: True}, fut))
        self._kick()
        res, local = await asyncio.shield(fut)
        return res, local

    def _kick(self) -> None:
        # Group commit: at most `max_inflight` pipelines on the wire; what is issued meanwhile
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
            pipe = self.r.pipeline(transaction=False)
            fsynced = False
            for args, options, _fut in batch:
                if _FSYNCED in options:
                    fsynced = True
                    pipe.execute_command(*args)
                else:
                    pipe.execute_command(*args, **options)
            if fsynced:
                pipe.execute_command("WAITAOF", 1, 0, 1000)
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: none of them is confirmed
            for _args, _options, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._inflight -= 1
            self._kick()
        local = 0
        if fsynced:
            waited = results.pop()
            local = 0 if isinstance(waited, Exception) else int(waited[0])
        for (_args, options, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result((res, local) if options.get(_FSYNCED) else res)


class _Demand:
    __slots__ = ("deadline", "fut", "key", "limit")

    def __init__(self, key: str, limit: int, deadline: float, fut: asyncio.Future[Any]) -> None:
        self.key, self.limit, self.deadline, self.fut = key, limit, deadline, fut


class ReadMux:
    """The new-entry reads of one (group, consumer) over all its partitions' streams: the reads
    asked for in one tick become one `XREADGROUP … STREAMS k1 k2 … > > …` that blocks at most
    until the earliest caller's deadline (so no read outlives the lease its caller checked). A
    caller whose stream got nothing is read again with the next batch until its deadline."""

    def __init__(self, client: aioredis.Redis, group: str, consumer: str) -> None:
        self.r = client
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
        try:
            reply: Any = await self.r.xreadgroup(
                self.group, self.consumer, dict.fromkeys(live, ">"), count=count, block=block
            )
        except BaseException as exc:
            for d in live.values():
                if not d.fut.done():
                    d.fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
            if not isinstance(exc, Exception):
                raise
            return
        for stream, entries in reply or []:
            got = live.pop(stream.decode() if isinstance(stream, bytes) else str(stream), None)
            if got is not None and not got.fut.done():
                got.fut.set_result(entries)  # a cancelled caller's entries stay pending with us
        for d in live.values():  # nothing for these yet: again with the next read
            if not d.fut.done():
                self._enqueue(d)
