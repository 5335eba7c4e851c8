"""Workflows for the workflow tests and docs (`accord node --app examples/workflow_app.py`).

- `chain` (4 steps): a local step, an exactly-once `ctx.ask` to the `wf_counter` agent, a second
  local step, a second ask; returns `2 * n + 1 + 10` (see `Chain.run`). Each local step appends
  {"run", "step", "pid"} to $ACCORD_STEP_LOG when set, so a test can see steps run again.
- `saga`: reserve, charge (compensations: release, refund), then a step that fails unless the file
  $ACCORD_FIXED exists; compensations append to $ACCORD_STEP_LOG.
- `booking`: reserve, charge (compensable), then waits for an `Approve`; cancelling it compensates.
- `sleeper`: sleeps `Job.n` seconds durably, then returns the journaled time.
- `approval`: sleeps `Job.pause` s, then waits for an `Approve` signal (or `Job.n` seconds).
- `changing`: its first step's name comes from $ACCORD_STEP_NAME (to provoke a NonDeterminism).
- `noop5`: five exactly-once asks (the benchmark's workflow); `local5`: five local no-op steps.
- `alarm`: many reminders, each recording how late it rang (the timer benchmark).
- `pinger`: an ordinary agent with a reminder (`StartPing` → `Ping` after `delay`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import msgspec

import accord


class Job(msgspec.Struct):
    n: int
    pause: float = 0.0


class Add(msgspec.Struct):
    n: int = 1


class Read(msgspec.Struct):
    pass


class Approve(msgspec.Struct):
    by: str = ""


class Total(msgspec.Struct):
    total: int = 0
    applied: int = 0


def _log(entry: dict[str, object]) -> None:
    path = os.environ.get("ACCORD_STEP_LOG")
    if path:
        with open(path, "a") as f:  # one short write per line: O_APPEND keeps lines whole
            f.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")


class WfCounter(accord.Agent, type="wf_counter", delivery="exactly_once"):
    """Counts the asks it applied (exactly once each)."""

    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        self.state.applied += 1
        return self.state.total

    @accord.handler
    async def read(self, msg: Read) -> Total:
        return self.state


async def double(run: str, job: Job) -> int:
    _log({"run": run, "step": "double"})
    if job.pause:
        await asyncio.sleep(job.pause)
    return 2 * job.n


async def plus_one(run: str, x: int, pause: float) -> int:
    _log({"run": run, "step": "plus_one"})
    if pause:
        await asyncio.sleep(pause)
    return x + 1


class Chain(accord.Workflow, type="chain"):
    async def run(self, ctx: accord.WorkflowContext, job: Job) -> int:
        x = await ctx.step(double, ctx.run_id, job)
        await ctx.ask(f"wf_counter/{job.n % 5}", Add(1))
        y = await ctx.step(plus_one, ctx.run_id, x, job.pause)
        await ctx.ask(f"wf_counter/{job.n % 5}", Add(1))
        return y + 10


async def reserve(run: str) -> str:
    _log({"run": run, "step": "reserve"})
    return "hold-1"


async def release(run: str) -> None:
    _log({"run": run, "step": "release"})


async def charge(run: str) -> int:
    _log({"run": run, "step": "charge"})
    return 42


async def refund(run: str) -> None:
    _log({"run": run, "step": "refund"})


async def ship(run: str) -> str:
    _log({"run": run, "step": "ship"})
    if not _fixed():
        raise RuntimeError("no courier available")
    return "shipped"


def _fixed() -> bool:
    path = os.environ.get("ACCORD_FIXED", "")
    return bool(path) and os.path.exists(path)


FAST = accord.Retry(attempts=3, initial=0.05, factor=2.0, max_interval=0.2)


class Saga(accord.Workflow, type="saga"):
    async def run(self, ctx: accord.WorkflowContext, job: Job) -> str:
        await ctx.step(reserve, ctx.run_id, compensate=release, retry=FAST)
        await ctx.step(charge, ctx.run_id, compensate=refund, retry=FAST)
        return await ctx.step(ship, ctx.run_id, retry=FAST)


class Booking(accord.Workflow, type="booking"):
    """reserve and charge (compensable), then waits `Job.n` s for an `Approve` before shipping:
    cancelling it while it waits runs refund, then release, and it ends `cancelled`."""

    async def run(self, ctx: accord.WorkflowContext, job: Job) -> str:
        await ctx.step(reserve, ctx.run_id, compensate=release, retry=FAST)
        await ctx.step(charge, ctx.run_id, compensate=refund, retry=FAST)
        await ctx.wait_signal(Approve, timeout=float(job.n))
        return await ctx.step(ship, ctx.run_id, retry=FAST)


async def woke(run: str) -> None:
    _log({"run": run, "step": "woke"})


class Sleeper(accord.Workflow, type="sleeper", idle_timeout=1.0):
    """Idles out (1 s) while it sleeps: only its durable timer brings it back."""

    async def on_activate(self) -> None:
        _log({"run": str(self.id), "step": "activate"})
        await super().on_activate()

    async def run(self, ctx: accord.WorkflowContext, job: Job) -> float:
        await ctx.sleep(float(job.n))
        await ctx.step(woke, ctx.run_id)
        return await ctx.now()


class Approval(accord.Workflow, type="approval"):
    """Sleeps `Job.pause` seconds first (a signal sent meanwhile is kept), then waits."""

    async def run(self, ctx: accord.WorkflowContext, job: Job) -> str:
        if job.pause:
            await ctx.sleep(job.pause)
        ok = await ctx.wait_signal(Approve, timeout=float(job.n))
        return "timeout" if ok is None else f"approved by {ok.by}"


async def noop(x: int) -> int:
    return x


class Changing(accord.Workflow, type="changing"):
    async def run(self, ctx: accord.WorkflowContext, job: Job) -> int:
        await ctx.step(noop, job.n, name=os.environ.get("ACCORD_STEP_NAME", "first"))
        await ctx.wait_signal(Approve)
        return job.n


class Noop5(accord.Workflow, type="noop5"):
    """Five journaled exactly-once asks (bench/workflows.py): the client-side baseline is the same
    five asks sent one after the other."""

    async def run(self, ctx: accord.WorkflowContext, job: Job) -> int:
        total = 0
        for _ in range(5):
            total = await ctx.ask(f"wf_counter/b{job.n % 50}", Add(1))
        return total


class Local5(accord.Workflow, type="local5"):
    """Five journaled local no-op steps (bench/workflows.py: the journal's own rate)."""

    async def run(self, ctx: accord.WorkflowContext, job: Job) -> int:
        total = job.n
        for _ in range(5):
            total = await ctx.step(noop, total)
        return total


class StartPing(msgspec.Struct):
    delay: float


class Ping(msgspec.Struct):
    pass


class Pings(msgspec.Struct):
    count: int = 0


class Pinger(accord.Agent, type="pinger", idle_timeout=0.5):
    """Sets a reminder, idles out (deactivates) quickly; the reminder re-activates it."""

    state: Pings

    @accord.handler
    async def start(self, msg: StartPing) -> None:
        await self.remind("ping", Ping(), delay=msg.delay)

    @accord.handler
    async def ping(self, msg: Ping) -> None:
        self.state.count += 1

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.count


class Arm(msgspec.Struct):
    count: int
    spread: float
    """Seconds over which the `count` reminders fall due (evenly)."""
    start: float = 0.0
    """Wall-clock time of the first due time (0: now + 1 s)."""


class Ring(msgspec.Struct):
    due: float


class Lateness(msgspec.Struct):
    late: list[float] = msgspec.field(default_factory=list)


class Alarm(accord.Agent, type="alarm"):
    """Sets many one-shot reminders; records how late each one rang (bench/workflows.py)."""

    state: Lateness

    @accord.handler
    async def arm(self, msg: Arm) -> None:
        start = msg.start or time.time() + 1.0
        for k in range(msg.count):
            due = start + msg.spread * k / max(1, msg.count)
            await self.remind(f"a{k}", Ring(due), delay=max(0.0, due - time.time()))

    @accord.handler
    async def ring(self, msg: Ring) -> None:
        self.state.late.append(time.time() - msg.due)

    @accord.handler
    async def read(self, msg: Read) -> Lateness:
        return self.state


AGENTS = [
    WfCounter, Chain, Saga, Booking, Sleeper, Approval, Changing, Noop5, Local5, Pinger, Alarm,
]  # fmt: skip
