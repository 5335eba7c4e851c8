"""Barriers and distributed counters for groups of agents, on the cluster's coord KV bucket.

A barrier `name` for `parties` participants is one key holding the set of arrivals, updated by
compare-and-set; everyone waits until the set has `parties` members. A counter is one key updated
by compare-and-set, so concurrent `add`s from any number of processes are linearizable and none
is lost.
"""

from __future__ import annotations

import asyncio
import json
import time

from .._errors import ConfigurationError, DeliveryTimeout
from ..engine._api import KV, Entry, WrongRevision
from ._leases import engine_errors, validate_name

_IO_TIMEOUT = 5.0  # seconds for one engine request (a barrier may wait for much longer)
_POLL = 0.02


@engine_errors
async def barrier(kv: KV, name: str, member: str, parties: int, timeout: float) -> int:
    """Arrive at barrier `name` as `member`; return the number of arrivals once `parties` members
    have arrived.

    Arriving twice as the same member counts once. Raises `DeliveryTimeout` (with
    `maybe_delivered=True`: our arrival may be recorded and counts for the others) when not all
    arrived within `timeout` seconds of the call, and `NotConnected` when the engine does not
    answer (arrival recorded or not). On cancellation our arrival may or may not be recorded; an
    arrival is never withdrawn, so a member that gives up still counts for the others.
    """
    validate_name(name)
    if parties < 1:
        raise ConfigurationError("a barrier needs at least one party")
    key = f"b.{name}"
    deadline = time.monotonic() + timeout
    while True:  # add ourselves to the set of arrivals
        members, revision = await _members(kv, key)
        if member in members:
            break
        value = json.dumps(sorted({*members, member})).encode()
        try:
            if revision:
                await kv.update(key, value, revision, timeout=_IO_TIMEOUT)
            else:
                await kv.create(key, value, timeout=_IO_TIMEOUT)
            break
        except WrongRevision:
            continue  # another member arrived at the same time: read again
    while True:
        members, _ = await _members(kv, key)
        if len(members) >= parties:
            return len(members)
        if time.monotonic() >= deadline:
            raise DeliveryTimeout(
                f"barrier {name!r}: {len(members)}/{parties} arrived within {timeout}s",
                maybe_delivered=True,
            )
        await asyncio.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))


async def _members(kv: KV, key: str) -> tuple[list[str], int]:
    entry = await kv.get(key, timeout=_IO_TIMEOUT)
    if entry is None:
        return [], 0
    return list(json.loads(entry.value or b"[]")), entry.revision


@engine_errors
async def counter_add(kv: KV, name: str, delta: int) -> int:
    """Add `delta` to counter `name` and return the new value (the value right after this add).

    Concurrent adds are applied one after the other, none lost. Raises `NotConnected` when the
    engine does not answer: if that happens after the compare-and-set was sent, the add may have
    been applied, so a retry may add twice. On cancellation, likewise, the add may or may not have
    been applied.
    """
    validate_name(name)
    key = f"c.{name}"
    while True:
        entry = await kv.get(key, timeout=_IO_TIMEOUT)
        value = _count(entry) + delta
        try:
            if entry is None:
                await kv.create(key, str(value).encode(), timeout=_IO_TIMEOUT)
            else:
                await kv.update(key, str(value).encode(), entry.revision, timeout=_IO_TIMEOUT)
            return value
        except WrongRevision:
            continue  # another add came first: read again


@engine_errors
async def counter_value(kv: KV, name: str) -> int:
    """The counter's current value (0 if it was never added to); `NotConnected` if the engine
    does not answer."""
    validate_name(name)
    return _count(await kv.get(f"c.{name}", timeout=_IO_TIMEOUT))


def _count(entry: Entry | None) -> int:
    return int(entry.value or b"0") if entry is not None else 0
