"""The bus on Redis Streams (redis-py asyncio; the only module that imports redis-py).

A stream per topic partition (`accord:bus:<topic>:<p>`), a consumer group per bus group, leases
and members as plain keys. Publish is `XADD`, then a `WAITAOF` fence (`_redis_batch.Fence`)
with `appendfsync everysec` where the server has it (7.2+); otherwise the ack reports the
server's `appendfsync` loss window. A new partition holder first `XAUTOCLAIM`s what the group
left pending (entries deleted meanwhile are reported apart and dropped), then reads new entries
with `XREADGROUP`. Retention: the holder trims its stream with `XTRIM MINID` below the oldest
entry any group still needs (its oldest pending entry, else the one after its last delivered),
so trimming never drops an entry a group has not acknowledged.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex

from .._errors import ConfigurationError
from ._api import (
    BusDeadLetter,
    BusUnavailable,
    Event,
    Fetched,
    GroupStats,
    PublishAck,
    PublishUnconfirmed,
)
from ._redis_batch import Fence, Pipeliner, ReadMux
from ._redis_wire import Lanes

PRE = "accord:bus"
DLQ = f"{PRE}:dlq"
TOPICS = f"{PRE}:topics"
#: redis-py 8 times sockets out after 5 s by default, which breaks blocking reads: reads block
#: at most a second here and the socket waits far longer than that.
SOCKET_TIMEOUT = 30.0
TRIM_EVERY = 30.0
MAX_CONNECTIONS = 64
_LOSS = {"always": 0.0, "everysec": 1.0}

_ACQUIRE = """
local v = redis.call('get', KEYS[1])
if v then
  local mine = ARGV[1] .. ':'
  if string.sub(v, 1, #mine) == mine then
    redis.call('pexpire', KEYS[1], ARGV[2]); return tonumber(string.sub(v, #mine + 1))
  end
  return 0
end
local e = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. ':' .. e, 'PX', ARGV[2])
return e
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]); return 1 end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 0
"""


def stream_key(topic: str, partition: int) -> str:
    return f"{PRE}:{topic}:{partition}"


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """redis-py's errors become accord's, here and nowhere else."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError) as exc:
        raise BusUnavailable(f"{what}: Redis unavailable: {exc}") from None
    except rex.RedisError as exc:
        raise BusUnavailable(f"{what}: Redis refused: {exc}") from None


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ms(entry_id: Any) -> float:
    return int(_s(entry_id).split("-")[0]) / 1000.0


