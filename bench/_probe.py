"""Availability probes for the failover benchmarks: one task per (client, agent, operation) asks
back to back and records every outcome; from those records, when service was restored.

"Restored" for one probe = the completion of the first successful ask after its last failed one
(asks in flight at the fault included); a probe that never failed after the fault is unaffected
(0 s); one whose last ask failed is not restored. A group of probes (one strategy, one client)
is restored when its slowest probe is.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _common import median

from accord import AccordError


@dataclass
class Op:
    invoke: float
    complete: float
    ok: bool
    error: str = ""  # the exception's class name
    detail: str = ""  # the start of its message


@dataclass
class Probe:
    """Asks `agent` with `msg` through `mesh` until stopped; `ops` is its history."""

    mesh: Any
    agent: str
    msg: Any
    view: str  # which client: "client", "majority", "minority", ...
    strategy: str
    op: str  # "write" or "read"
    ask_timeout: float = 1.0
    interval: float = 0.2
    ops: list[Op] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                await self.mesh.ask(
                    self.agent, self.msg, timeout=self.ask_timeout, delivery="at_most_once"
                )
                ok, err, detail = True, "", ""
            except AccordError as exc:
                ok, err, detail = False, type(exc).__name__, str(exc)[:160]
            except Exception as exc:  # a library error that leaked: still an outcome to record
                ok, err, detail = False, f"leaked {type(exc).__name__}", str(exc)[:160]
            self.ops.append(Op(t, time.perf_counter(), ok, err, detail))
            # Back off after a failure a little, so dead targets do not flood the servers.
            await asyncio.sleep(self.interval if ok else max(self.interval, 0.1))

    def restored_at(self, t0: float) -> tuple[float | None, bool]:
        """(time from which every ask succeeded, affected?) judged from `t0`; (None, True) when
        the last ask failed, (t0, False) when no ask failed after t0."""
        last_fail = None
        for o in reversed(self.ops):
            if o.complete < t0:
                break
            if not o.ok:
                last_fail = o
                break
        if last_fail is None:
            return t0, False
        after = [o for o in self.ops if o.ok and o.invoke >= last_fail.complete]
        return (after[0].complete, True) if after else (None, True)

    def stable(self, t0: float, now: float, window: float) -> bool:
        at, _ = self.restored_at(t0)
        return at is not None and now - at >= window and bool(self.ops) and self.ops[-1].ok

    def last_error(self) -> Op | None:
        return next((o for o in reversed(self.ops) if not o.ok), None)


def started(probes: list[Probe], stop: asyncio.Event) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(p.run(stop)) for p in probes]


async def all_answering(probes: list[Probe], timeout: float, window: float = 0.6) -> bool:
    """Wait until every probe's asks have succeeded for `window` s; False at the deadline."""
    deadline = time.perf_counter() + timeout
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        if all(p.stable(t0, now, window) for p in probes):
            return True
        await asyncio.sleep(0.1)
    return False


async def observe(
    probes: list[Probe], t0: float, *, stable: float, min_s: float, timeout: float
) -> float | None:
    """Wait until every probe in `probes` has answered for `stable` s and at least `min_s` s
    passed since `t0`; returns that moment (or None at `t0 + timeout`)."""
    while True:
        now = time.perf_counter()
        if now - t0 >= min_s and all(p.stable(t0, now, stable) for p in probes):
            return now
        if now - t0 >= timeout:
            return None
        await asyncio.sleep(0.1)


def summarize(probes: list[Probe], t0: float) -> dict[str, Any]:
    """What one group of probes saw after `t0` (seconds relative to t0)."""
    restored, stuck = [], []
    affected = 0
    first_fail = None
    ok_after = total_after = 0
    for p in probes:
        at, hit = p.restored_at(t0)
        affected += hit
        if at is None:
            stuck.append(p)
        else:
            restored.append(at - t0)
        fails = [o.invoke for o in p.ops if not o.ok and o.complete >= t0]
        if fails:
            first_fail = min(fails[0] - t0, first_fail if first_fail is not None else 1e9)
        after = [o for o in p.ops if o.complete >= t0]
        total_after += len(after)
        ok_after += sum(o.ok for o in after)
    before = [o.complete - o.invoke for p in probes for o in p.ops if o.ok and o.complete < t0]
    out: dict[str, Any] = {
        "agents": len(probes),
        "affected": affected,
        "restored_s": None if stuck else max(restored, default=0.0),
        "affected_p50_s": median([r for r in restored if r > 0]) if affected else 0.0,
        "first_failure_s": first_fail,
        "ok_fraction_after": ok_after / total_after if total_after else None,
        "asks_after": total_after,
        "ask_p50_ms_before": median(before) * 1000 if before else None,
        "errors_after": dict(
            Counter(o.error for p in probes for o in p.ops if not o.ok and o.complete >= t0)
        ),
    }
    if stuck:
        out["not_restored"] = len(stuck)
        last = [e for e in (p.last_error() for p in stuck) if e is not None]
        out["last_errors"] = dict(Counter(e.error for e in last))
        out["last_error_sample"] = last[0].detail if last else ""
        out["not_restored_agents"] = sorted(p.agent for p in stuck)[:10]
    return out
