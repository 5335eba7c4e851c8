"""Workflow journal semantics without a server: retry pacing, replay of completed steps (not run
again), NonDeterminism naming the step, saga order, what a retry of a failed run redoes, ask steps
journaled together in one append (folding as if one by one), and a cancel that compensates."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest

import accord
from accord._ids import AgentId
from accord.cluster._config import ClusterConfig, Names
from accord.engine.memory import MemoryEngine
from accord.workflows._client import WorkflowHandle
from accord.workflows._context import MAX_PENDING, CancelRun, StepFailed
from accord.workflows._model import (
    Journal,
    WfBatch,
    WfCancelling,
    WfCompensation,
    WfEnded,
    WfRetried,
    WfStarted,
    WfStep,
    WfStepFailed,
    WorkflowRecord,
    WorkflowReport,
    WorkflowStatus,
)
from accord.workflows._monitor import RunEntry, announce_end, done_subject, index


class FakeMesh:
    """Answers every ask with the number of asks so far (an exactly-once agent's reply)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def ask(self, target: str, msg: Any, **kw: Any) -> int:
        self.ids.append(kw["msg_id"])
        return len(self.ids)

    def _ask_here_once(self, target: str, msg: Any, msg_id: str, timeout: Any) -> None:
        return None  # no agent is served in this process: every ask takes `ask`


class FakeRun:
    """The run agent as a `WorkflowContext` sees it: its journal and its `_record`."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.id = AgentId("w", "k")
        self.state = journal or Journal()
        self._token = "t"
        self.mesh = FakeMesh()
        self.records: list[Any] = []
        self.appends: list[int] = []  # entries per record turn (one append each)

    async def _record(self, rec: WorkflowRecord) -> int:
        if rec.entries:
            self.appends.append(len(rec.entries))
        for entry in rec.entries:
            self.records.append(entry)
            self.state.apply(entry)
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
    ctx = accord.WorkflowContext(run)
    calls: list[int] = []

    async def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    async def main() -> tuple[int, int]:
        first = await ctx.step(double, 21, name="double")  # replayed
        second = await ctx.step(double, 5, name="double")  # new: runs and is journaled
        assert run.records == []  # with the run's next call (no compensation to undo)
        await ctx.flush()
        return first, second

    assert asyncio.run(main()) == (42, 10)
    assert calls == [5]
    assert [type(e) for e in run.records] == [WfStep]


def test_a_different_step_than_the_journal_holds_is_non_determinism_naming_it() -> None:
    journal = Journal()
    journal.apply(WfStep(1, "reserve", "step", msgspec.msgpack.encode("h")))
    ctx = accord.WorkflowContext(FakeRun(journal))

    async def charge() -> int:
        return 1

    with pytest.raises(accord.NonDeterminism) as err:
        asyncio.run(ctx.step(charge, name="charge"))
    assert err.value.step == "1:charge"
    assert "'reserve'" in str(err.value) and "'charge'" in str(err.value)


def test_failed_attempts_are_journaled_and_the_last_raises_step_failed() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)

    async def boom() -> None:
        raise RuntimeError("down")

    fast = accord.Retry(attempts=3, initial=0.001, factor=1.0, max_interval=0.001)
    with pytest.raises(StepFailed, match="after 3 attempts"):
        asyncio.run(ctx.step(boom, retry=fast))
    assert [(e.attempt, e.final) for e in run.records] == [(1, False), (2, False), (3, True)]
    assert run.state.attempts == 3


def test_compensations_run_newest_first_and_are_journaled() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)
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


class Ping(msgspec.Struct):
    pass


class Recorder(accord.Agent, type="wfm_recorder", delivery="exactly_once"):
    """A type that records its replies under exactly-once ids (asks to it can wait)."""

    @accord.handler
    async def ping(self, msg: Ping) -> int:
        return 0


class Worker(accord.Agent, type="wfm_pool", stateless=True):
    """A worker pool: asked again, it runs again (asks to it are journaled at once)."""

    @accord.handler
    async def ping(self, msg: Ping) -> int:
        return 0


def test_consecutive_asks_are_journaled_in_one_append_with_the_next_entry() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)

    async def noop() -> None:
        return None

    async def main() -> list[int]:
        got = [await ctx.ask("wfm_recorder/1", Ping()) for _ in range(3)]
        assert run.appends == []  # not journaled yet: the agent holds the replies
        await ctx.step(noop)  # a local step: what came before is journaled first
        got.append(await ctx.ask("wfm_recorder/1", Ping()))
        await ctx._record(WfEnded("completed"))
        return got

    assert asyncio.run(main()) == [1, 2, 3, 4]
    assert run.appends == [3, 1, 2]  # asks 1-3; step 4; ask 5 with the end
    assert run.mesh.ids == ["w/k#1", "w/k#2", "w/k#3", "w/k#5"]  # exactly-once ids by step
    assert sorted(run.state.steps) == [1, 2, 3, 4, 5]


def test_pending_asks_are_bounded_by_max_pending() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)

    async def main() -> None:
        for _ in range(2 * MAX_PENDING + 1):
            await ctx.ask("wfm_recorder/1", Ping())

    asyncio.run(main())
    assert run.appends == [MAX_PENDING, MAX_PENDING] and len(ctx.pending) == 1


def test_asks_to_a_pool_or_an_unknown_type_are_journaled_at_once() -> None:
    run = FakeRun()
    ctx = accord.WorkflowContext(run)

    async def main() -> None:
        await ctx.ask("wfm_recorder/1", Ping())  # waits
        await ctx.ask("wfm_pool/any", Ping())  # journaled now, with the one before
        await ctx.ask("unknown_type/1", Ping())

    asyncio.run(main())
    assert run.appends == [2, 1] and ctx.pending == []


def test_a_batch_folds_like_its_entries_one_by_one() -> None:
    entries: list[Any] = [
        WfStarted(b"", 1, 0.0),
        WfStep(1, "ask a", "ask", b"\x01"),
        WfStep(2, "ask b", "ask", b"\x02"),
        WfEnded("completed", b"\x02"),
    ]
    flat, batched = Journal(), Journal()
    for e in entries:
        flat.apply(e)
    batched.apply(entries[0])
    wire = msgspec.msgpack.encode(WfBatch(entries[1:]))  # as stored: one stream message
    batched.apply(msgspec.msgpack.decode(wire, type=WfBatch))
    assert batched == flat
    assert [type(e) for e in batched.entries] == [WfStarted, WfStep, WfStep, WfEnded]


def test_a_cancel_replays_the_completed_steps_then_stops_at_the_first_new_call() -> None:
    j = Journal()
    for ev in [
        WfStarted(b"", 1, 0.0),
        WfStep(1, "do", "step", msgspec.msgpack.encode("a"), undo=True),
        WfStep(2, "do", "step", msgspec.msgpack.encode("b"), undo=True),
        WfCancelling(1.0),
    ]:
        j.apply(ev)
    run = FakeRun(j)
    ctx = accord.WorkflowContext(run)
    ran: list[str] = []
    undone: list[str] = []

    async def do(name: str) -> str:
        ran.append(name)
        return name

    async def undo(name: str) -> None:
        undone.append(name)

    async def workflow() -> None:
        await ctx.step(do, "a", name="do", compensate=undo)
        await ctx.step(do, "b", name="do", compensate=undo)
        await ctx.step(do, "c", name="do", compensate=undo)  # not run: cancelled

    async def main() -> tuple[bool, str]:
        with pytest.raises(CancelRun):
            await workflow()
        return await ctx.compensate()

    assert asyncio.run(main()) == (True, "")
    assert ran == [] and undone == ["b", "a"]
    assert [(e.n, e.ok) for e in run.records if isinstance(e, WfCompensation)] == [
        (2, True),
        (1, True),
    ]


class IndexedMesh:
    """A client over the in-memory engine: the run index and the end announcements are real;
    asks of the run are counted and answered "completed, 7"."""

    def __init__(self) -> None:
        self._transport = MemoryEngine()
        self.names = Names("wfunit")
        self.config = ClusterConfig()
        self.asked: list[str] = []

    @property
    def name(self) -> str:
        return "client"

    async def ask(self, target: str, msg: Any, **kw: Any) -> WorkflowReport:
        self.asked.append(str(target))
        return _completed(str(target))


def _completed(run_id: str) -> WorkflowReport:
    st = WorkflowStatus(id=run_id, state="completed", steps_done=5, type="w")
    return WorkflowReport(st, True, msgspec.msgpack.encode(7))


def test_result_of_a_run_the_index_shows_under_way_waits_for_its_end_without_asking_it() -> None:
    async def main() -> None:
        mesh = IndexedMesh()
        await index(mesh, RunEntry(id="w/k", type="w", state="running", watch=2.0), required=True)
        waiting = asyncio.create_task(WorkflowHandle(mesh, "w/k").result(timeout=30))
        subject = done_subject(mesh, "w/k")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not waiting.done() and not any(
            sub.subject == subject for sub in mesh._transport.server.subs
        ):
            assert loop.time() < deadline, "result() never subscribed to the end announcement"
            await asyncio.sleep(0.01)
        await announce_end(mesh, "w/k", msgspec.msgpack.encode(_completed("w/k")))
        assert await waiting == 7
        assert mesh.asked == []  # the index said running: the announcement alone answered
        # No index entry (or an ended run): the run is asked.
        assert await WorkflowHandle(mesh, "w/other").result(timeout=30) == 7
        assert mesh.asked == ["w/other"]

    asyncio.run(main())