class RedisBackend:
    """`Backend` on one Redis server."""

    kind = "redis"
    lease_granularity = 0.001

    def __init__(self, client: aioredis.Redis, fsync: str, waitaof: bool) -> None:
        self.r = client
        self.fsync = fsync
        self.waitaof = waitaof
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        # connections of their own for the hot commands and the new-entry reads (the pool: the rest)
        self.lanes = Lanes(client.connection_pool, SOCKET_TIMEOUT)
        self.pipe = Pipeliner(self.lanes)  # publishes, acks and touches of one tick: one round trip
        # confirms publishes with WAITAOF apart from them (a key of this client's own)
        self.fence = Fence(self.lanes, f"{PRE}:fence:{uuid.uuid4().hex}")
        self._muxes: dict[tuple[str, str], ReadMux] = {}

    def mux(self, group: str, consumer: str) -> ReadMux:
        """The shared new-entry read of one consumer's partitions."""
        m = self._muxes.get((group, consumer))
        if m is None:
            m = self._muxes[(group, consumer)] = ReadMux(self.lanes, group, consumer)
        return m

    @classmethod
    async def connect(cls, url: str) -> RedisBackend:
        try:
            # a blocking pool: past its size a command waits for a connection instead of
            # failing with "Too many connections" (every partition's blocking read holds one)
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=5.0,
            )  # fmt: skip
            client = aioredis.Redis(connection_pool=pool)
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from None
        try:
            with _mapped(f"connect to {url}"):
                info = await client.info("server")
                version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])
                fsync = "off"
                with contextlib.suppress(rex.ResponseError):  # CONFIG may be renamed away
                    cfg = await client.config_get("append*")
                    if cfg.get("appendonly") == "yes":
                        fsync = str(cfg.get("appendfsync", "everysec"))
        except BaseException:
            await client.aclose()
            raise
        # WAITAOF only where an fsync will come: with `appendfsync no` it would wait out its
        # timeout on every publish and still confirm nothing
        return cls(client, fsync, version >= (7, 2) and fsync == "everysec")

    async def partitions(self, topic: str, default: int) -> int:
        with _mapped(f"topic {topic}"):
            await self.r.hsetnx(TOPICS, topic, default)
            return int(await self.r.hget(TOPICS, topic) or default)

    async def append(self, topic: str, partition: int, event: Event) -> PublishAck:
        fields: list[Any] = ["id", event.id, "key", event.key, "type", event.type,
                             "body", event.body, "at", f"{event.published_at:.6f}"]  # fmt: skip
        if event.only:
            fields += ["only", event.only]
        xadd = ("XADD", stream_key(topic, partition), "*", *fields)
        try:
            fsync, durable = self.fsync, self.fsync == "always"
            await self.pipe.run(*xadd)  # readers see it now; the fence says when it is on disk
            if self.waitaof and not durable:
                durable, fsync = await self.fence.confirm() >= 1, "waitaof"
        except (rex.RedisError, OSError) as exc:
            raise PublishUnconfirmed(
                f"publish of {event.id} to {topic} not confirmed ({exc}): it may or may not "
                "have been stored", event_id=event.id,
            ) from None  # fmt: skip
        loss = 0.0 if durable else _LOSS.get(fsync, -1.0)
        return PublishAck(topic, event.id, partition, durable=durable, fsync=fsync,
                          loss_window=loss)  # fmt: skip

    async def reader(
        self, topic: str, group: str, partition: int, consumer: str, epoch: int, min_idle: float
    ) -> RedisReader:
        key = stream_key(topic, partition)
        with _mapped(f"open {topic}/{group} partition {partition}"):
            try:
                await self.r.xgroup_create(key, group, id="0", mkstream=True)
            except rex.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return RedisReader(self, key, group, consumer, min_idle)

    async def heartbeat(self, topic: str, group: str, consumer: str, ttl: float) -> None:
        with _mapped("heartbeat"):
            await self.r.zadd(f"{PRE}:members:{topic}:{group}", {consumer: time.time() + ttl})

    async def members(self, topic: str, group: str) -> list[str]:
        key = f"{PRE}:members:{topic}:{group}"
        with _mapped("members"):
            await self.r.zremrangebyscore(key, "-inf", time.time())
            return sorted(_s(m) for m in await self.r.zrange(key, 0, -1))

    async def acquire(self, lease: str, consumer: str, ttl: float) -> int:
        keys = [f"{PRE}:lease:{lease}", f"{PRE}:epoch:{lease}"]
        with _mapped(f"lease {lease}"):
            return int(await self._acquire(keys=keys, args=[consumer, int(ttl * 1000)]))

    async def renew(self, lease: str, consumer: str, epoch: int, ttl: float) -> int:
        args: list[str | int] = [f"{consumer}:{epoch}", int(ttl * 1000)]
        with _mapped(f"lease {lease}"):
            ok = await self._renew(keys=[f"{PRE}:lease:{lease}"], args=args)
        return epoch if ok else 0

    async def release(self, lease: str, consumer: str, epoch: int) -> None:
        with _mapped(f"lease {lease}"):
            await self._release(keys=[f"{PRE}:lease:{lease}"], args=[f"{consumer}:{epoch}"])

    async def remove_group(self, topic: str, group: str, partitions: int) -> None:
        with _mapped(f"remove group {group} of {topic}"):
            for p in range(partitions):
                with contextlib.suppress(rex.ResponseError):  # no such stream or group
                    await self.r.xgroup_destroy(stream_key(topic, p), group)
            await self.r.delete(f"{PRE}:members:{topic}:{group}", *(
                f"{PRE}:{kind}:{topic}.{group}.{p}" for p in range(partitions)
                for kind in ("lease", "epoch")))  # fmt: skip

    async def dead_letter(self, letter: BusDeadLetter) -> None:
        fields: dict[Any, Any] = {
            k: str(v) for k, v in msgspec.structs.asdict(letter).items() if k not in ("body", "id")
        }
        fields["body"] = letter.body
        with _mapped("store a dead letter"):
            await self.r.xadd(DLQ, fields)

    async def dead_letters(self, limit: int) -> list[BusDeadLetter]:
        with _mapped("read the bus dead letters"):
            entries: list[Any] = await self.r.xrange(DLQ, count=limit) or []
        out = []
        for entry_id, raw in entries:
            fields: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items() if k != b"body"}
            fields.update(id=_s(entry_id), body=raw.get(b"body", b""))
            out.append(msgspec.convert(fields, BusDeadLetter, strict=False))
        return out

    async def remove_dead_letter(self, letter_id: str) -> bool:
        with _mapped("remove a bus dead letter"):
            try:
                return bool(await self.r.xdel(DLQ, letter_id))
            except rex.ResponseError:  # not an entry id
                return False

    async def stats(self) -> list[GroupStats]:
        letters = await self.dead_letters(100_000)
        out: list[GroupStats] = []
        now = time.time()
        with _mapped("bus stats"):
            topics = {_s(k): int(v) for k, v in (await self.r.hgetall(TOPICS)).items()}
            for topic, n in sorted(topics.items()):
                published = 0
                groups: dict[str, list[Any]] = {}  # group -> [pending, oldest, redelivered]
                for p in range(n):
                    key = stream_key(topic, p)
                    if not await self.r.exists(key):
                        continue
                    published += int((await self.r.xinfo_stream(key)).get("entries-added", 0))
                    for g in await self.r.xinfo_groups(key):
                        row = groups.setdefault(_s(g["name"]), [0, 0.0, 0])
                        await self._group_stats(key, g, row)
                for name, (pending, oldest, again) in sorted(groups.items()):
                    dead = sum(1 for x in letters if x.topic == topic and x.group == name)
                    age = max(0.0, now - oldest) if oldest else 0.0
                    out.append(GroupStats(topic, name, published, pending, age, again, dead))
                if not groups:
                    out.append(GroupStats(topic, "", published, 0, 0.0, 0, 0))
        return out

    async def _group_stats(self, key: str, g: dict[str, Any], row: list[Any]) -> None:
        # pending = delivered and unacknowledged (the PEL) + never delivered (after last id)
        after: list[Any] = (
            await self.r.xrange(key, min=f"({_s(g['last-delivered-id'])}", count=1000) or []
        )
        row[0] += int(g["pending"]) + len(after)
        candidates = [_ms(after[0][0])] if after else []
        if int(g["pending"]):
            summary = await self.r.xpending(key, g["name"])
            candidates.append(_ms(summary["min"]))
            pel = await self.r.xpending_range(key, g["name"], "-", "+", 1000)
            row[2] += sum(1 for e in pel if int(e["times_delivered"]) > 1)
        if candidates:
            row[1] = min([row[1], *candidates]) if row[1] else min(candidates)

    async def close(self) -> None:
        await self.lanes.close()
        await self.r.aclose()
        await self.r.connection_pool.disconnect()


