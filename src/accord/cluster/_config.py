"""Cluster identity and its JetStream resources (subjects, KV buckets, the events stream).

The shard count, lease TTL and data byte budget are fixed when a cluster is created and stored in
its meta bucket; every node and client reads them from there, so they can never disagree.

Storage: leases, membership and named leases live on memory storage (`VOLATILE`), so a full disk
cannot stop their renewals; they are re-created when a server restart loses them
(`_volatile.VolatileKV`). Data (state, mailbox, event logs, dead letters, observability logs)
is on file storage with byte limits: shares (`DATA_SHARES`) of a budget that is `DATA_SHARE` of
what JetStream could reserve when the cluster was created. Existing resources keep the storage
and limits they were created with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from ._volatile import VolatileKV, fresh_first_seq

log = logging.getLogger("accord.cluster")

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
DEFAULT_SHARDS = 64
DEFAULT_LEASE_TTL = 2
OPEN_RETRY_FOR = 30.0  # seconds `open_cluster` retries a JetStream that does not answer yet
PROBE_KEY = "probe"  # meta bucket key held by the one opener probing the storage (_probe_alone)
PROBE_STALE = 20.0  # seconds after which a probe key's holder is taken for dead

#: What an engine call may raise besides `WrongRevision` (which callers handle as a result): a
#: loop that just tries again later catches these.
ENGINE_FAILURES = (AccordError, Refused, NotFound, RequestTimeout, NoResponders)

#: Buckets on memory storage: they expire anyway, and must not share the data store's fate.
VOLATILE = ("members", "leases", "locks")
DATA_SHARE = 0.5
"""Share of the file storage JetStream can reserve (at cluster creation) that accord's data
streams and buckets reserve together; the rest stays for the small unlimited buckets (meta,
subscriptions, coordination, services) and for other users of the server."""
DATA_SHARES = {
    "state": 0.40,  # agents' state records (the state bucket)
    "mailbox": 0.30,  # durable messages not yet processed
    "es": 0.15,  # event-sourced agents' event logs
    "dlq": 0.05,  # dead letters
    "events": 0.10,  # observability events (oldest dropped at the limit)
}
"""Each data resource's share of the cluster's `data_bytes`."""
MIN_DATA_BYTES = 1 << 20  # below this JetStream's limit is not worth sharing: no byte limits


class ClusterConfig(msgspec.Struct, frozen=True):
    """Stored under key `config` of the meta bucket."""

    v: int = 1
    num_shards: int = DEFAULT_SHARDS
    lease_ttl: int = DEFAULT_LEASE_TTL
    created_at: float = 0.0
    data_bytes: int = 0
    """Byte budget of the data streams and buckets (`DATA_SHARES`); 0: none (an engine without a
    storage limit, or a cluster created before budgets existed)."""

    def max_bytes(self, what: str) -> int:
        """The byte limit of data resource `what` (a key of `DATA_SHARES`); 0: none."""
        return int(self.data_bytes * DATA_SHARES[what])

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
    data_bytes: int | None = None,
) -> tuple[ClusterConfig, Buckets]:
    """Create the cluster's buckets and stream if missing and return the stored configuration.

    Creation is idempotent and race-free: the config is written with `create`, so when two nodes
    start at once exactly one configuration wins and both read it back. While JetStream does not
    answer (`NotConnected`: a leader election, R3 creations queued on a busy machine) this retries
    for `OPEN_RETRY_FOR` seconds, then raises `NotConnected`; a JetStream that refuses the buckets
    (no JetStream, not enough servers for `replicas`) raises `NotConnected` at once.

    `data_bytes` (used only when the cluster is created): the byte budget of the data streams and
    buckets; None: `DATA_SHARE` of what JetStream can reserve; 0: no byte limits.
    """
    if num_shards is not None and not 1 <= num_shards <= 4096:
        raise ConfigurationError(f"num_shards must be 1..4096, got {num_shards}")
    if lease_ttl is not None and not 1 <= lease_ttl <= 60:
        raise ConfigurationError(f"lease_ttl must be 1..60 whole seconds, got {lease_ttl}")
    if data_bytes is not None and data_bytes < 0:
        raise ConfigurationError(f"data_bytes must be >= 0, got {data_bytes}")
    deadline = time.monotonic() + OPEN_RETRY_FOR
    backoff = Backoff(0.25, 1.0)
    wanted = ClusterConfig(
        num_shards=num_shards or DEFAULT_SHARDS,
        lease_ttl=lease_ttl or DEFAULT_LEASE_TTL,
        replicas=replicas,
        replicas_auto=replicas_auto,
        data_bytes=data_bytes or 0,
    )
    while True:
        try:
            config, buckets = await _open(js, names, wanted, probe=data_bytes is None)
            break
        except NotConnected:
            if time.monotonic() > deadline:
                raise
        except (Refused, NotFound, RequestTimeout, NoResponders) as exc:
            raise NotConnected(f"JetStream is not available: {exc}") from None
        await asyncio.sleep(backoff.next())
    if num_shards is not None and num_shards != config.num_shards:
        raise ConfigurationError(
            f"cluster {names.cluster!r} was created with {config.num_shards} shards, "
            f"not {num_shards}; shard count is fixed at creation"
        )
    return config, buckets


async def _open(
    js: JetStream, names: Names, wanted: ClusterConfig, *, probe: bool
) -> tuple[ClusterConfig, Buckets]:
    replicas = wanted.replicas
    meta = await js.bucket(BucketSpec(name=names.bucket("meta"), replicas=replicas))
    # The stored configuration comes first: it carries the byte budget the data buckets and
    # streams are created with, whichever node or client creates them.
    entry = await meta.get("config", leader=True)
    if entry is None:
        if probe:
            budget = await _probe_alone(js, meta, names)
            wanted = msgspec.structs.replace(
                wanted, data_bytes=budget if budget >= MIN_DATA_BYTES else 0
            )
        wanted = msgspec.structs.replace(wanted, created_at=time.time())
        with contextlib.suppress(WrongRevision):  # another node created it first: theirs stands
            await meta.create("config", msgspec.json.encode(wanted))
        if probe:  # only now: a probe started before the config existed would refuse creations
            with contextlib.suppress(AccordError, WrongRevision, NotFound):
                await meta.delete(PROBE_KEY)
        # From the leader: a replica that has not seen the create yet would answer "absent".
        entry = await meta.get("config", leader=True)
        if entry is None:
            raise NotConnected(f"cluster {names.cluster!r}: its configuration could not be read")
    config = msgspec.json.decode(entry.value, type=ClusterConfig)
    buckets = Buckets(
        meta=meta,
        members=await volatile_bucket(js, names.bucket("members"), replicas),
        leases=await volatile_bucket(js, names.bucket("leases"), replicas),
        subs=await js.bucket(BucketSpec(name=names.bucket("subs"), replicas=replicas)),
        # marker_ttl: per-key TTLs (`state_ttl`), a marker when a record expires
        state=await js.bucket(
            BucketSpec(
                name=names.bucket("state"),
                replicas=replicas,
                max_bytes=config.max_bytes("state"),
                marker_ttl=1,
            )
        ),
        locks=await volatile_bucket(js, names.bucket("locks"), replicas),
        coord=await js.bucket(BucketSpec(name=names.bucket("coord"), replicas=replicas)),
    )
    await js.ensure_stream(
        StreamSpec(
            name=names.events_stream,
            subjects=(f"{names.prefix}.events.>",),
            replicas=replicas,
            max_msgs=100_000,
            max_bytes=config.max_bytes("events"),
            max_age=7 * 24 * 3600.0,
        )
    )
    return config, buckets


async def _probe_alone(js: JetStream, meta: KV, names: Names) -> int:
    """`DATA_SHARE` of what JetStream can reserve, probed by one opener at a time.

    The probe holds a stream reserving nearly all of the server's room for a moment, and any
    stream or bucket created meanwhile is refused (10047): nodes starting together would fail
    each other's creations. The opener that takes the meta bucket's `probe` key probes; the
    others raise `NotConnected`, and `open_cluster` retries until the winner's configuration is
    stored. A key older than `PROBE_STALE` seconds (its holder died) is taken over.
    """
    try:
        await meta.create(PROBE_KEY, msgspec.json.encode(time.time()))
    except WrongRevision:
        held = await meta.get(PROBE_KEY, leader=True)
        if held is not None and time.time() - _float(held.value) > PROBE_STALE:
            with contextlib.suppress(WrongRevision, NotFound):
                await meta.delete(PROBE_KEY, last=held.revision)
        raise NotConnected(f"cluster {names.cluster!r} is being created by another node") from None
    try:
        # One server's room stands for every server's (probed at R1: cheap on a cluster).
        return int(await js.reservable_bytes(timeout=5.0) * DATA_SHARE)
    except (AccordError, Refused) as exc:  # the probe is not worth failing a start
        log.warning("no data byte limits for cluster %s: %s", names.cluster, exc)
        return 0
    # The key is deleted once the configuration is stored (`_open`), not here: another opener
    # taking it in between would probe while this one creates the buckets.


def _float(data: bytes) -> float:
    try:
        return float(msgspec.json.decode(data))
    except (msgspec.DecodeError, TypeError, ValueError):
        return 0.0


def volatile_spec(name: str, replicas: int) -> BucketSpec:
    """A lease-like bucket: memory storage, per-key TTLs, revisions starting from the clock."""
    return BucketSpec(
        name=name, replicas=replicas, storage="memory", marker_ttl=1, first_seq=fresh_first_seq()
    )


async def volatile_bucket(js: JetStream, name: str, replicas: int) -> VolatileKV:
    """Open (or create on memory storage) a bucket of `VOLATILE`, re-created when it vanishes.
    An existing bucket is opened as it is, file storage included (a cluster created before)."""
    spec = volatile_spec(name, replicas)
    return VolatileKV(js, await js.bucket(spec), spec)
