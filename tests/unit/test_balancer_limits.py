"""The services load balancer bounds what a client can make it hold: a request head trickled
slower than `head_timeout` (slowloris) is closed, the first on a connection and each later one
on a kept-alive connection alike (while a client idle between requests is not cut off), too
many headers or an over-long header line get 400. A real aiohttp server on loopback; the
service view is a stub (no service routes)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from accord.services._proxy import MAX_HEADER_LINE, MAX_HEADERS, Balancer


class _NoServices:
    def current_specs(self) -> dict[str, Any]:
        return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def balancer() -> AsyncIterator[Balancer]:
    b = Balancer(_NoServices(), "127.0.0.1", _free_port())  # type: ignore[arg-type]
    b.head_timeout = 0.5
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


async def _exchange(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()


async def test_a_request_head_sent_too_slowly_is_closed(balancer: Balancer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        assert await asyncio.wait_for(reader.read(4096), 10) == b""  # closed by the server
    finally:
        writer.close()


async def test_a_complete_request_head_is_answered(balancer: Balancer) -> None:
    reply = await _exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404")  # no service routes it: answered, not closed


async def test_too_many_headers_are_refused(balancer: Balancer) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    reply = await _exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert reply.split(b" ", 2)[1] == b"400", reply[:80]


async def test_an_over_long_header_line_is_refused(balancer: Balancer) -> None:
    long = b"X-Long: " + b"a" * (MAX_HEADER_LINE + 1) + b"\r\n"
    reply = await _exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + long + b"\r\n")
    assert reply.split(b" ", 2)[1] in (b"400", b"431"), reply[:80]


@pytest.fixture
async def long_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's own keep-alive timeout out of the way: a close then is the head deadline's."""
    monkeypatch.setattr("accord.services._proxy.IDLE_TIMEOUT", 600.0)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def test_a_later_request_head_on_a_kept_alive_connection_is_bounded_too(
    long_idle: None, balancer: Balancer
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await _answer(reader)).startswith(b"HTTP/1.1 404")  # kept alive
        writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n")  # the second head, never ended
        await writer.drain()
        assert await asyncio.wait_for(reader.read(4096), 60) == b""  # closed by the server
    finally:
        writer.close()


async def test_a_kept_alive_connection_serves_requests_spaced_beyond_the_head_timeout(
    long_idle: None, balancer: Balancer
) -> None:
    # The deadline runs from a head's first byte, not from the last answer: a client that
    # pauses between requests (idle, below the keep-alive timeout) is not cut off.
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await _answer(reader)).startswith(b"HTTP/1.1 404")
            await asyncio.sleep(balancer.head_timeout * 2)  # idle longer than a head may take
    finally:
        writer.close()
