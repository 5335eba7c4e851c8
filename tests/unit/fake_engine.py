"""A small in-process stand-in for the engine's KV buckets and streams (`engine/_api.py`), for
unit tests of the state and delivery layers: only what they use, with the protocols' semantics
(revisions, conditional writes, message-id dedup, expected last subject sequence)."""

from __future__ import annotations

from typing import Any

from accord.engine._api import (
    BucketSpec,
    Entry,
    NoResponders,
    NotFound,
    PubAck,
    StoredMessage,
    StreamSpec,
    StreamState,
    WrongRevision,
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a trailing `>` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


class FakeKV:
    def __init__(self, name: str) -> None:
        self.name = name
        self._rev = 0
        self._keys: dict[str, Entry] = {}

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        entry = self._keys.get(key)
        return None if entry is None or entry.deleted else entry

    def _write(self, key: str, value: bytes) -> int:
        self._rev += 1
        self._keys[key] = Entry(key, value, self._rev)
        return self._rev

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        return self._write(key, value)

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        if await self.get(key) is not None:
            raise WrongRevision(key)
        return self._write(key, value)

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        entry = self._keys.get(key)
        if entry is None or entry.revision != last:
            raise WrongRevision(key)
        return self._write(key, value)

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        self._keys.pop(key, None)


class _Stream:
    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.messages: dict[int, StoredMessage] = {}
        self.last_seq = 0
        self.ids: dict[str, int] = {}  # msg id -> seq (the duplicate window: forever here)


class FakeEngine:
    """Buckets and streams in dictionaries; every call completes at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, FakeKV] = {}
        self._streams: dict[str, _Stream] = {}

    async def bucket(self, spec: BucketSpec, *, create: bool = True, timeout: float = 5.0) -> Any:
        if spec.name not in self._buckets:
            if not create:
                raise NotFound(spec.name)
            self._buckets[spec.name] = FakeKV(spec.name)
        return self._buckets[spec.name]

    async def ensure_stream(self, spec: StreamSpec, *, timeout: float = 5.0) -> None:
        self._streams.setdefault(spec.name, _Stream(spec))

    async def stream_state(self, name: str, *, timeout: float = 5.0) -> StreamState | None:
        s = self._streams.get(name)
        if s is None:
            return None
        size = sum(len(m.data) for m in s.messages.values())
        return StreamState(name, s.spec.replicas, len(s.messages), size)

    def _stream(self, name: str) -> _Stream:
        s = self._streams.get(name)
        if s is None:
            raise NotFound(name)
        return s

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        expect_last_subject_seq: int | None = None,
        ttl: int = 0,
        timeout: float = 5.0,
    ) -> PubAck:
        for s in self._streams.values():
            if any(subject_matches(p, subject) for p in s.spec.subjects):
                break
        else:
            raise NoResponders(subject)
        if msg_id is not None and msg_id in s.ids:
            return PubAck(s.spec.name, s.ids[msg_id], duplicate=True)
        if expect_last_subject_seq is not None:
            last = max((q for q, m in s.messages.items() if m.subject == subject), default=0)
            if last != expect_last_subject_seq:
                raise WrongRevision(subject)
        s.last_seq += 1
        s.messages[s.last_seq] = StoredMessage(s.last_seq, subject, data, headers)
        if msg_id is not None:
            s.ids[msg_id] = s.last_seq
        return PubAck(s.spec.name, s.last_seq)

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        after: bool = False,
        timeout: float = 5.0,
    ) -> StoredMessage | None:
        s = self._stream(stream)
        if seq and not after:
            return s.messages.get(seq)
        found = [
            m
            for q, m in sorted(s.messages.items())
            if q >= seq and (subject is None or subject_matches(subject, m.subject))
        ]
        if not found:
            return None
        return found[0] if after else found[-1]

    async def delete_message(self, stream: str, seq: int, *, timeout: float = 5.0) -> bool:
        return self._stream(stream).messages.pop(seq, None) is not None

    async def purge(self, stream: str, *, timeout: float = 5.0) -> int:
        s = self._stream(stream)
        n = len(s.messages)
        s.messages.clear()
        return n

    async def close(self) -> None:
        return None
