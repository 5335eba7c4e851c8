"""The promises the services make, and the verifiers the services controller and every node agent
run on a schedule to assess them; each assessment goes to the ledger (`_promises` has the public
promise API, the ledger's reputation and the claims).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from ._store import Assessment, ServiceStore
from ._view import ServiceView

log = logging.getLogger("accord.promises")

REWRITE_EVERY = 10.0  # an unchanged outcome is re-recorded this often


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

    def __init__(self, view: ServiceView) -> None:
        self.view = view
        self._rec = _Recorder(view.store, view.name)
        self._outage: dict[str, float] = {}
        self._late: set[str] = set()
        self._ever_kept: set[str] = set()
        self._seeded: set[str] = set()

    async def _seed(self, names: Iterable[str]) -> None:
        """A new controller term picks up where the ledger left off: services already assessed
        are past their start-up grace, and an open outage keeps its start time."""
        for name in names:
            self._seeded.add(name)
            last = await self.view.store.ledger(last=1, promise=f"{name}.replicas")
            if not last or last[-1].outcome == "unknown":
                continue
            self._ever_kept.add(name)
            if last[-1].outcome == "not_kept":
                self._outage[name] = time.monotonic() - max(0.0, time.time() - last[-1].at)

    async def assess(self, term: Any) -> None:
        specs = self.view.current_specs()
        await self._seed(n for n in specs if n not in self._seeded)
        placements = self.view.current_placements()
        for name, spec in specs.items():
            promiser = f"service/{name}"
            want = spec.wanted_healthy
            healthy = self.view.healthy(name)
            kept = len(healthy) >= want
            where = ", ".join(f"{i.index}@{i.node}:{i.port}" for i in healthy) or "none"
            evidence = f"{len(healthy)}/{want} healthy ({where})"
            lost = self.view.lost(name)
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

    def __init__(self, view: ServiceView) -> None:
        self.view = view
        self._rec = _Recorder(view.store, view.name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            for r in list(self.view.replicas.values()):
                status = r.inst.status
                if status in ("standby", "waiting_lease", "stopped"):
                    continue
                kept = True if status == "healthy" else (None if status == "starting" else False)
                evidence = f"{r.spec.name}/{r.inst.index} {status}, {r.inst.restarts} restarts"
                with contextlib.suppress(Exception):
                    await self._rec.record(
                        f"{r.spec.name}.{r.inst.index}@{self.view.name}",
                        f"node/{self.view.name}", "state", kept, evidence,
                    )  # fmt: skip
