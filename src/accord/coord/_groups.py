"""Barriers and distributed counters for groups of agents, on a JetStream KV bucket.

A barrier `name` for `parties` participants: each arrival creates its own key; everyone waits
until `parties` keys exist. A counter is one key updated by compare-and-set, so concurrent `add`s
from any number of processes are linearizable and none is lost.
"""

from __future__ import annotations

import asyncio
import json
import time

import nats.js.errors
from nats.js.kv import KeyValue

from .._errors import ConfigurationError, DeliveryTimeout
from ._leases import validate_name


async def barrier(kv: KeyValue, name: str, member: str, parties: int, timeout: float) -> int:
    """Arrive at barrier `name` as `member`; return when `parties` members arrived.

    Raises `DeliveryTimeout` if they have not all arrived within `timeout`. Arriving twice as the
    same member counts once. The arrivals are one key, updated by compare-and-set.
    """
    validate_name(name)
    if parties < 1:
        raise ConfigurationError("a barrier needs at least one party")
    key = f"b.{name}"
    while True:  # add ourselves to the set of arrivals
        members, revision = await _members(kv, key)
        if member in members:
            break
        value = json.dumps(sorted({*members, member})).encode()
        try:
            if revision:
                await kv.update(key, value, last=revision)
            else:
                await kv.create(key, value)
            break
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    deadline = time.monotonic() + timeout
    while True:
        members, _ = await _members(kv, key)
        if len(members) >= parties:
            return len(members)
        if time.monotonic() >= deadline:
            raise DeliveryTimeout(
                f"barrier {name!r}: {len(members)}/{parties} arrived within {timeout}s",
                maybe_delivered=True,
            )
        await asyncio.sleep(0.02)


async def _members(kv: KeyValue, key: str) -> tuple[list[str], int]:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return [], 0
    return list(json.loads(entry.value or b"[]")), int(entry.revision or 0)


async def counter_add(kv: KeyValue, name: str, delta: int) -> int:
    """Add `delta` to counter `name` and return the new value."""
    validate_name(name)
    key = f"c.{name}"
    while True:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        value = (int(entry.value or b"0") if entry else 0) + delta
        try:
            if entry is None:
                await kv.create(key, str(value).encode())
            else:
                await kv.update(key, str(value).encode(), last=entry.revision)
            return value
        except nats.js.errors.KeyWrongLastSequenceError:
            continue


async def counter_value(kv: KeyValue, name: str) -> int:
    validate_name(name)
    try:
        entry = await kv.get(f"c.{name}")
    except nats.js.errors.KeyNotFoundError:
        return 0
    return int(entry.value or b"0")
