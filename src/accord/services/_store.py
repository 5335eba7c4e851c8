"""The services' JetStream resources and records.

- bucket `services`: the deployed specs, key = service name (written by `accord deploy`);
- bucket `placements`: the controller's assignment per service, fenced by its leadership token;
- bucket `instances`: what each node actually runs, key = `<service>.<slot>`, rewritten every
  couple of seconds with a per-message TTL so a dead node's instances disappear on their own;
- stream `ledger`: every promise assessment (`<prefix>.ledger.<promise>`);
- stream `logs`: the output lines of every replica (`<prefix>.logs.<service>`), bounded per service.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import msgspec

from .._errors import ConfigurationError, Fenced, NotConnected
from ..cluster._config import Names
from ..cluster._membership import MemberInfo
from ..engine._api import (
    KV,
    BucketSpec,
    JetStream,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StoredMessage,
    StreamSpec,
    WrongRevision,
)
from ._placement import NodeView, Slot
from ._spec import ServiceSpec, encode_spec

log = logging.getLogger("accord.services")

INSTANCE_TTL = 10  # seconds
LOG_LINES_PER_SERVICE = 5_000


class PromiseConflict(ConfigurationError):
    """A promise (or a spec's promises) that contradicts what is already promised, or cannot be
    kept as stated; the message explains why. Nothing was deployed."""


class Placement(msgspec.Struct):
    service: str
    generation: int
    slots: list[Slot]
    token: int
    decided_by: str
    at: float
    first_at: float = 0.0
    """When the service was first placed (kept across re-placements): start-up grace counts
    from here, so a replica lost right after the first start is a broken promise, not a start."""


class Instance(msgspec.Struct, kw_only=True):
    service: str
    index: int
    node: str
    role: str
    status: str  # waiting_lease | starting | healthy | unhealthy | backoff | stopped | standby
    pid: int | None = None
    port: int | None = None
    address: str = "127.0.0.1"
    restarts: int = 0
    started_at: float | None = None
    token: int | None = None
    next_restart_in: float | None = None
    last_exit: str | None = None
    p95_ms: float | None = None
    fenced: bool = False
    updated_at: float = 0.0


def instance_key(inst: Instance) -> str:
    """A fenced replica keeps one key per node whatever its slot (primary/standby swap)."""
    tail = "" if inst.fenced else f".{inst.index}"
    return f"{inst.service}.{inst.node}{tail}"


class Assessment(msgspec.Struct, kw_only=True):
    promise: str
    promiser: str
    kind: str  # "state" | "action"
    outcome: str  # "kept" | "not_kept" | "unknown"
    evidence: str
    at: float
    assessor: str = ""
    seq: int = 0


class LogLine(msgspec.Struct):
    service: str
    index: int
    node: str
    at: float
    line: str


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
#: Sources (`decoded`'s `what`) that had a malformed record: each is logged once per process.
_malformed: set[str] = set()


def decoded(typ: type[T] | msgspec.json.Decoder[T], data: bytes, what: str) -> T | None:
    """`data` as a `typ` (JSON), or None when it is not one: a malformed record in a bucket or
    stream (written by a bug, an older version or a hostile node credential) is skipped by the
    loop reading it, never fatal to it; the first of each source `what` is logged (WARNING)."""
    try:
        if isinstance(typ, msgspec.json.Decoder):
            return typ.decode(data)
        return msgspec.json.decode(data, type=typ)
    except Exception as exc:  # untrusted bytes: whatever fails to decode is skipped
        if what not in _malformed:
            _malformed.add(what)
            log.warning("skipping a malformed %s record (%s: %s); later ones skipped silently",
                        what, type(exc).__name__, str(exc)[:200])  # fmt: skip
        return None


_SIGNALS = (NoResponders, NotFound, Refused, RequestTimeout, WrongRevision)


def answered(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """The engine's internal signals that escape `fn` become `NotConnected` ("no answer the
    services can act on"), so none reaches a user. Engine errors come translated already: only
    the seam's named signals are caught, and a method handles those it expects itself."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except _SIGNALS as exc:
            raise NotConnected(f"{fn.__name__}: {type(exc).__name__}: {exc}") from None

    return call


class ServiceStore:
    """The services' buckets and streams on one engine connection (a client's or a node's).

    Every method raises `NotConnected` when the engine does not answer (a write may or may not
    have been applied), besides the errors it names.
    """

    def __init__(self, js: JetStream, names: Names, kvs: dict[str, KV]) -> None:
        self.js = js
        self.names = names
        self.specs_kv = kvs["services"]
        self.placements_kv = kvs["placements"]
        self.instances_kv = kvs["instances"]
        self.promises_kv = kvs["promises"]
        self.members_kv = kvs["members"]

    @classmethod
    @answered
    async def open(
        cls, js: JetStream, names: Names, members: KV, replicas: int = 1
    ) -> ServiceStore:
        """Open the services' buckets and streams, creating those that are missing (with
        `replicas`, as the cluster's own resources); `members` is the cluster's members bucket."""

        async def bucket(kind: str, marker_ttl: int = 0) -> KV:
            spec = BucketSpec(
                name=names.bucket(kind), replicas=replicas, history=1, marker_ttl=marker_ttl
            )
            return await js.bucket(spec)

        kvs = {
            "services": await bucket("services"),
            "placements": await bucket("placements"),
            "instances": await bucket("instances", marker_ttl=1),
            "promises": await bucket("promises"),
            "members": members,
        }
        await js.ensure_stream(
            StreamSpec(
                name=_stream_name(names, "ledger"),
                subjects=(f"{names.prefix}.ledger.>",),
                replicas=replicas,
                max_msgs=200_000,
                max_age=7 * 24 * 3600.0,
            )
        )
        await js.ensure_stream(
            StreamSpec(
                name=_stream_name(names, "logs"),
                subjects=(f"{names.prefix}.logs.>",),
                replicas=replicas,
                max_msgs_per_subject=LOG_LINES_PER_SERVICE,
                max_age=86400.0,
            )
        )
        return cls(js, names, kvs)

    # -- specs ---------------------------------------------------------------------------------

    @answered
    async def specs(self) -> dict[str, tuple[ServiceSpec, int]]:
        """Every deployed spec with its revision (the spec's generation)."""
        out = {}
        for key, value, rev in await _entries(self.specs_kv):
            spec = decoded(ServiceSpec, value, "service spec")
            if spec is not None:
                out[key] = (spec, rev)
        return out

    @answered
    async def deploy(self, spec: ServiceSpec, revision: int | None) -> int:
        """Store the spec: create it (`revision` None), or compare-and-set over `revision`, the
        deployed one the caller checked against. `PromiseConflict` if it changed meanwhile."""
        try:
            if revision is not None:
                return await self.specs_kv.update(spec.name, encode_spec(spec), last=revision)
            return await self.specs_kv.create(spec.name, encode_spec(spec))
        except WrongRevision:
            raise PromiseConflict(
                f"service {spec.name!r} was changed concurrently; deploy again"
            ) from None

    @answered
    async def undeploy(self, name: str) -> None:
        """Delete the spec (the caller checked it is deployed)."""
        await self.specs_kv.delete(name)

    # -- placements and instances ------------------------------------------------------------

    @answered
    async def placements(self) -> dict[str, tuple[Placement, int]]:
        out = {}
        for key, value, rev in await _entries(self.placements_kv):
            p = decoded(Placement, value, "placement")
            if p is not None:
                out[key] = (p, rev)
        return out

    @answered
    async def write_placement(self, p: Placement, token: int) -> None:
        """Store a placement unless a controller with a newer token already wrote one (`Fenced`)."""
        for _ in range(20):
            current = await self.placements_kv.get(p.service, leader=True)
            try:
                if current is None:
                    await self.placements_kv.create(p.service, msgspec.json.encode(p))
                    return
                held = decoded(Placement, current.value, "placement")
                if held is not None and held.token > token:
                    raise Fenced(f"placement of {p.service} was decided by a newer controller")
                await self.placements_kv.update(
                    p.service, msgspec.json.encode(p), last=current.revision
                )
                return
            except WrongRevision:
                continue
        raise NotConnected(f"placement of {p.service} kept changing under the controller")

    @answered
    async def drop_placement(self, name: str) -> None:
        await self.placements_kv.purge(name)

    @answered
    async def instances(self) -> list[Instance]:
        out = []
        for _key, value, _rev in await _entries(self.instances_kv):
            inst = decoded(Instance, value, "instance")
            if inst is not None:
                out.append(inst)
        return sorted(out, key=lambda i: (i.service, i.index))

    @answered
    async def put_instance(self, inst: Instance) -> None:
        """Report what this node runs; the record expires `INSTANCE_TTL` s after the last report."""
        inst.updated_at = time.time()
        await self.instances_kv.put(
            instance_key(inst), msgspec.json.encode(inst), ttl=INSTANCE_TTL, timeout=2.0
        )

    @answered
    async def drop_instance(self, inst: Instance) -> None:
        """Withdraw the record of a replica this node stopped running."""
        await self.instances_kv.purge(instance_key(inst))

    @answered
    async def nodes(self, fresh_within: float = 5.0) -> list[NodeView]:
        """Live nodes as the members bucket shows them (for checks outside a node)."""
        now = time.time()
        out = []
        for _key, value, _rev in await _entries(self.members_kv):
            info = decoded(MemberInfo, value, "member")
            if info is not None and info.status == "up" and now - info.ts < fresh_within:
                out.append(NodeView(info.name, dict(info.labels)))
        return sorted(out, key=lambda n: n.name)

    # -- ledger and logs ------------------------------------------------------------------------

    @answered
    async def assess(self, a: Assessment) -> None:
        """Append an assessment to the ledger (it may be stored even when this raises)."""
        await self.js.append(
            f"{self.names.prefix}.ledger.{_token(a.promise)}", msgspec.json.encode(a), timeout=2.0
        )

    @answered
    async def ledger(self, last: int = 1000, promise: str | None = None) -> list[Assessment]:
        """The latest `last` assessments (of `promise`, if given), oldest first."""
        subject = f"{self.names.prefix}.ledger." + (_token(promise) if promise else ">")
        stream = _stream_name(self.names, "ledger")
        out = []
        for m in await self._tail(stream, subject, last, within=20_000):
            a = decoded(Assessment, m.data, "ledger")
            if a is not None:
                a.seq = m.seq
                out.append(a)
        return out

    @answered
    async def logs(self, service: str, last: int = 200) -> list[LogLine]:
        """The latest `last` output lines of `service`'s replicas, oldest first."""
        subject = f"{self.names.prefix}.logs.{service}"
        out = []
        for m in await self._tail(_stream_name(self.names, "logs"), subject, last):
            line = decoded(LogLine, m.data, "log line")
            if line is not None:
                out.append(line)
        return out

    async def _tail(
        self, stream: str, subject: str, last: int, within: int = 0
    ) -> list[StoredMessage]:
        try:
            return await self.js.tail(stream, subject, last, within=within)
        except NotFound:  # not created yet: nothing recorded
            return []


def _token(name: str) -> str:
    """A promise name as one subject token."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:200] or "_"


async def _entries(kv: KV) -> list[tuple[str, bytes, int]]:
    """Every live key of `kv` with its value and revision."""
    out = []
    for key in await kv.keys():
        entry = await kv.get(key)
        if entry is not None and entry.value:  # deleted since it was listed
            out.append((entry.key, entry.value, entry.revision))
    return out


def _stream_name(names: Names, kind: str) -> str:
    return f"accord_{names.cluster}_{kind}"
