"""Promises (promise theory): what agents declare they will keep, verified on a schedule.

Every assessment — kept, not kept or unknown, with evidence and time — is appended to the ledger
stream. A promise that is not kept triggers its promiser's remediation and is assessed again.
Reputation is the kept ratio of a promiser's assessments over a sliding window; placement prefers
nodes with a better one. (The verifiers of the promises services make are in `_verifiers.py`.)

Conflicts are found when a promise is made: a promise names the exclusive resources it claims
(`port:8080`, `route:web.example/api`) and a claim already held by another promise is refused with
`PromiseConflict`, naming the holder. Service specs claim their fixed port and route the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .._errors import AccordError, ConfigurationError, NotConnected
from ..engine._api import BucketSpec, JetStream, NotFound, WrongRevision
from ._store import (
    Assessment,
    PromiseConflict,
    ServiceStore,
    _entries,
    _token,
    answered,
    decoded,
)

if TYPE_CHECKING:
    from .._mesh import Mesh

log = logging.getLogger("accord.promises")

REPUTATION_WINDOW = 300.0


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


# -- claims and the public promise API ------------------------------------------------------------


@answered
async def claim(store: ServiceStore, owner: str, claims: Iterable[str]) -> None:
    """Take every exclusive claim for `owner`, or none of them (`PromiseConflict`)."""
    taken: list[str] = []
    try:
        for c in claims:
            key = f"claim.{_token(c)}"
            try:
                await store.promises_kv.create(key, owner.encode())
            except WrongRevision:
                entry = await store.promises_kv.get(key, leader=True)
                holder = entry.value.decode() if entry is not None else ""
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


@answered
async def release(store: ServiceStore, owner: str, claims: Iterable[str]) -> None:
    for c in claims:
        key = f"claim.{_token(c)}"
        with contextlib.suppress(Exception):
            entry = await store.promises_kv.get(key)
            if entry is not None and entry.value.decode() == owner:
                await store.promises_kv.delete(key)


@answered
async def register(store: ServiceStore, record: PromiseRecord) -> None:
    record.made_at = record.made_at or time.time()
    await store.promises_kv.put(f"p.{_token(record.name)}", msgspec.json.encode(record))


@answered
async def withdraw(store: ServiceStore, name: str) -> None:
    """Remove the record of promise `name` (its ledger entries stay)."""
    await store.promises_kv.delete(f"p.{_token(name)}")


@answered
async def records(store: ServiceStore) -> list[PromiseRecord]:
    out = []
    for key, value, _rev in await _entries(store.promises_kv):
        if key.startswith("p."):
            r = decoded(PromiseRecord, value, "promise")
            if r is not None:
                out.append(r)
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
        with contextlib.suppress(AccordError):
            await withdraw(store, name)


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
        with contextlib.suppress(AccordError):
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


# One store per Mesh, opened on first use and gone with the Mesh (a client has nothing to close:
# the store holds only bucket handles on the Mesh's own connection).
_stores: weakref.WeakKeyDictionary[Mesh, ServiceStore] = weakref.WeakKeyDictionary()


async def store_for(mesh: Mesh) -> ServiceStore:
    """The services store of the cluster `mesh` is connected to (opened once per mesh).

    Raises `NotConnected` when JetStream does not answer, `ConfigurationError` when the mesh's
    engine has no JetStream.
    """
    cached = _stores.get(mesh)
    if cached is not None:
        return cached
    return _stores.setdefault(mesh, await _open_store(mesh))


@answered
async def _open_store(mesh: Mesh) -> ServiceStore:
    js = _jetstream(mesh)
    names = mesh.names
    try:
        members = await js.bucket(BucketSpec(name=names.bucket("members")), create=False)
        replicas = mesh.config.replicas  # the cluster's stored factor (cluster/_replication.py)
        if not replicas:  # a record from before the factor was stored: as the events stream
            events = await js.stream_state(names.events_stream)
            replicas = events.replicas if events is not None else 1
    except NotFound:
        raise NotConnected(f"cluster {names.cluster!r} is not set up on this JetStream") from None
    return await ServiceStore.open(js, names, members, replicas)


def _jetstream(mesh: Mesh) -> JetStream:
    engine: Any = mesh._transport
    if not callable(getattr(engine, "bucket", None)):
        raise ConfigurationError("services need an engine with JetStream")
    return engine  # type: ignore[no-any-return]
