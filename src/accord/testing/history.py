"""A history checker for partition and failover scenarios (Jepsen-style, small).

Tests record every operation — invoke time, completion time, outcome (ok / fail / unknown), the
node and lease epoch that answered, and the value — and `check` verifies:

- **single owner** (for `absolute` agents): an answer under an older epoch never comes from an
  operation invoked after an answer under a newer epoch completed, and one epoch is never served
  by two nodes;
- **no acknowledged write lost**: for counters, ok increments ≤ final value ≤ ok + unknown;
- **convergence** (for `split_brain_allowed` agents): every replica's final value is the same
  and, when the expected total is known, equal to it.

`Report` is printed as JSON by the scenarios: ops, errors, unknowns, violations, failover seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import msgspec


class Op(msgspec.Struct):
    agent: str
    kind: str  # "write" | "read"
    invoke: float
    complete: float = 0.0
    outcome: str = "unknown"  # "ok" | "fail" | "unknown"
    node: str = ""
    epoch: int = 0
    value: Any = None
    side: str = ""


class Report(msgspec.Struct):
    ops: int
    ok: int
    errors: int
    unknowns: int
    violations: list[str]
    failover_s: float | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    def json(self) -> str:
        return msgspec.json.encode(self).decode()


class History:
    def __init__(self) -> None:
        self.ops: list[Op] = []

    def invoke(self, agent: str, kind: str, side: str = "") -> Op:
        op = Op(agent, kind, time.monotonic(), side=side)
        self.ops.append(op)
        return op

    @staticmethod
    def ok(op: Op, node: str = "", epoch: int = 0, value: Any = None) -> None:
        op.complete, op.outcome, op.node, op.epoch, op.value = (
            time.monotonic(), "ok", node, epoch, value,
        )  # fmt: skip

    @staticmethod
    def fail(op: Op, unknown: bool) -> None:
        op.complete, op.outcome = time.monotonic(), "unknown" if unknown else "fail"


def single_owner_violations(ops: list[Op]) -> list[str]:
    out = []
    by_agent: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.outcome == "ok" and op.epoch:
            by_agent[op.agent].append(op)
    for agent, done in by_agent.items():
        served: dict[int, str] = {}
        for op in done:
            if served.setdefault(op.epoch, op.node) != op.node:
                out.append(f"{agent}: epoch {op.epoch} served by {served[op.epoch]} and {op.node}")
        by_complete = sorted(done, key=lambda o: o.complete)
        i, newest = 0, 0  # the largest epoch among ops completed before the current invoke
        for op in sorted(done, key=lambda o: o.invoke):
            while i < len(by_complete) and by_complete[i].complete < op.invoke:
                newest = max(newest, by_complete[i].epoch)
                i += 1
            if op.epoch < newest:
                out.append(
                    f"{agent}: {op.node} answered with stale epoch {op.epoch} after epoch "
                    f"{newest} had answered"
                )
    return out


def lost_write_violations(ops: list[Op], final: dict[str, int]) -> list[str]:
    out = []
    for agent, value in final.items():
        writes = [o for o in ops if o.agent == agent and o.kind == "write"]
        ok = sum(1 for o in writes if o.outcome == "ok")
        unknown = sum(1 for o in writes if o.outcome == "unknown")
        if not ok <= value <= ok + unknown:
            out.append(
                f"{agent}: final {value} outside [{ok}, {ok + unknown}] (acked writes lost?)"
            )
    return out


def convergence_violations(
    replicas: dict[str, dict[str, int]], expected: dict[str, int] | None = None
) -> list[str]:
    """`replicas`: agent → {side: value read there after heal}."""
    out = []
    for agent, seen in replicas.items():
        if len(set(seen.values())) > 1:
            out.append(f"{agent}: replicas disagree after heal: {seen}")
        if expected is not None and agent in expected:
            for side, value in seen.items():
                if value != expected[agent]:
                    out.append(f"{agent}: {side} reads {value}, expected {expected[agent]}")
    return out


def report(history: History, violations: list[str], failover_s: float | None = None,
           **extra: Any) -> Report:  # fmt: skip
    ops = history.ops
    return Report(
        ops=len(ops),
        ok=sum(1 for o in ops if o.outcome == "ok"),
        errors=sum(1 for o in ops if o.outcome == "fail"),
        unknowns=sum(1 for o in ops if o.outcome == "unknown"),
        violations=violations,
        failover_s=failover_s,
        extra=extra,
    )
