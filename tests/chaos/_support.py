"""Shared pieces of the chaos tests: the example app, traffic helpers, ask-with-epoch."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

import accord
from accord import _codec as codec
from accord._ids import shard_of

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "counter_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from counter_app import Count, Increment  # noqa: E402

T = TypeVar("T")

__all__ = ["APP", "Count", "Increment", "ask_with_epoch", "eventually"]


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns a non-None value; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def ask_with_epoch(
    mesh: accord.Mesh, agent: str, msg: msgspec.Struct, timeout: float = 1.0, returns: Any = Count
) -> tuple[Any, int, str]:
    """Ask over the raw wire protocol and return (reply, owner's lease epoch, owner node name)."""
    shard = shard_of(agent, mesh.config.num_shards)
    req = codec.Request(
        v=codec.PROTOCOL_VERSION,
        kind="ask",
        target=agent,
        type=type(msg).__name__,
        body=msgspec.Raw(codec.encode(msg)),
        timeout_ms=int(timeout * 1000),
    )
    data = await mesh._transport.request(
        mesh.names.shard_subject(shard), codec.encode(req), timeout
    )
    reply, _ = codec.decode_reply(data)
    assert reply.ok, reply.error
    assert reply.epoch is not None and reply.node is not None
    return msgspec.msgpack.decode(reply.body, type=returns), reply.epoch, reply.node


def shard_owners(status: dict[str, Any]) -> dict[int, tuple[str, int]]:
    return {s["shard"]: (s["owner"], s["epoch"]) for s in status["shards"]}
