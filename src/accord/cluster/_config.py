"""Cluster identity and its JetStream resources (subjects, KV buckets, the events stream).

The shard count and lease TTL are fixed when a cluster is created and stored in its meta bucket;
every node and client reads them from there, so they can never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

import msgspec

from .._errors import AccordError, ConfigurationError, NotConnected
from .._retry import Backoff
from ..engine._api import (
    KV,
    BucketSpec,
    JetStream,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StreamSpec,
    WrongRevision,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
DEFAULT_SHARDS = 64
DEFAULT_LEASE_TTL = 2
OPEN_RETRY_FOR = 15.0  # seconds `open_cluster` retries a JetStream that does not answer yet

#: What an engine call may raise besides `WrongRevision` (which callers handle as a result): a
#: loop that just tries again later catches these.
ENGINE_FAILURES = (AccordError, Refused, NotFound, RequestTimeout, NoResponders)


class ClusterConfig(msgspec.Struct, frozen=True):
    """Stored under key `config` of the meta bucket."""

    v: int = 1
    num_shards: int = DEFAULT_SHARDS
    lease_ttl: int = DEFAULT_LEASE_TTL
    created_at: float = 0.0
    replicas: int = 0
    """Replicas of every bucket and stream (cluster/_replication.py); 0 in records written
    before the factor was stored, until a node records it."""
    replicas_auto: bool = True
    """The factor follows the servers (min(3, servers)) rather than an explicit `--replicas`."""


@dataclass(frozen=True)
class Names:
    """Every subject and resource name of one cluster, derived from its name."""

    cluster: str

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.cluster):
            raise ConfigurationError(
                f"cluster name must be 1-32 of [A-Za-z0-9_-], got {self.cluster!r}"
            )

    @property
    def prefix(self) -> str:
        return f"accord.{self.cluster}"

    def shard_subject(self, shard: int) -> str:
        return f"{self.prefix}.shard.{shard}"

    def standby_subject(self, shard: int | str) -> str:
        """Asks for `split_brain_allowed` agents of a shard nobody subscribes to (any node)."""
        return f"{self.prefix}.standby.{shard}"

    @property
    def admin_subject(self) -> str:
        return f"{self.prefix}.admin.status"

    def events_subject(self, kind: str) -> str:
        return f"{self.prefix}.events.{kind}"

    @property
    def events_stream(self) -> str:
        return f"accord_{self.cluster}_events"

    def bucket(self, what: str) -> str:
        return f"accord_{self.cluster}_{what}"


def replicas_for(cluster_size: int) -> int:
    return max(1, min(3, cluster_size))


@dataclass(frozen=True)
class Buckets:
    """The cluster's KV buckets, one field each (what `open_cluster` opens)."""

    meta: KV  # `config` (the ClusterConfig) and `type.<agent type>` (registered modes)
    members: KV  # `node.<name>`: heartbeats, with a TTL
    leases: KV  # `shard.<n>`: shard leases, with a TTL
    subs: KV  # `<topic>.<agent type>`: topic subscriptions
    state: KV  # agents' durable state
    locks: KV  # named leases, with a TTL
    coord: KV  # fenced values, proposals and votes, barriers, counters


async def open_cluster(
    js: JetStream,
    names: Names,
    *,
    num_shards: int | None = None,
    lease_ttl: int | None = None,
    replicas: int = 1,
    replicas_auto: bool = True,
) -> tuple[ClusterConfig, Buckets]:
    """Create the cluster's buckets and stream if missing and return the stored configuration.

    Creation is idempotent and race-free: the config is written with `create`, so when two nodes
    start at once exactly one configuration wins and both read it back. While JetStream does not
    answer (`NotConnected`: a leader election, R3 creations queued on a busy machine) this retries
    for `OPEN_RETRY_FOR` seconds, then raises `NotConnected`; a JetStream that refuses the buckets
    (no JetStream, not enough servers for `replicas`) raises `NotConnected` at once.
    """
    if num_shards is not None and not 1 <= num_shards <= 4096:
        raise ConfigurationError(f"num_shards must be 1..4096, got {num_shards}")
    if lease_ttl is not None and not 1 <= lease_ttl <= 60:
        raise ConfigurationError(f"lease_ttl must be 1..60 whole seconds, got {lease_ttl}")
    deadline = time.monotonic() + OPEN_RETRY_FOR
    backoff = Backoff(0.25, 1.0)
    while True:
        try:
            return await _open(js, names, num_shards, lease_ttl, replicas, replicas_auto)
        except NotConnected:
            if time.monotonic() > deadline:
                raise
        except (Refused, NotFound, RequestTimeout, NoResponders) as exc:
            raise NotConnected(f"JetStream is not available: {exc}") from None
        await asyncio.sleep(backoff.next())


async def _open(
    js: JetStream,
    names: Names,
    num_shards: int | None,
    lease_ttl: int | None,
    replicas: int,
    replicas_auto: bool = True,
) -> tuple[ClusterConfig, Buckets]:
    buckets = Buckets(
        meta=await _bucket(js, names.bucket("meta"), replicas),
        members=await _bucket(js, names.bucket("members"), replicas, marker_ttl=1),
        leases=await _bucket(js, names.bucket("leases"), replicas, marker_ttl=1),
        subs=await _bucket(js, names.bucket("subs"), replicas),
        state=await _bucket(js, names.bucket("state"), replicas),
        locks=await _bucket(js, names.bucket("locks"), replicas, marker_ttl=1),
        coord=await _bucket(js, names.bucket("coord"), replicas),
    )
    await js.ensure_stream(
        StreamSpec(
            name=names.events_stream,
            subjects=(f"{names.prefix}.events.>",),
            replicas=replicas,
            max_msgs=100_000,
            max_age=7 * 24 * 3600.0,
        )
    )
    wanted = ClusterConfig(
        num_shards=num_shards or DEFAULT_SHARDS,
        lease_ttl=lease_ttl or DEFAULT_LEASE_TTL,
        created_at=time.time(),
        replicas=replicas,
        replicas_auto=replicas_auto,
    )
    with contextlib.suppress(WrongRevision):  # another node created it first: theirs stands
        await buckets.meta.create("config", msgspec.json.encode(wanted))
    # From the leader: a replica that has not seen the create yet would answer "absent".
    entry = await buckets.meta.get("config", leader=True)
    if entry is None:
        raise NotConnected(f"cluster {names.cluster!r}: its configuration could not be read back")
    config = msgspec.json.decode(entry.value, type=ClusterConfig)
    if num_shards is not None and num_shards != config.num_shards:
        raise ConfigurationError(
            f"cluster {names.cluster!r} was created with {config.num_shards} shards, "
            f"not {num_shards}; shard count is fixed at creation"
        )
    return config, buckets


async def _bucket(js: JetStream, name: str, replicas: int, marker_ttl: float | None = None) -> KV:
    """Open bucket `name`, creating it (file storage, history 1) if missing; `marker_ttl`
    enables per-key TTLs (leases, heartbeats)."""
    spec = BucketSpec(
        name=name, replicas=replicas, history=1, marker_ttl=int(marker_ttl or 0), storage="file"
    )
    return await js.bucket(spec)