class RedisReader:
    """A partition's entries for its lease holder: the group's pending ones first (claimed),
    then new ones; trims the stream now and then."""

    def __init__(
        self, backend: RedisBackend, key: str, group: str, consumer: str, min_idle: float
    ) -> None:
        self.b = backend
        self.min_idle = min_idle
        self._reclaimed_at = time.monotonic()
        self.r = backend.r
        self.key = key
        self.group = group
        self.consumer = consumer
        self._cursor: str | None = "0-0"  # None once every pending entry was claimed
        self._out: set[str] = set()  # handed out, not acknowledged
        self._trimmed_at = 0.0

    async def fetch(self, limit: int, block: float) -> list[Fetched]:
        try:
            got = await self._fetch(limit, block)
        except BusUnavailable:
            # A read whose reply was lost (a dropped connection, a server restart) left its
            # entries pending with us: claim them first, before anything newer.
            self._cursor = "0-0"
            raise
        self._out.update(_s(f.token) for f in got)
        return got

    async def _fetch(self, limit: int, block: float) -> list[Fetched]:
        with _mapped(f"read {self.key}"):
            if self._cursor is not None:
                got = await self._claim(limit)
                if got or self._cursor is not None:
                    return got
            if time.monotonic() - self._trimmed_at > TRIM_EVERY:
                await self._trim()
            if time.monotonic() - self._reclaimed_at > self.min_idle:
                got = await self._reclaim(limit)
                if got:
                    return got
            entries = await self.b.mux(self.group, self.consumer).read(self.key, limit, block)
        return [_fetched(eid, raw, 1) for eid, raw in entries]

    async def _claim(self, limit: int) -> list[Fetched]:
        """Take over the group's pending entries (min_idle 0: we hold the lease). Ids that no
        longer exist come back apart; Redis already dropped them from the pending list."""
        assert self._cursor is not None
        cursor, entries, _deleted = await self.r.xautoclaim(
            self.key, self.group, self.consumer, 0, self._cursor, count=limit
        )
        self._cursor = None if _s(cursor) == "0-0" else _s(cursor)
        entries = [(eid, raw) for eid, raw in entries if raw and _s(eid) not in self._out]
        if not entries:
            return []
        counts = {_s(e["message_id"]): int(e["times_delivered"]) for e in
                  await self.r.xpending_range(self.key, self.group, entries[0][0], entries[-1][0],
                                              len(entries) + 16, self.consumer)}  # fmt: skip
        return [_fetched(eid, raw, counts.get(_s(eid), 2)) for eid, raw in entries]

    async def _reclaim(self, limit: int) -> list[Fetched]:
        """Entries pending and untouched for twice `min_idle`: delivered to a read that was cut
        short (a lost lease, a dead connection), or to a consumer that died after we claimed
        its entries. In-flight entries are touched every third of `min_idle`, so never match."""
        self._reclaimed_at = time.monotonic()
        idle = int(self.min_idle * 2000)
        _c, entries, _deleted = await self.r.xautoclaim(
            self.key, self.group, self.consumer, idle, "0-0", count=limit
        )
        return [_fetched(eid, raw, 2) for eid, raw in entries if raw and _s(eid) not in self._out]

    async def _trim(self) -> None:
        self._trimmed_at = time.monotonic()
        floor: str | None = None
        for g in await self.r.xinfo_groups(self.key):
            if int(g["pending"]):
                need = _s((await self.r.xpending(self.key, g["name"]))["min"])
            else:
                ms, seq = _s(g["last-delivered-id"]).split("-")
                need = f"{ms}-{int(seq) + 1}"
            if floor is None or _id(need) < _id(floor):
                floor = need
        if floor is not None and floor != "0-1":
            await self.r.xtrim(self.key, minid=floor, approximate=False)

    def push(self, take: Any, has_room: Any) -> bool:
        return False  # read with `fetch`: one XREADGROUP over the consumer's partitions

    async def ack(self, fs: list[Fetched]) -> None:
        # One XACK for a batch (the consumer's ack loop collects them): with `appendfsync
        # always` every write command costs an fsync.
        ids = [f.token for f in fs]
        with _mapped(f"ack on {self.key}"):
            await self.b.pipe.run("XACK", self.key, self.group, *ids)
        for f in fs:
            self._out.discard(_s(f.token))

    async def touch(self, fs: list[Fetched]) -> None:
        with _mapped(f"touch on {self.key}"):  # resets their idle time, not their count
            await self.b.pipe.run("XCLAIM", self.key, self.group, self.consumer, 0,
                                  *(f.token for f in fs), "JUSTID")  # fmt: skip

    async def retrying(self, f: Fetched, attempt: int) -> None:
        # the pending list's delivery count is the store's attempt count: a next holder's
        # XAUTOCLAIM adds one to it (the attempt a crash cut short)
        with _mapped(f"count an attempt on {self.key}"):
            await self.b.pipe.run("XCLAIM", self.key, self.group, self.consumer, 0, f.token,
                                  "RETRYCOUNT", attempt, "JUSTID")  # fmt: skip

    async def close(self) -> None:
        return None


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _fetched(entry_id: Any, raw: dict[bytes, bytes], attempt: int) -> Fetched:
    event = Event(
        id=_s(raw.get(b"id", b"")) or _s(entry_id),
        key=_s(raw.get(b"key", b"")),
        type=_s(raw.get(b"type", b"")),
        body=raw.get(b"body", b""),
        published_at=float(raw.get(b"at", b"0") or 0),
        only=_s(raw.get(b"only", b"")),
    )
    return Fetched(event, attempt, entry_id)
