"""The cluster's replication factor: decided with the cluster, raised as it grows, enforced on
every accord bucket and stream.

The factor is stored in the cluster record (`ClusterConfig.replicas`, meta bucket). Nodes decide
it (`--replicas`, else min(3, servers JetStream can place replicas on)), raise it when an
automatic cluster grows, and raise any bucket or stream below it; clients only wait for it.
Pure policy: JetStream is reached through `Admin` (engine/_admin.py implements it on nats-py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .._errors import AccordError, NotConnected
from ._config import ClusterConfig

if TYPE_CHECKING:
    from ..engine._admin import StreamReplicas

log = logging.getLogger("accord.replication")

MAX_AUTO = 3
"""Automatic replication stops at three: a majority survives one lost server."""
CHECK_EVERY = 30.0
"""Seconds between two checks of a node once the factor cannot grow any more."""
GROW_CHECK_EVERY = 5.0
"""Seconds between checks while an automatic factor is below `MAX_AUTO` (servers may join)."""
WAIT_FOR_CLUSTER = 30.0
"""Seconds a client waits for a node to create the cluster before `NotConnected`."""


class Admin(Protocol):
    """What the policy needs of JetStream (engine/_admin.py: `NatsAdmin`). Methods raise
    `NotConnected` (or a subclass) when JetStream does not answer."""

    async def read_config(self) -> tuple[bytes, int] | None:
        """The stored cluster record and its revision; None before the cluster exists."""
        ...

    async def write_config(self, value: bytes, revision: int) -> bool:
        """Replace the record if still at `revision`; False when another writer came first."""
        ...

    async def streams(self) -> list[StreamReplicas]:
        """Every stream of the account with its replication."""
        ...

    async def set_replicas(self, stream: str, replicas: int) -> None: ...

    async def can_place(self, replicas: int) -> bool:
        """Whether JetStream can place that many replicas on distinct servers now."""
        ...


class Resource(msgspec.Struct, frozen=True):
    """One accord bucket or stream with its replication."""

    name: str
    """Its short name: `state`, `leases`, `mailbox`, ..."""
    kind: str
    """`bucket` or `stream`."""
    stream: str
    """The JetStream stream (`KV_accord_<cluster>_<name>` for a bucket)."""
    replicas: int
    """Configured replicas; 0 when its leader did not answer."""
    current: int | None
    """Replicas current now (leader included); None when unknown."""
    leader: str | None


def auto_replicas(servers: int) -> int:
    """The automatic factor for a cluster of `servers` servers: min(3, servers), at least 1."""
    return max(1, min(MAX_AUTO, servers))


def resources_of(cluster: str, streams: list[StreamReplicas]) -> list[Resource]:
    """The streams that belong to `cluster`, sorted by kind and name.

    Ours are `accord_<cluster>_<name>` and buckets `KV_accord_<cluster>_<name>`, where `<name>`
    has no underscore: so cluster `a` never claims `accord_a_b_state` of cluster `a_b`.
    """
    prefix = f"accord_{cluster}_"
    out = []
    for s in streams:
        kind, bare = ("bucket", s.name[3:]) if s.name.startswith("KV_") else ("stream", s.name)
        if not bare.startswith(prefix):
            continue
        name = bare[len(prefix) :]
        if name and "_" not in name:
            out.append(Resource(name, kind, s.name, s.replicas, s.current, s.leader))
    return sorted(out, key=lambda r: (r.kind, r.name))


def below(setting: int, resources: list[Resource]) -> list[Resource]:
    """Resources configured with fewer replicas than `setting` (unknown ones excluded)."""
    return [r for r in resources if 0 < r.replicas < setting]


async def count_servers(admin: Admin, at_least: int) -> int:
    """Servers JetStream can place replicas on, counted up to `MAX_AUTO`, given that
    `at_least` are known. Probes from the top, so a full cluster costs one probe."""
    for n in range(MAX_AUTO, at_least, -1):
        if await admin.can_place(n):
            return n
    return at_least


async def decide(
    stored: ClusterConfig | None, explicit: int | None, servers: Callable[[int], Awaitable[int]]
) -> tuple[int, bool]:
    """The factor and whether it is automatic, given the stored record (None: no cluster yet)
    and this node's `--replicas`. Never lower than what is stored: an explicit factor raises
    a lower stored one, an automatic one follows the servers upwards only. `servers(k)` counts
    servers knowing `k` exist; it is called only when the factor could still grow."""
    have = stored.replicas if stored is not None else 0
    auto = stored.replicas_auto if stored is not None and have else explicit is None
    if explicit is not None:
        return (explicit, False) if explicit > have else (have, auto)
    if have and (not auto or have >= MAX_AUTO):
        return have, auto
    return max(have, auto_replicas(await servers(max(have, 1)))), True


def encode_config(config: ClusterConfig) -> bytes:
    return msgspec.json.encode(config)


def decode_config(data: bytes) -> ClusterConfig:
    return msgspec.json.decode(data, type=ClusterConfig)


class Check(msgspec.Struct, frozen=True):
    """The outcome of one `Replication.check`."""

    setting: int
    auto: bool
    resources: list[Resource]
    raised: list[str]
    """Streams whose replicas this check raised to `setting`."""
    failed: dict[str, str]
    """Streams it could not raise, with the reason (retried at the next check)."""


class Replication:
    """One node's keeper of the factor: `initial()` before it creates anything, then `run()`
    checks at once and every `CHECK_EVERY` s (`GROW_CHECK_EVERY` s while it could grow)."""

    def __init__(self, admin: Admin, cluster: str, *, explicit: int | None = None) -> None:
        self.admin, self.cluster, self.explicit = admin, cluster, explicit
        self.last: Check | None = None

    async def _servers(self, at_least: int) -> int:
        return await count_servers(self.admin, at_least)

    async def initial(self, retry_for: float = 30.0) -> int:
        """The factor to create missing buckets and streams with: the stored one, else this
        node's decision (another node may store a different one first; `check` reconciles).
        Retried for `retry_for` s while JetStream does not answer, then `NotConnected`."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return await self._initial()
            except NotConnected:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)

    async def _initial(self) -> int:
        found = await self.admin.read_config()
        stored = decode_config(found[0]) if found is not None else None
        setting, _ = await decide(stored, self.explicit, self._servers)
        if self.explicit is not None and self.explicit < setting:
            log.warning("--replicas %d ignored: cluster %s stores %d replicas (never lowered)",
                        self.explicit, self.cluster, setting)  # fmt: skip
        return setting

    async def check(self, *, resources: bool = True) -> Check | None:
        """Store a raised factor if due, then raise every bucket and stream below it.
        None before the cluster record exists. Raises `NotConnected` when JetStream is
        unreachable; a stream that cannot be raised now is reported in `failed`.

        With `resources=False` only the factor is re-decided (the growth probe): the streams
        are listed only if it changed, or the last pass left some below it."""
        found = await self.admin.read_config()
        if found is None:
            return None
        stored = decode_config(found[0])
        setting, auto = await decide(stored, self.explicit, self._servers)
        changed = (setting, auto) != (stored.replicas, stored.replicas_auto)
        if changed:
            new = msgspec.structs.replace(stored, replicas=setting, replicas_auto=auto)
            if not await self.admin.write_config(encode_config(new), found[1]):
                return None  # another node changed the record: the next check reads it
            log.info("cluster %s replication factor %d -> %d (%s)", self.cluster,
                     stored.replicas, setting, "automatic" if auto else "explicit")  # fmt: skip
        last = self.last
        if not (resources or changed or last is None or last.failed or last.setting != setting):
            return last
        found_resources = resources_of(self.cluster, await self.admin.streams())
        raised, failed = [], {}
        for r in below(setting, found_resources):
            try:
                await self.admin.set_replicas(r.stream, setting)
            except NotConnected as exc:
                failed[r.stream] = str(exc)
                continue
            raised.append(r.stream)
            log.info("raised %s from %d to %d replicas", r.stream, r.replicas, setting)
        if failed and (last is None or set(failed) != set(last.failed)):
            first = next(iter(failed.values()))
            log.warning("cannot raise %s to %d replicas yet (retried every %gs): %s",
                        ", ".join(failed), setting, GROW_CHECK_EVERY, first)  # fmt: skip
        self.last = Check(setting, auto, found_resources, raised, failed)
        return self.last

    def interval(self) -> float:
        last = self.last
        growing = last is None or (last.auto and last.setting < MAX_AUTO) or bool(last.failed)
        return GROW_CHECK_EVERY if growing else CHECK_EVERY

    async def run(
        self,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Check forever (until cancelled): the factor every `interval()`, every bucket and
        stream at least every `CHECK_EVERY` s; failures are logged and retried."""
        full_due = clock()
        while True:
            full = clock() >= full_due
            try:
                await self.check(resources=full)
                if full:
                    full_due = clock() + CHECK_EVERY
            except AccordError as exc:
                log.debug("replication check failed, retrying: %s", exc)
            await sleep(self.interval())


async def wait_for_cluster(
    admin: Admin,
    cluster: str,
    timeout: float = WAIT_FOR_CLUSTER,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ClusterConfig:
    """The stored cluster record, once a node has created it with its factor. A client never
    creates the cluster's resources: it waits here. Raises `NotConnected` after `timeout`
    seconds, naming the cause (no node created the cluster, or JetStream did not answer)."""
    deadline = clock() + timeout
    cause = f"no accord node has created cluster {cluster!r} yet (start one: `accord node`)"
    while True:
        try:
            found = await admin.read_config()
        except NotConnected as exc:
            found, cause = None, f"JetStream did not answer: {exc}"
        if found is not None:
            config = decode_config(found[0])
            if config.replicas >= 1:
                return config
            cause = f"cluster {cluster!r} has no replication factor yet (start a node to record it)"
        if clock() > deadline:
            raise NotConnected(f"{cause}; waited {timeout:g}s")
        await sleep(0.25)


def status(setting: int, auto: bool, resources: list[Resource]) -> dict[str, Any]:
    """The replication part of `accord status`: the factor, each bucket and stream, and a
    warning naming those below the factor (None when none is)."""
    low = below(setting, resources)
    return {
        "setting": setting,
        "auto": auto,
        "resources": [msgspec.structs.asdict(r) for r in resources],
        "below": [r.stream for r in low],
        "warning": (
            f"{len(low)} bucket(s)/stream(s) below the cluster's {setting} replicas: "
            + ", ".join(f"{r.name} ({r.replicas})" for r in low)
            if low
            else None
        ),
    }


async def replication_status(admin: Admin, cluster: str) -> dict[str, Any]:
    """`status()` read from JetStream now (the stored factor, the streams as they are)."""
    found = await admin.read_config()
    config = decode_config(found[0]) if found is not None else ClusterConfig()
    resources = resources_of(cluster, await admin.streams())
    return status(config.replicas, config.replicas_auto, resources)
