"""A lean round trip for the bus's hot commands (the XADDs, acks and touches of
`_redis_batch.Pipeliner`, the WAITAOF fence, the consumers' `XREADGROUP >` reads): many
commands, one write, one reply each.

redis-py's `Pipeline` costs ~60 µs of CPU per round trip and ~8 µs per command on top of the
command (a command stack, response callbacks, a retry wrapper, observability hooks, a pooled
connection checked out and in, a timer per reply read). Here: a few connections of our own
(the client's pool keeps serving everything else), commands
packed by hand, one timer for the whole round trip, hiredis replies as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP arrays of bulk strings, as redis-py packs them, for str / bytes / int arguments
    (anything else is a bug of the caller: a clear TypeError, not a guess at an encoding)."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int) and not isinstance(a, bool):
                a = b"%d" % a
            elif not isinstance(a, bytes):
                raise TypeError(f"a Redis command argument must be str, bytes or int: {a!r}")
            out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


class Lanes:
    """Connections made like the pool's, without its socket timeout (one deadline per round
    trip instead); one round trip on a connection at a time. A connection whose round trip
    did not end cleanly (an error, a timeout, a cancellation) is closed, never reused: replies
    left unread would answer the next caller's commands."""

    def __init__(self, pool: aioredis.ConnectionPool, timeout: float) -> None:
        # RESP2 whatever the URL asks for: the callers read replies by their RESP2 shapes
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None, "protocol": 2}
        self._cls = pool.connection_class
        self.timeout = timeout
        self._idle: list[Any] = []
        self._open: set[Any] = set()
        self._closed = False

    async def roundtrip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One reply per command: its value, or the `ResponseError` the server answered it with.
        Raises (for all of them) what the connection raised: redis-py's `ConnectionError`,
        `TimeoutError` (after `timeout` seconds), `OSError`; a cancellation goes on up.

        A connection kept idle that fails before its first reply (the server closed it
        meanwhile: a restart) is replaced and the round trip sent once more on a new one, as
        redis-py's own retry did: had the server executed the commands after all, they run
        twice (an XADD: a duplicate event, which at-least-once allows)."""
        if self._closed:
            raise rex.ConnectionError("the bus's Redis client is closed")
        packed = pack(commands)
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else self._new()
            replies: list[Any] = []
            try:
                await self._on(conn, packed, len(commands), replies)
                return replies
            except (rex.ConnectionError, OSError) as exc:
                stale = reused and not replies and not isinstance(exc, TimeoutError)
                if not stale or isinstance(exc, rex.BusyLoadingError):
                    raise

    async def _on(self, conn: Any, packed: bytes, n: int, replies: list[Any]) -> None:
        clean = False
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(packed, check_health=False)
                for _ in range(n):
                    try:
                        replies.append(await conn.read_response())
                    except rex.ResponseError as exc:  # this command's, the others go on
                        replies.append(exc)
            clean = True
        finally:
            if clean:
                self._idle.append(conn)
            else:
                self._open.discard(conn)
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    def _new(self) -> Any:
        conn = self._cls(**self._kwargs)
        self._open.add(conn)
        return conn

    async def close(self) -> None:
        self._closed = True
        conns, self._open, self._idle = self._open, set(), []
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.disconnect()
