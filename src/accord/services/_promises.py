"""Promises (promise theory): what agents declare they will keep, verified on a schedule.

Every assessment — kept, not kept or unknown, with evidence and time — is appended to the ledger
stream. A promise that is not kept triggers its promiser's remediation and is assessed again.
Reputation is the kept ratio of a promiser's assessments over a sliding window; placement prefers
nodes with a better one.

Conflicts are found when a promise is made: a promise names the exclusive resources it claims
(`port:8080`, `route:web.example/api`) and a claim already held by another promise is refused with
`PromiseConflict`, naming the holder. Service specs claim their fixed port and route the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import nats.errors
import nats.js.errors

from .._errors import AccordError, NotConnected
from ._store import Assessment, PromiseConflict, ServiceStore, _entries, _token

if TYPE_CHECKING:
    from .._mesh import Mesh
    from ._agent import NodeAgent

log = logging.getLogger("accord.promises")

REPUTATION_WINDOW = 300.0
REWRITE_EVERY = 10.0  # an unchanged outcome is re-recorded this often


class PromiseRecord(msgspec.Struct, kw_only=True):
    name: str
    promiser: str
    kind: str
    description: str
    claims: list[str] = []
    made_at: float = 0.0


class Verdict(msgspec.Struct):
    """What a verifier returns: `kept` True/False, or None for unknown, with evidence."""

    kept: bool | None
    evidence: str = ""


class _Assessed(Protocol):
    promiser: str
    outcome: str
    at: float


class Reputation:
    """Kept ratio per promiser over the last `window` seconds of assessments."""

    def __init__(self, window: float = REPUTATION_WINDOW) -> None:
        self.window = window
        self._seen: dict[str, deque[tuple[float, bool]]] = {}

    def add(self, a: _Assessed) -> None:
        if a.outcome not in ("kept", "not_kept"):
            return
        self._seen.setdefault(a.promiser, deque(maxlen=1000)).append((a.at, a.outcome == "kept"))

    def counts(self, promiser: str, now: float | None = None) -> tuple[int, int]:
        now = time.time() if now is None else now
        q = self._seen.get(promiser, ())
        recent = [kept for at, kept in q if now - at <= self.window]
        return sum(recent), len(recent)

    def of(self, promiser: str) -> float:
        """1.0 for a promiser with no recent assessment (no evidence against it)."""
        kept, total = self.counts(promiser)
        return kept / total if total else 1.0

    def table(self) -> dict[str, dict[str, Any]]:
        out = {}
        for promiser in sorted(self._seen):
            kept, total = self.counts(promiser)
            if total:
                out[promiser] = {"kept": kept, "assessed": total, "ratio": kept / total}
        return out


class _Recorder:
    """Writes an assessment when the outcome changes, and at least every REWRITE_EVERY s."""

    def __init__(self, store: ServiceStore, assessor: str) -> None:
        self._store = store
        self._assessor = assessor
        self._last: dict[str, tuple[str, float]] = {}

    async def record(
        self, promise: str, promiser: str, kind: str, kept: bool | None, evidence: str
    ) -> bool:
        outcome = "unknown" if kept is None else ("kept" if kept else "not_kept")
        now = time.time()
        prev = self._last.get(promise)
        if prev is not None and prev[0] == outcome and now - prev[1] < REWRITE_EVERY:
            return False
        a = Assessment(promise=promise, promiser=promiser, kind=kind, outcome=outcome,
                       evidence=evidence, at=now, assessor=self._assessor)  # fmt: skip
        await self._store.assess(a)
        self._last[promise] = (outcome, now)
        if prev is None or prev[0] != outcome:
            log.info("promise %s: %s (%s)", promise, outcome, evidence)
        return True


class ServicePromises:
    """The promises a service spec makes, assessed by the services controller:

    - `<svc>.replicas` (state): the wanted number of healthy replicas run;
    - `<svc>.replace` (action): a lost or crashed replica is healthy again within
      `promises.replace_within` seconds;
    - `<svc>.latency` (state, when `promises.p95_latency_ms` is set): probe p95 under the target.
    """

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._rec = _Recorder(agent.store, agent.name)
        self._outage: dict[str, float] = {}
        self._late: set[str] = set()
        self._ever_kept: set[str] = set()
        self._seeded: set[str] = set()

    async def _seed(self, names: Iterable[str]) -> None:
        """A new controller term picks up where the ledger left off: services already assessed
        are past their start-up grace, and an open outage keeps its start time."""
        for name in names:
            self._seeded.add(name)
            last = await self.agent.store.ledger(last=1, promise=f"{name}.replicas")
            if not last or last[-1].outcome == "unknown":
                continue
            self._ever_kept.add(name)
            if last[-1].outcome == "not_kept":
                self._outage[name] = time.monotonic() - max(0.0, time.time() - last[-1].at)

    async def assess(self, term: Any) -> None:
        specs = self.agent.current_specs()
        await self._seed(n for n in specs if n not in self._seeded)
        placements = self.agent.current_placements()
        for name, spec in specs.items():
            promiser = f"service/{name}"
            want = spec.wanted_healthy
            healthy = self.agent.healthy(name)
            kept = len(healthy) >= want
            where = ", ".join(f"{i.index}@{i.node}:{i.port}" for i in healthy) or "none"
            evidence = f"{len(healthy)}/{want} healthy ({where})"
            lost = self.agent.lost(name)
            if lost:
                evidence += "; lost with their node: " + ", ".join(
                    f"{i.index}@{i.node}" for i in lost
                )
            p = placements.get(name)
            verdict: bool | None = kept
            if kept or lost:  # it ran: a replica gone with its node is a loss, not a start
                self._ever_kept.add(name)
            if not kept and name not in self._ever_kept:
                age = time.time() - (p.first_at or p.at) if p is not None else 0.0
                if age < spec.health.grace:
                    verdict, evidence = None, f"starting: {evidence}"
            await self._rec.record(f"{name}.replicas", promiser, "state", verdict, evidence)
            await self._assess_replace(name, spec.promises.replace_within, kept, promiser)
            if spec.promises.p95_latency_ms is not None:
                p95s = [i.p95_ms for i in healthy if i.p95_ms is not None]
                if not p95s:
                    await self._rec.record(f"{name}.latency", promiser, "state", None,
                                           "no probe latency yet")  # fmt: skip
                else:
                    worst = max(p95s)
                    target = spec.promises.p95_latency_ms
                    await self._rec.record(
                        f"{name}.latency", promiser, "state", worst < target,
                        f"worst replica probe p95 {worst:.1f} ms (target < {target:g} ms)",
                    )  # fmt: skip

    async def _assess_replace(self, name: str, within: float, kept: bool, promiser: str) -> None:
        if name not in self._ever_kept:
            return
        now = time.monotonic()
        started = self._outage.get(name)
        if not kept:
            if started is None:
                self._outage[name] = now
            elif now - started > within and name not in self._late:
                self._late.add(name)
                await self._rec.record(f"{name}.replace", promiser, "action", False,
                                       f"replicas still missing after {within:g}s")  # fmt: skip
            return
        if started is not None:
            took = now - started
            del self._outage[name]
            self._late.discard(name)
            self._rec._last.pop(f"{name}.replace", None)  # each outage is its own assessment
            await self._rec.record(
                f"{name}.replace", promiser, "action", took <= within,
                f"replicas restored {took:.1f}s after the loss (promised {within:g}s)",
            )  # fmt: skip


class NodePromises:
    """Each node promises to keep the replicas placed on it healthy (`node/<name>`)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._rec = _Recorder(agent.store, agent.name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            for r in list(self.agent.replicas.values()):
                status = r.inst.status
                if status in ("standby", "waiting_lease", "stopped"):
                    continue
                kept = True if status == "healthy" else (None if status == "starting" else False)
                evidence = f"{r.spec.name}/{r.inst.index} {status}, {r.inst.restarts} restarts"
                with contextlib.suppress(Exception):
                    await self._rec.record(
                        f"{r.spec.name}.{r.inst.index}@{self.agent.name}",
                        f"node/{self.agent.name}", "state", kept, evidence,
                    )  # fmt: skip


# -- claims and the public promise API ------------------------------------------------------------


async def claim(store: ServiceStore, owner: str, claims: Iterable[str]) -> None:
    """Take every exclusive claim for `owner`, or none of them (`PromiseConflict`)."""
    taken: list[str] = []
    try:
        for c in claims:
            key = f"claim.{_token(c)}"
            try:
                await store.promises_kv.create(key, owner.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                entry = await store.promises_kv.get(key)
                holder = (entry.value or b"").decode()
                if holder != owner:
                    raise PromiseConflict(
                        f"{owner} cannot promise {c!r}: it is already promised by {holder}"
                    ) from None
            taken.append(key)
    except BaseException:
        for key in taken:
            with contextlib.suppress(Exception):
                await store.promises_kv.delete(key)
        raise


async def release(store: ServiceStore, owner: str, claims: Iterable[str]) -> None:
    for c in claims:
        key = f"claim.{_token(c)}"
        with contextlib.suppress(Exception):
            entry = await store.promises_kv.get(key)
            if (entry.value or b"").decode() == owner:
                await store.promises_kv.delete(key)


async def register(store: ServiceStore, record: PromiseRecord) -> None:
    record.made_at = record.made_at or time.time()
    await store.promises_kv.put(f"p.{_token(record.name)}", msgspec.json.encode(record))


async def records(store: ServiceStore) -> list[PromiseRecord]:
    out = []
    for key, value, _rev in await _entries(store.promises_kv):
        if key.startswith("p."):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(msgspec.json.decode(value, type=PromiseRecord))
    return sorted(out, key=lambda r: r.name)


Verifier = Callable[[], Awaitable["Verdict | bool | None"]]


class PromiseHandle:
    """A promise being kept: `last` is the latest assessment's outcome."""

    def __init__(self, record: PromiseRecord) -> None:
        self.record = record
        self.last: str | None = None
        self.assessments = 0
        self.assessed = asyncio.Event()


@contextlib.asynccontextmanager
async def promise(
    mesh: Mesh,
    name: str,
    verifier: Verifier,
    *,
    promiser: str,
    every: float = 5.0,
    kind: str = "state",
    description: str = "",
    remediation: Callable[[], Awaitable[None]] | None = None,
    claims: Iterable[str] = (),
) -> AsyncIterator[PromiseHandle]:
    """Make a promise for as long as the block runs.

    `verifier()` returns a `Verdict` (or True/False/None) and is run every `every` seconds; each
    result goes to the ledger. When it is not kept, `remediation()` runs and the promise is
    assessed again at once. Raises `PromiseConflict` if a claim is held by another promise; the
    claims and the record are withdrawn on exit.
    """
    if kind not in ("state", "action"):
        raise PromiseConflict(f"promise kind must be 'state' or 'action', got {kind!r}")
    if not 0 < every <= 3600:
        raise PromiseConflict(f"every must be > 0 and <= 3600 seconds, got {every}")
    store = await store_for(mesh)
    claims = list(claims)
    record = PromiseRecord(name=name, promiser=promiser, kind=kind, description=description,
                           claims=claims)  # fmt: skip
    await claim(store, f"promise/{name}", claims)
    await register(store, record)
    handle = PromiseHandle(record)
    task = asyncio.create_task(_keep(store, handle, verifier, every, remediation, mesh.name))
    try:
        yield handle
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await release(store, f"promise/{name}", claims)
        with contextlib.suppress(Exception):
            await store.promises_kv.delete(f"p.{_token(name)}")


async def _keep(
    store: ServiceStore,
    handle: PromiseHandle,
    verifier: Verifier,
    every: float,
    remediation: Callable[[], Awaitable[None]] | None,
    assessor: str,
) -> None:
    rec = handle.record
    while True:
        try:
            result = await verifier()
            v = result if isinstance(result, Verdict) else Verdict(result, "")
        except Exception as exc:
            v = Verdict(None, f"verifier failed: {type(exc).__name__}: {exc}")
        outcome = "unknown" if v.kept is None else ("kept" if v.kept else "not_kept")
        a = Assessment(promise=rec.name, promiser=rec.promiser, kind=rec.kind, outcome=outcome,
                       evidence=v.evidence, at=time.time(), assessor=assessor)  # fmt: skip
        with contextlib.suppress(AccordError, nats.errors.Error, TimeoutError):
            await store.assess(a)
        handle.last = outcome
        handle.assessments += 1
        handle.assessed.set()
        if v.kept is False and remediation is not None:
            try:
                await remediation()
            except Exception as exc:
                log.warning("remediation of %s failed: %s", rec.name, exc)
            await asyncio.sleep(min(every, 1.0))  # re-assess soon after remediating
            continue
        await asyncio.sleep(every)


async def store_for(mesh: Mesh) -> ServiceStore:
    """The services store of the cluster `mesh` is connected to (opened once per mesh)."""
    cached = getattr(mesh, "_service_store", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    js = mesh._transport.js  # type: ignore[attr-defined]
    replicas = mesh.config.replicas  # the cluster's stored factor (cluster/_replication.py)
    if not replicas:  # a record from before the factor was stored
        try:
            info = await js.stream_info(mesh.names.events_stream)
            replicas = info.config.num_replicas or 1
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"JetStream did not answer: {exc}") from None
    store = await ServiceStore.open(js, mesh.names, mesh._kvs["members"], replicas)
    mesh._service_store = store  # type: ignore[attr-defined]
    return store
