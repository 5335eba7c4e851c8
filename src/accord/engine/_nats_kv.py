"""`KV` over a NATS KV bucket (the stream `KV_<bucket>`, one subject `$KV.<bucket>.<key>` per key).

Writes are raw publishes with `Nats-Expected-Last-Subject-Sequence` (and `Nats-TTL` for a key that
expires), answered through the transport's shared inbox. A key's last message may be a value, a
DEL/PURGE tombstone, or the marker the server writes when a key expires (`Nats-Marker-Reason`):
only a value counts as present — nats-py's own `create` does not know the marker, hence this.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .._errors import NotConnected
from ._api import Entry, NoResponders, NotFound, RequestTimeout, StoredMessage, WrongRevision
from ._nats_errors import map_errors
from ._nats_wire import decode_ack

T = TypeVar("T")


class Requests(Protocol):
    """What a bucket needs of the engine it was opened on (`NatsJetStream`)."""

    js: JetStreamContext

    async def request_msg(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg: ...

    async def stored_message(
        self, stream: str, body: bytes, timeout: float
    ) -> StoredMessage | None: ...

    async def api_call(self, op: str, body: bytes, timeout: float) -> dict[str, Any]: ...

    async def _refusable(
        self, stream: str, call: Awaitable[T], timeout: float, api: str = "STREAM"
    ) -> T: ...


_TOMBSTONES = ("DEL", "PURGE")


def is_tombstone(headers: dict[str, str] | None) -> bool:
    """A delete, a purge, or the server's TTL-expiry marker."""
    if not headers:
        return False
    return headers.get("KV-Operation") in _TOMBSTONES or "Nats-Marker-Reason" in headers


class NatsKV:
    """One bucket, opened through `NatsJetStream.bucket`."""

    def __init__(self, engine: Requests, name: str, *, direct: bool) -> None:
        self._engine = engine
        self.name = name
        self._stream = f"KV_{name}"
        self._pre = f"$KV.{name}."
        self._direct = direct

    async def _store(
        self, key: str, value: bytes, headers: dict[str, str], timeout: float, what: str
    ) -> int:
        try:
            msg = await self._engine.request_msg(self._pre + key, value, timeout, headers=headers)
        except NoResponders:
            raise NotConnected(f"{what} {self.name}/{key}: no bucket answers") from None
        except RequestTimeout:
            raise NotConnected(f"{what} {self.name}/{key}: no answer in {timeout:g}s") from None
        return decode_ack(msg.data, f"{what} {self.name}/{key}").seq

    @staticmethod
    def _headers(last: int | None, ttl: int) -> dict[str, str]:
        headers = {}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        if ttl:
            headers["Nats-TTL"] = f"{ttl}s"
        return headers

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        if leader or not self._direct:
            body = msgspec.json.encode({"last_by_subj": self._pre + key})
            stored = await self._engine.stored_message(self._stream, body, timeout)
            if stored is None or is_tombstone(stored.headers):
                return None
            return Entry(key, stored.data, stored.seq)
        subject = f"$JS.API.DIRECT.GET.{self._stream}.{self._pre}{key}"
        try:
            msg = await self._engine.request_msg(subject, b"", timeout)
        except (NoResponders, RequestTimeout):
            raise NotConnected(f"get {self.name}/{key}: no answer in {timeout:g}s") from None
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise NotConnected(f"get {self.name}/{key}: {status} {headers.get('Description', '')}")
        if is_tombstone(headers):
            return None
        return Entry(key, msg.data, int(headers.get("Nats-Sequence", "0")))

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        return await self._store(key, value, self._headers(None, ttl), timeout, "put")

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        try:
            return await self._store(key, value, self._headers(0, ttl), timeout, "create")
        except WrongRevision:
            pass
        # Something is stored: a value (taken), or a tombstone or expiry marker (free, at its seq).
        body = msgspec.json.encode({"last_by_subj": self._pre + key})
        last = await self._engine.stored_message(self._stream, body, timeout)
        if last is None:  # the marker itself expired meanwhile
            return await self._store(key, value, self._headers(0, ttl), timeout, "create")
        if not is_tombstone(last.headers):
            raise WrongRevision(f"create {self.name}/{key}: present at revision {last.seq}")
        return await self._store(key, value, self._headers(last.seq, ttl), timeout, "create")

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        return await self._store(key, value, self._headers(last, ttl), timeout, "update")

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        headers = {"KV-Operation": "DEL"}
        if last:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        await self._store(key, b"", headers, timeout, "delete")

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        await self._store(key, b"", headers, timeout, "purge")

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        # From the server's own subject index, not from a watch: nats-py's watcher can signal
        # "current values delivered" before the first one arrived (its pending count races
        # with delivery), which reads as an empty bucket on a busy machine.
        body = msgspec.json.encode({"subjects_filter": self._pre + ">"})
        reply = await self._engine.api_call(f"STREAM.INFO.{self._stream}", body, timeout)
        subjects = (reply.get("state") or {}).get("subjects") or {}
        live = []
        for subject in sorted(subjects):
            key = subject[len(self._pre) :]
            # a key's last message may be its delete or purge marker
            if await self.get(key, timeout=timeout) is not None:
                live.append(key)
        return live

    async def watch(self, pattern: str = ">", *, timeout: float = 5.0) -> NatsWatch:
        kv = KeyValue(
            name=self.name, stream=self._stream, pre=self._pre, js=self._engine.js, direct=False
        )
        with map_errors(f"watch {self.name}/{pattern}"):
            watcher = await self._engine._refusable(
                self._stream, kv.watch(pattern), timeout, "CONSUMER"
            )
        return NatsWatch(watcher, self.name)


async def _next_or_fail(watch: NatsWatch, timeout: float) -> Entry | None:
    try:
        return await watch.next(max(0.0, timeout))
    except RequestTimeout:
        raise NotConnected(f"listing keys of {watch.bucket}: no answer in time") from None


class NatsWatch:
    """nats-py's KV watcher (an ordered push consumer), entries turned into `Entry`."""

    def __init__(self, watcher: KeyValue.KeyWatcher, bucket: str) -> None:
        self._watcher = watcher
        self.bucket = bucket
        self._stopped = False

    async def next(self, timeout: float) -> Entry | None:
        if self._stopped:
            raise NotConnected(f"watch of {self.bucket} stopped")
        with map_errors(f"watch of {self.bucket}", timeout_is=RequestTimeout):
            update = await self._watcher.updates(timeout)  # type: ignore[no-untyped-call]
        if update is None:
            return None
        if not isinstance(update, KeyValue.Entry):  # nats-py's stop sentinel
            self._stopped = True
            raise NotConnected(f"watch of {self.bucket} ended")
        deleted = update.operation in _TOMBSTONES
        return Entry(update.key, b"" if deleted else (update.value or b""), update.revision or 0,
                     deleted)  # fmt: skip

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            try:
                with map_errors(f"stop watch of {self.bucket}"):
                    await self._watcher.stop()  # type: ignore[no-untyped-call]
            except (NotConnected, NotFound):
                pass  # the consumer is gone with the connection: nothing left to stop
