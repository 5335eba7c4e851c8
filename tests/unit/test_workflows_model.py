"""Workflow journal semantics without a server: retry pacing, replay of completed steps (not run
again), NonDeterminism naming the step, saga order, and what a retry of a failed run redoes."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest

import accord
from accord._ids import AgentId
from accord.workflows._context import StepFailed
from accord.workflows._model import (
    Journal,
    WfCompensation,
    WfEnded,
    WfRetried,
    WfStarted,
    WfStep,
    WfStepFailed,
    WorkflowRecord,
)


class FakeRun:
    """The run agent as a `WorkflowContext` sees it: its journal and its `_record`."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.id = AgentId("w", "k")
        self.state = journal or Journal()
        self._token = "t"
        self.records: list[Any] = []

    async def _record(self, rec: WorkflowRecord) -> int:
        if rec.entry is not None:
            self.records.append(rec.entry)
            self.state.apply(rec.entry)
        return 0


def test_retry_delays_grow_by_the_factor_capped_with_jitter() -> None:
    policy = accord.Retry(attempts=10, initial=1.0, factor=3.0, max_interval=20.0)
    rng = random.Random(7)
    for retry, base in [(1, 1.0), (2, 3.0), (3, 9.0), (4, 20.0), (8, 20.0)]:
        for _ in range(50):
            assert 0.5 * base <= policy.delay(retry, rng) < 1.5 * base
    with pytest.raises(ValueError):
        accord.Retry(attempts=0)


def test_a_completed_step_returns_its_journaled_result_without_running() -> None:
    journal = Journal()
    journal.apply(WfStarted(b"", 1, 0.0))
    journal.apply(WfStep(1, "double", "step", msgspec.msgpack.encode(42)))
    run = FakeRun(journal)
    ctx = accord.WorkflowContext(run)  # type: ignore[arg-type]
    calls: list[int] = []

    async def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    async def main() -> tuple[int, int]:
        first = await ctx.step(double, 21, name="double")  # replayed
        second = await ctx.step(double, 5, name="double")  # new: runs and is journaled
        return first, second

    assert asyncio.run(main()) == (42, 10)
    assert calls == [5]
    assert [type(e) for e in run.records] == [WfStep]


def test_a_different_step_than_the_journal_holds_is_non_determinism_naming_it() -> None:
    journal = Journal()
    journal.apply(WfStep(1, "reserve", "step", msgspec.msgpack.encode("h")))
    ctx = accord.WorkflowContext(FakeRun(journal))  # type: ignore[arg-type]

    async def charge() -> int:
        return 1

    with pytest.raises(accord.NonDeterminism) as err:
        asyncio.run(ctx.step(charge, name="charge"))
    assert err.value.step == "1:charge"
    assert "'reserve'" in str(err.value) and "'charge'" in str(err.value)


def test_failed_attempts_are_journaled_and_the_last_raises_step_failed() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)  # type: ignore[arg-type]

    async def boom() -> None:
        raise RuntimeError("down")

    fast = accord.Retry(attempts=3, initial=0.001, factor=1.0, max_interval=0.001)
    with pytest.raises(StepFailed, match="after 3 attempts"):
        asyncio.run(ctx.step(boom, retry=fast))
    assert [(e.attempt, e.final) for e in run.records] == [(1, False), (2, False), (3, True)]
    assert run.state.attempts == 3


def test_compensations_run_newest_first_and_are_journaled() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)  # type: ignore[arg-type]
    undone: list[str] = []

    async def do(name: str) -> str:
        return name

    async def undo(name: str) -> None:
        undone.append(name)

    async def main() -> tuple[bool, str]:
        await ctx.step(do, "a", compensate=undo)
        await ctx.step(do, "b")  # nothing to undo
        await ctx.step(do, "c", compensate=undo)
        return await ctx.compensate()

    assert asyncio.run(main()) == (True, "")
    assert undone == ["c", "a"]
    assert [(e.n, e.ok) for e in run.records if isinstance(e, WfCompensation)] == [
        (3, True),
        (1, True),
    ]


def test_retry_of_a_compensated_run_redoes_the_undone_steps_only() -> None:
    j = Journal()
    for ev in [
        WfStarted(b"", 1, 0.0),
        WfStep(1, "reserve", "step", b"\xc0"),
        WfStep(2, "log", "step", b"\xc0"),
        WfStepFailed(3, "ship", 3, "boom", True),
        WfCompensation(1, "reserve", 1, True),
        WfEnded("compensated", error="boom"),
        WfRetried(1.0),
    ]:
        j.apply(ev)
    assert j.ended is None and j.retries == 1
    assert sorted(j.steps) == [2]  # step 1 was undone: done again; step 2 had no undo
    assert not j.failures[3].final and j.failures[3].attempt == 0
    assert j.compensations == {}
