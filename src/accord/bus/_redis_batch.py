"""Fewer, bigger Redis commands for the bus: commands issued in one loop tick go in one pipeline,
and the `XREADGROUP >` reads of one consumer's partitions go in one multi-stream read.

With `appendfsync always` Redis fsyncs once per event-loop iteration before replying, so what
counts is how many round trips (and pool connections) an event needs, not how many commands.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis


class Pipeliner:
    """`run(*args, **options)`: one command, sent with the others issued in the same tick as
    one non-transactional pipeline (one round trip). Raises what the command (or the
    connection) raised; the caller maps redis-py's errors. `options` are redis-py's response
    options (e.g. `parse_justid=True` for `XCLAIM … JUSTID`): a reply its parser chokes on
    would leave the rest of the pipeline's replies unread on the connection."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._queue: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def run(self, *args: Any, **options: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._queue:
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        self._queue.append((args, options, fut))
        return await asyncio.shield(fut)  # a cancelled caller does not fail the others

    async def _flush(self) -> None:
        await asyncio.sleep(0)
        batch, self._queue = self._queue, []
        try:
            pipe = self.r.pipeline(transaction=False)
            for args, options, _fut in batch:
                pipe.execute_command(*args, **options)
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: none of them is confirmed
            for _args, _options, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
            if not isinstance(exc, Exception):
                raise
            return
        for (_args, _options, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)


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
