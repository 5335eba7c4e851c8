"""The Redis bus's lean round trip (`_redis_wire.Lanes`, under `_redis_batch.Pipeliner`) on a
real server: a reply error fails only its command, a failed or timed-out round trip fails all of
its commands and its connection is never reused (no stale reply answers a later command), a kept
connection the server closed is replaced, and a cancelled caller does not fail the others of
its round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

from accord.bus._redis_batch import Pipeliner
from accord.bus._redis_wire import Lanes
from accord.testing import eventually_async
from accord.testing.redis import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(server.url)
    try:
        yield r
    finally:
        await r.aclose()


def _lanes(r: aioredis.Redis, timeout: float = 10.0) -> Lanes:
    return Lanes(r.connection_pool, timeout)


async def test_a_reply_error_fails_only_its_command(admin: aioredis.Redis) -> None:
    lanes = _lanes(admin)
    pipe = Pipeliner(lanes)
    try:
        results = await asyncio.gather(
            pipe.run("SET", "wire:str", "v"),
            pipe.run("XADD", "wire:str", "*", "a", "b"),  # WRONGTYPE: a string, not a stream
            pipe.run("GET", "wire:str"),
            return_exceptions=True,
        )
        assert results[0] == b"OK" and results[2] == b"v"
        assert isinstance(results[1], rex.ResponseError) and "WRONGTYPE" in str(results[1])
        assert len(lanes._open) == 1 and len(lanes._idle) == 1  # one round trip, kept
        assert await lanes.roundtrip([("ECHO", "next")]) == [b"next"]
    finally:
        await lanes.close()


async def test_a_timed_out_round_trip_fails_all_and_its_late_replies_answer_nobody(
    admin: aioredis.Redis,
) -> None:
    """While writes are paused a round trip times out; its replies, sent once the pause ends,
    must not be read as the answers of the next round trip."""
    lanes = _lanes(admin, timeout=0.3)
    pipe = Pipeliner(lanes)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        results = await asyncio.gather(pipe.run("SET", "wire:late", "1"),
                                       pipe.run("ECHO", "in the same trip"),
                                       return_exceptions=True)  # fmt: skip
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert not lanes._open  # closed, not reused
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert await pipe.run("ECHO", "fresh") == b"fresh"
        assert await pipe.run("GET", "wire:late") in (b"1", None)  # it may have been applied
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await lanes.close()


async def test_a_cancelled_caller_does_not_fail_the_others(admin: aioredis.Redis) -> None:
    lanes = _lanes(admin)
    pipe = Pipeliner(lanes)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        tasks = [asyncio.create_task(pipe.run("XADD", "wire:s", "*", "i", i)) for i in range(3)]
        await eventually_async(lambda: pipe._inflight == 1, 5.0, "the round trip is on the wire")
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert all(isinstance(done[i], bytes) for i in (0, 2)), done
        assert await admin.xlen("wire:s") == 3  # the cancelled one's command was sent too
        assert len(lanes._idle) == 1
    finally:
        await lanes.close()


async def test_a_dead_server_fails_every_command_and_the_next_trip_reconnects(
    server: RedisServer, admin: aioredis.Redis
) -> None:
    lanes = _lanes(admin)
    pipe = Pipeliner(lanes)
    try:
        assert await pipe.run("ECHO", "up") == b"up"
        server.kill()
        try:
            results = await asyncio.gather(
                pipe.run("SET", "wire:k", "1"), pipe.run("ECHO", "x"), return_exceptions=True
            )
            assert all(isinstance(r, rex.ConnectionError | OSError) for r in results), results
            assert not lanes._open
        finally:
            server.start()
        assert await pipe.run("ECHO", "back") == b"back"
    finally:
        await lanes.close()


async def test_a_closed_lane_set_refuses_round_trips(admin: aioredis.Redis) -> None:
    lanes = _lanes(admin)
    assert await lanes.roundtrip([("PING",)]) == [b"PONG"]
    await lanes.close()
    with pytest.raises(rex.ConnectionError, match="closed"):
        await lanes.roundtrip([("PING",)])


async def test_an_idle_connection_the_server_closed_is_replaced_not_failed(
    server: RedisServer, admin: aioredis.Redis
) -> None:
    """After a server restart the first round trip goes through on a new connection (the kept
    one is dead before any reply: nothing of it was executed by the new server)."""
    lanes = _lanes(admin)
    try:
        assert await lanes.roundtrip([("ECHO", "before")]) == [b"before"]
        server.kill()
        server.start()
        assert await lanes.roundtrip([("ECHO", "after")]) == [b"after"]
        assert len(lanes._open) == 1
    finally:
        await lanes.close()
