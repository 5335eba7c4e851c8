"""The services' JetStream resources and records.

- bucket `services`: the deployed specs, key = service name (written by `accord deploy`);
- bucket `placements`: the controller's assignment per service, fenced by its leadership token;
- bucket `instances`: what each node actually runs, key = `<service>.<slot>`, rewritten every
  couple of seconds with a per-message TTL so a dead node's instances disappear on their own;
- stream `ledger`: every promise assessment (`<prefix>.ledger.<promise>`);
- stream `logs`: the output lines of every replica (`<prefix>.logs.<service>`), bounded per service.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from .._errors import ConfigurationError, Fenced, NotConnected
from ..cluster._config import Names, _bucket
from ..cluster._membership import MemberInfo
from ..engine._nats import translated
from ._placement import NodeView, Slot
from ._spec import ServiceSpec, decode_spec, encode_spec

INSTANCE_TTL = "10s"
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


def _js_errors(exc: Exception) -> NotConnected:
    return NotConnected(f"JetStream did not answer: {type(exc).__name__}: {exc}")


class ServiceStore:
    def __init__(self, js: JetStreamContext, names: Names, kvs: dict[str, KeyValue]) -> None:
        self.js = js
        self.names = names
        self.specs_kv = kvs["services"]
        self.placements_kv = kvs["placements"]
        self.instances_kv = kvs["instances"]
        self.promises_kv = kvs["promises"]
        self.members_kv = kvs["members"]

    @classmethod
    async def open(
        cls, js: JetStreamContext, names: Names, members: KeyValue, replicas: int = 1
    ) -> ServiceStore:
        try:
            kvs = {
                "services": await _bucket(js, names.bucket("services"), replicas),
                "placements": await _bucket(js, names.bucket("placements"), replicas),
                "instances": await _bucket(js, names.bucket("instances"), replicas, marker_ttl=1),
                "promises": await _bucket(js, names.bucket("promises"), replicas),
                "members": members,
            }
            for kind, extra in (
                ("ledger", {"max_msgs": 200_000, "max_age": 7 * 24 * 3600.0}),
                ("logs", {"max_msgs_per_subject": LOG_LINES_PER_SERVICE, "max_age": 86400.0}),
            ):
                await _stream(js, names, kind, replicas, extra)
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError) as exc:
            raise _js_errors(exc) from None
        return cls(js, names, kvs)

    # -- specs ---------------------------------------------------------------------------------

    @translated
    async def specs(self) -> dict[str, tuple[ServiceSpec, int]]:
        """Every deployed spec with its revision (the spec's generation)."""
        out = {}
        for key, value, rev in await _entries(self.specs_kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out[key] = (decode_spec(value), rev)
        return out

    @translated
    async def deploy(self, spec: ServiceSpec, revision: int | None) -> int:
        """Store the spec: create it (`revision` None), or compare-and-set over `revision`, the
        deployed one the caller checked against."""
        try:
            if revision is not None:
                return await self.specs_kv.update(spec.name, encode_spec(spec), last=revision)
            return await self.specs_kv.create(spec.name, encode_spec(spec))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise PromiseConflict(
                f"service {spec.name!r} was changed concurrently; deploy again"
            ) from None

    @translated
    async def undeploy(self, name: str) -> None:
        """Delete the spec (the caller checked it is deployed)."""
        await self.specs_kv.delete(name)

    # -- placements and instances ------------------------------------------------------------

    @translated
    async def placements(self) -> dict[str, tuple[Placement, int]]:
        out = {}
        for key, value, rev in await _entries(self.placements_kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out[key] = (msgspec.json.decode(value, type=Placement), rev)
        return out

    async def write_placement(self, p: Placement, token: int) -> None:
        """Store a placement unless a controller with a newer token already wrote one (`Fenced`)."""
        for _ in range(20):
            current = (await self.placements()).get(p.service)
            try:
                if current is None:
                    await self.placements_kv.create(p.service, msgspec.json.encode(p))
                    return
                if current[0].token > token:
                    raise Fenced(f"placement of {p.service} was decided by a newer controller")
                await self.placements_kv.update(p.service, msgspec.json.encode(p), last=current[1])
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise NotConnected(f"placement of {p.service} kept changing under the controller")

    async def drop_placement(self, name: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.placements_kv.purge(name)

    @translated
    async def instances(self) -> list[Instance]:
        out = []
        for _key, value, _rev in await _entries(self.instances_kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(msgspec.json.decode(value, type=Instance))
        return sorted(out, key=lambda i: (i.service, i.index))

    async def put_instance(self, inst: Instance) -> None:
        inst.updated_at = time.time()
        subject = f"$KV.{self.instances_kv._name}.{instance_key(inst)}"
        await self.js.publish(
            subject, msgspec.json.encode(inst), headers={"Nats-TTL": INSTANCE_TTL}, timeout=2.0
        )

    @translated
    async def nodes(self, fresh_within: float = 5.0) -> list[NodeView]:
        """Live nodes as the members bucket shows them (for checks outside a node)."""
        now = time.time()
        out = []
        for _key, value, _rev in await _entries(self.members_kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                info = msgspec.json.decode(value, type=MemberInfo)
                if info.status == "up" and now - info.ts < fresh_within:
                    out.append(NodeView(info.name, dict(info.labels)))
        return sorted(out, key=lambda n: n.name)

    # -- ledger and logs ------------------------------------------------------------------------

    @translated
    async def assess(self, a: Assessment) -> None:
        await self.js.publish(
            f"{self.names.prefix}.ledger.{_token(a.promise)}", msgspec.json.encode(a), timeout=2.0
        )

    @translated
    async def ledger(self, last: int = 1000, promise: str | None = None) -> list[Assessment]:
        subject = f"{self.names.prefix}.ledger." + (_token(promise) if promise else ">")
        out = []
        for seq, data in await self._tail(
            f"accord_{self.names.cluster}_ledger", subject, last, scan=20_000
        ):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                a = msgspec.json.decode(data, type=Assessment)
                a.seq = seq
                out.append(a)
        return out

    @translated
    async def logs(self, service: str, last: int = 200) -> list[LogLine]:
        subject = f"{self.names.prefix}.logs.{service}"
        out = []
        for _seq, data in await self._tail(f"accord_{self.names.cluster}_logs", subject, last):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(msgspec.json.decode(data, type=LogLine))
        return out

    async def _tail(
        self, stream: str, subject: str, last: int, scan: int | None = None
    ) -> list[tuple[int, bytes]]:
        """The last `last` messages of `subject` (oldest first) among the stream's last `scan`
        messages (all when None), read with an ephemeral ordered consumer."""
        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        if info.state.messages == 0:
            return []
        start = info.state.first_seq
        if scan is not None:
            start = max(start, info.state.last_seq - scan + 1)
        sub = await self.js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        out: list[tuple[int, bytes]] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                out.append((msg.metadata.sequence.stream, msg.data))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out[-last:]


def _token(name: str) -> str:
    """A promise name as one subject token."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:200] or "_"


async def _entries(kv: KeyValue) -> list[tuple[str, bytes, int]]:
    """Every live key of `kv` with its value and revision.

    The key list comes from the server's own subject index (stream info with a subject filter),
    not from `kv.keys()`, whose watcher can report an empty bucket when the consumer's first
    message races with its pending count.
    """
    prefix = f"$KV.{kv._name}."
    info = await kv._js.stream_info(f"KV_{kv._name}", subjects_filter=f"{prefix}>")
    out = []
    for subject in sorted(info.state.subjects or {}):
        try:
            entry = await kv.get(subject[len(prefix) :])
        except nats.js.errors.KeyNotFoundError:  # deleted or purged (a marker is its last message)
            continue
        if entry.value:
            out.append((entry.key, entry.value, entry.revision or 0))
    return out


async def _stream(
    js: JetStreamContext, names: Names, kind: str, replicas: int, extra: dict[str, Any]
) -> None:
    name = f"accord_{names.cluster}_{kind}"
    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    cfg = StreamConfig(
        name=name,
        subjects=[f"{names.prefix}.{kind}.>"],
        num_replicas=replicas,
        storage=StorageType.FILE,
        **extra,
    )
    with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
        await js.add_stream(cfg)
