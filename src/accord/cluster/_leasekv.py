"""Lease primitives on a KV bucket with per-message TTLs, shared by shard leases and named leases.

`create` takes a key iff it is absent or a tombstone (a delete, or the marker the server writes
when a key expires by TTL); `renew` is compare-and-set on the last revision, refreshing the TTL.
The revision returned by `create` is the holder's fencing token: revisions only grow.
"""

from __future__ import annotations

import contextlib

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

WRONG_LAST_SEQUENCE = (10071, 10164)


class Taken(Exception):
    """The key is held by someone else (create), or was taken or expired (renew)."""


class LeaseKV:
    def __init__(self, js: JetStreamContext, kv: KeyValue, ttl: int) -> None:
        self._js = js
        self._kv = kv
        self.ttl = ttl

    def _subject(self, key: str) -> str:
        return f"$KV.{self._kv._name}.{key}"

    async def _publish(self, key: str, value: bytes, last: int) -> int:
        headers = {"Nats-TTL": f"{self.ttl}s", "Nats-Expected-Last-Subject-Sequence": str(last)}
        ack = await self._js.publish(
            self._subject(key), value, headers=headers, timeout=max(0.5, self.ttl / 2)
        )
        return int(ack.seq)

    async def create(self, key: str, value: bytes) -> int:
        """Take `key`; raise `Taken` if it is held. nats-py's `kv.create` does not recognise the
        server's TTL-expiry marker (`Nats-Marker-Reason`) as a deletion, so this checks itself."""
        try:
            return await self._publish(key, value, 0)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
        try:
            last = await self._js.get_msg(self._kv._stream, subject=self._subject(key))
        except nats.js.errors.NotFoundError:  # the marker itself expired meanwhile
            return await self._publish(key, value, 0)
        hdrs = last.headers or {}
        if hdrs.get("KV-Operation") not in ("DEL", "PURGE") and "Nats-Marker-Reason" not in hdrs:
            raise Taken(key)
        try:
            return await self._publish(key, value, int(last.seq or 0))
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise Taken(key) from None
            raise

    async def renew(self, key: str, value: bytes, last: int) -> int:
        """Refresh the TTL iff `last` is still the key's revision; raise `Taken` otherwise.

        Other failures (timeouts, disconnection) propagate: the lease may still be held.
        """
        try:
            return await self._publish(key, value, last)
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise Taken(key) from None
            raise

    async def last(self, key: str) -> tuple[bytes, int] | None:
        """The key's current value and revision (None if absent or a tombstone)."""
        try:
            msg = await self._js.get_msg(self._kv._stream, subject=self._subject(key))
        except nats.js.errors.NotFoundError:
            return None
        hdrs = msg.headers or {}
        if hdrs.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in hdrs:
            return None
        return msg.data or b"", int(msg.seq or 0)

    async def release(self, key: str, last: int) -> None:
        """Delete the key iff `last` is still its revision (best effort)."""
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self._kv.delete(key, last=last)
