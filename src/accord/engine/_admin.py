"""JetStream administration for the replication policy: replicas of streams, placement probes,
the stored cluster record.

The only nats-py code behind `cluster/_replication.py`, which holds the rules and speaks to this
module through its `Admin` protocol. Stream configurations travel as raw JSON, so an update that
raises `num_replicas` keeps every field, even those nats-py's `StreamConfig` does not know.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from .._errors import NotConnected

API_TIMEOUT = 5.0
JS_NOT_FOUND = 10059  # stream not found
JS_NO_PEERS = 10005  # "no suitable peers for placement": fewer servers than replicas
JS_INSUFFICIENT_RESOURCES = 10023  # not enough room on the servers to place the replicas
JS_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
JS_MEMORY_RESOURCES = 10028  # insufficient memory resources (the probe is a memory stream)
_CANNOT_PLACE = {JS_NO_PEERS, JS_INSUFFICIENT_RESOURCES, JS_NOT_CLUSTERED, JS_MEMORY_RESOURCES}


class StreamReplicas(msgspec.Struct, frozen=True):
    """One stream's replication as JetStream reports it."""

    name: str
    """The stream name (a KV bucket `b` is the stream `KV_b`)."""
    replicas: int
    """Configured replicas (`num_replicas`)."""
    current: int | None
    """Replicas that are current now (the leader counts); None: no leader answered for it."""
    leader: str | None
    """Server leading the stream's Raft group (None: standalone server or no leader)."""


class JetStreamError(NotConnected):
    """The JetStream API answered with an error, or did not answer in time."""

    def __init__(self, message: str, err_code: int = 0) -> None:
        super().__init__(message)
        self.err_code = err_code


async def api(nc: NatsClient, js: JetStreamContext, subject: str, body: Any = None) -> Any:
    """One JetStream API request; returns the decoded reply, raises `JetStreamError`."""
    prefix = getattr(js, "_prefix", "$JS.API")
    payload = b"" if body is None else json.dumps(body).encode()
    try:
        msg = await nc.request(f"{prefix}.{subject}", payload, timeout=API_TIMEOUT)
    except (nats.errors.Error, TimeoutError) as exc:
        raise JetStreamError(f"JetStream did not answer {subject}: {type(exc).__name__}") from None
    reply = json.loads(msg.data or b"{}")
    err = reply.get("error")
    if err:
        raise JetStreamError(
            f"{subject}: {err.get('description', err)}", int(err.get("err_code") or 0)
        )
    return reply


def _replicas_of(info: dict[str, Any]) -> StreamReplicas:
    cluster = info.get("cluster") or {}
    leader = cluster.get("leader") or None
    if leader is None and cluster.get("replicas"):
        current = None  # a clustered stream without a leader: nobody can say
    else:
        current = 1 + sum(1 for r in cluster.get("replicas") or [] if r.get("current"))
    return StreamReplicas(
        name=info["config"]["name"],
        replicas=int(info["config"].get("num_replicas") or 1),
        current=current,
        leader=leader,
    )


async def list_streams(nc: NatsClient, js: JetStreamContext) -> list[StreamReplicas]:
    """Every stream of the account (all pages of `STREAM.LIST`). Streams the meta leader lists
    as missing (their own leader did not answer) come with `replicas=0`."""
    out: list[StreamReplicas] = []
    offset = 0
    while True:
        page = await api(nc, js, "STREAM.LIST", {"offset": offset})
        infos = page.get("streams") or []
        out.extend(_replicas_of(i) for i in infos)
        out.extend(StreamReplicas(n, 0, None, None) for n in page.get("missing") or [])
        offset += len(infos)
        if not infos or offset >= int(page.get("total") or 0):
            return out


async def set_replicas(nc: NatsClient, js: JetStreamContext, stream: str, replicas: int) -> None:
    """Update `stream`'s `num_replicas` (JetStream adds or removes peers and catches them up);
    every other field of its configuration is sent back unchanged."""
    info = await api(nc, js, f"STREAM.INFO.{stream}")
    config = dict(info["config"])
    if int(config.get("num_replicas") or 1) == replicas:
        return
    config["num_replicas"] = replicas
    await api(nc, js, f"STREAM.UPDATE.{stream}", config)


async def can_place(nc: NatsClient, js: JetStreamContext, replicas: int) -> bool:
    """Whether JetStream can place `replicas` replicas now: creates a tiny memory stream with
    that many and deletes it. The meta leader places only on online servers of its cluster, so
    this counts servers that can hold data, which no INFO field says reliably.

    False when JetStream refuses for lack of servers (or is not clustered); raises
    `JetStreamError` when it does not answer (no meta leader, a partition).
    """
    name = f"ACCORD-PROBE-{uuid.uuid4().hex[:12]}"
    cfg = {
        "name": name,
        "subjects": [f"_accord.probe.{name}"],
        "storage": "memory",
        "num_replicas": replicas,
        "max_msgs": 1,
        "max_bytes": 1024,
    }
    try:
        await api(nc, js, f"STREAM.CREATE.{name}", cfg)
    except JetStreamError as exc:
        if exc.err_code in _CANNOT_PLACE:
            return False
        raise
    with contextlib.suppress(JetStreamError):
        await api(nc, js, f"STREAM.DELETE.{name}")
    return True


async def read_key(js: JetStreamContext, bucket: str, key: str) -> tuple[bytes, int] | None:
    """The value and revision of `key` in KV `bucket`; None when the bucket or key is missing."""
    try:
        kv = await js.key_value(bucket)
        entry = await kv.get(key)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None
    except nats.js.errors.NotFoundError:  # the stream behind the bucket
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise JetStreamError(f"cannot read {bucket}/{key}: {type(exc).__name__}: {exc}") from None
    return entry.value or b"", int(entry.revision or 0)


async def update_key(
    js: JetStreamContext, bucket: str, key: str, value: bytes, revision: int
) -> bool:
    """Write `key` only if its revision is still `revision`; False when someone wrote first."""
    try:
        kv = await js.key_value(bucket)
        await kv.update(key, value, last=revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise JetStreamError(f"cannot write {bucket}/{key}: {type(exc).__name__}: {exc}") from None
    return True


class NatsAdmin:
    """The `cluster._replication.Admin` of one cluster over one nats-py connection."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, meta_bucket: str) -> None:
        self._nc, self._js, self._meta = nc, js, meta_bucket

    async def read_config(self) -> tuple[bytes, int] | None:
        return await read_key(self._js, self._meta, "config")

    async def write_config(self, value: bytes, revision: int) -> bool:
        return await update_key(self._js, self._meta, "config", value, revision)

    async def streams(self) -> list[StreamReplicas]:
        return await list_streams(self._nc, self._js)

    async def set_replicas(self, stream: str, replicas: int) -> None:
        await set_replicas(self._nc, self._js, stream, replicas)

    async def can_place(self, replicas: int) -> bool:
        return await can_place(self._nc, self._js, replicas)
