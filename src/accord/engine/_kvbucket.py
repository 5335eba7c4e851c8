"""A KV bucket behind the `engine._api.KV` protocol, over nats-py (for the timer index).

Small on purpose: once the engine adapters (`NatsTransport.bucket`) are on this branch, callers
open their bucket with `transport.bucket(BucketSpec(...))` and this module goes away.
"""

from __future__ import annotations

import contextlib

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .._errors import ConfigurationError, NotConnected
from ._api import Entry, NotFound, RequestTimeout, Transport, WrongRevision
from ._nats import NatsTransport


async def open_bucket(transport: Transport, name: str, replicas: int = 1) -> NatsKV:
    """Open (creating if missing) the bucket `name`. Raises `NotConnected` if JetStream does not
    answer, `ConfigurationError` on a transport that is not NATS."""
    if not isinstance(transport, NatsTransport):
        raise ConfigurationError("a KV bucket needs a NATS JetStream transport")
    js = transport.js
    try:
        try:
            return NatsKV(name, await js.key_value(name))
        except nats.js.errors.BucketNotFoundError:
            pass
        cfg = KeyValueConfig(bucket=name, history=1, replicas=replicas, storage=StorageType.FILE)
        try:
            return NatsKV(name, await js.create_key_value(cfg))
        except nats.js.errors.BadRequestError:  # created concurrently by another node
            return NatsKV(name, await js.key_value(name))
    except (nats.errors.Error, TimeoutError) as exc:
        raise NotConnected(f"cannot open bucket {name}: {exc}") from None


class NatsKV:
    def __init__(self, name: str, kv: KeyValue) -> None:
        self.name = name
        self._kv = kv

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        try:
            e = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"{self.name}: cannot read {key}: {exc}") from None
        return Entry(key, e.value or b"", int(e.revision or 0))

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        try:
            return int(await self._kv.put(key, value))
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"{self.name}: cannot write {key}: {exc}") from None

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        try:
            await self._kv.delete(key, last=last or None)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise WrongRevision(key) from None
        except nats.js.errors.KeyNotFoundError:
            raise NotFound(key) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"{self.name}: cannot delete {key}: {exc}") from None

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        try:
            return list(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"{self.name}: cannot list keys: {exc}") from None

    async def watch(self, pattern: str = ">") -> NatsWatch:
        try:
            return NatsWatch(await self._kv.watch(pattern))
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"{self.name}: cannot watch: {exc}") from None


class NatsWatch:
    def __init__(self, watcher: KeyValue.KeyWatcher) -> None:
        self._w = watcher

    async def next(self, timeout: float) -> Entry | None:
        """The next change; None once after the initial values. `RequestTimeout` when nothing
        came within `timeout`, `NotConnected` when the watch broke."""
        try:
            e = await self._w.updates(timeout=timeout)  # type: ignore[no-untyped-call]
        except (nats.errors.TimeoutError, TimeoutError):
            raise RequestTimeout() from None
        except nats.errors.Error as exc:
            raise NotConnected(f"watch ended: {exc}") from None
        if e is None:
            return None
        if not hasattr(e, "key"):  # nats-py's stop sentinel: the watch was stopped
            raise NotConnected("watch stopped")
        deleted = e.operation in ("DEL", "PURGE") or e.value is None
        return Entry(e.key, e.value or b"", int(e.revision or 0), deleted)

    async def stop(self) -> None:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._w.stop()  # type: ignore[no-untyped-call]
