"""`Workflow`: a workflow type is an event-sourced `Agent` whose events are the run's journal.

The runtime hosts, places, fences and fails it over like any agent and needs nothing special:
the run's coroutine (`run`) is a task owned by the activation, outside the turn loop; what it
journals it sends to its own agent (`WorkflowRecord`), and signals, timer firings, cancel and
status queries are messages — so every change of the journal is one turn, in arrival order.
A run whose node died is re-activated by its watchdog (its run index entry, served by the timer
service every `wake_every` seconds while the run is not finished), and its activation replays
the journal and resumes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import typing
import uuid
from typing import Any, ClassVar

import msgspec

from .._agent import Agent, handler
from .._background import cancel_and_wait
from .._errors import AccordError, BadRequest, NonDeterminism, RemoteError, WorkflowNotFound
from ._context import CancelRun, WorkflowContext, _describe
from ._model import (
    JOURNAL_TYPES,
    TERMINAL,
    Journal,
    WaitSignal,
    WfBatch,
    WfCancelling,
    WfCompensation,
    WfEnded,
    WfRetried,
    WfSignal,
    WfSignalTaken,
    WfStarted,
    WfStep,
    WfStepFailed,
    WfTimerFired,
    WfTimerSet,
    WorkflowCancel,
    WorkflowQuery,
    WorkflowRecord,
    WorkflowReport,
    WorkflowRetry,
    WorkflowSignal,
    WorkflowStart,
    WorkflowStatus,
    WorkflowTimerFired,
    WorkflowWake,
)
from ._monitor import RunEntry, announce_end, event, index_with_commit, unindex
from ._timers import WAKE, cancel, schedule

log = logging.getLogger("accord.workflows")

RECORD_TIMEOUT = 30.0
_UNSET: Any = object()
TIMER_RETRY_FOR = 30.0


class _Stale(BaseException):
    """This activation can no longer journal (another owns the run, or it is ending): the run's
    coroutine stops without touching anything. A BaseException so that `run`'s own
    `except Exception` cannot swallow it."""


class Workflow(
    Agent,
    consistency="event_sourced",
    events=JOURNAL_TYPES,
    idle_timeout=60.0,
):
    """Base class of workflows: `class Chain(accord.Workflow, type="chain", version=1)` with
    `async def run(self, ctx: accord.WorkflowContext, input: MyInput) -> Result`.

    Start runs with `mesh.start_workflow(Chain, key, input)`; a node hosts the type like an
    agent (`Node(agents=[Chain])`). `version` (default 1) is recorded by each run; a run resumed
    by code of another version fails with `NonDeterminism` (see docs/workflows.md).
    """

    state: Journal
    __accord_workflow_version__: ClassVar[int] = 1
    __accord_create_first__: ClassVar[bool] = True  # most activations are of a new run
    wake_every: ClassVar[float] = 2.0
    """Seconds between the watchdog deliveries that re-activate a running run after a crash."""

    _token: str
    _task: asyncio.Task[None] | None
    _waiters: dict[int, asyncio.Future[None]]
    _signal_waits: dict[int, str]
    _signal_types: dict[str, type]
    _parked: int
    _armed: bool
    _ctx: WorkflowContext | None

    def __init_subclass__(cls, *, version: int = 1, **options: Any) -> None:
        cls.__accord_workflow_version__ = version
        super().__init_subclass__(**options)

    async def run(self, ctx: WorkflowContext, input: Any) -> Any:
        """The workflow: override. Only `ctx` calls may have effects or read time/randomness."""
        raise NotImplementedError(f"{type(self).__name__} must define run(ctx, input)")

    def apply(self, event: Any) -> None:
        self.state.apply(event)

    # -- activation -------------------------------------------------------------------------

    async def on_activate(self) -> None:
        self._token = uuid.uuid4().hex
        self._task = None
        self._waiters = {}
        self._signal_waits = {}
        self._signal_types = {}  # wire name -> type, of the signals this run's code waits for
        self._parked = 0
        self._armed = False  # is the run index entry's watchdog on (as this activation wrote)?
        self._ctx = None  # the context of the run's latest coroutine
        if self.state.started and self.state.ended is None:
            self._spawn()

    async def on_deactivate(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])

    def _spawn(self, after: asyncio.Task[None] | None = None) -> None:
        """Start the run's coroutine (unless it runs); with `after`, a new one once that
        (cancelled) one has stopped."""
        if after is not None or self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            # A fresh context: the run must not inherit the deadline of the turn that started it.
            self._task = loop.create_task(self._drive(after), name=f"accord-wf-{self.id}",
                                          context=contextvars.Context())  # fmt: skip

    def _waiter(self, n: int) -> asyncio.Future[None]:
        fut = self._waiters.get(n)
        if fut is None or fut.done():
            fut = self._waiters[n] = asyncio.get_running_loop().create_future()
        return fut

    def _wake(self, n: int) -> None:
        fut = self._waiters.pop(n, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _record(self, rec: WorkflowRecord) -> int:
        try:
            result = await self.mesh.ask(self.id, rec, timeout=RECORD_TIMEOUT)
        except AccordError as exc:
            raise _Stale(str(exc)) from None
        return typing.cast(int, result)

    async def _watchdog(self) -> None:
        """Arm the watchdog that re-activates this run after a crash (when the run resumes on
        an activation; a start arms it in its turn), in a turn of the run agent (so it cannot
        cross a park), retrying while the run index does not answer; after `TIMER_RETRY_FOR`
        seconds the run's coroutine stops (`_Stale`) — never fails the run."""
        deadline = time.monotonic() + TIMER_RETRY_FOR
        delay = 0.1
        while not self._armed:
            try:
                await self.mesh.ask(self.id, WorkflowRecord(self._token, arm=True),
                                    timeout=RECORD_TIMEOUT)  # fmt: skip
                return
            except AccordError as exc:
                unstored = isinstance(exc, RemoteError) and exc.remote_type == "NotConnected"
                if not unstored or time.monotonic() + delay > deadline:
                    raise _Stale(f"watchdog not stored: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _arm(self) -> None:
        """In a turn: store the run index entry with the watchdog on, with the turn's commit
        (which fails if it cannot be stored: the activation ends, its sender asks again)."""
        self._index(watch=self.wake_every)
        self._parked, self._armed = 0, True

    async def _schedule(
        self, name: str, msg: msgspec.Struct, due: float, every: float = 0.0
    ) -> None:
        """Store a timer of this run, retrying while the timer bucket does not answer; after
        `TIMER_RETRY_FOR` seconds the run's coroutine stops (`_Stale`) — never fails the run."""
        deadline = time.monotonic() + TIMER_RETRY_FOR
        delay = 0.1
        while True:
            try:
                await schedule(self.mesh, self.id, name, msg, due, every)
                return
            except AccordError as exc:
                if time.monotonic() + delay > deadline:
                    raise _Stale(f"timer {name} not stored: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- the run ----------------------------------------------------------------------------

    async def _drive(self, after: asyncio.Task[None] | None = None) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])
                # The stopped coroutine's last record may still be queued: let it land first.
                await self._record(WorkflowRecord(self._token))
            await self._drive_run()
        except _Stale as exc:
            log.info("%s: run stops here (%s); the owner of the run resumes it", self.id, exc)

    async def _drive_run(self) -> None:
        ctx = self._ctx = WorkflowContext(self)
        try:
            await self._watchdog()
            version = type(self).__accord_workflow_version__
            if self.state.version != version:
                raise NonDeterminism(
                    f"{self.id}: started by version {self.state.version} of the workflow, "
                    f"resumed by version {version}", step="0:version")  # fmt: skip
            try:
                result = await self.run(ctx, self._input(self.state.input))
            except NonDeterminism:
                raise
            except CancelRun:
                ok, undo_error = await ctx.compensate()
                error = "cancelled" if ok else f"cancelled; {undo_error}"
                await ctx._record(WfEnded("cancelled", error=error))
            except Exception as exc:
                error = str(exc) if isinstance(exc, AccordError) else _describe(exc)
                if ctx.undo:
                    ok, undo_error = await ctx.compensate()
                    state = "compensated" if ok else "failed"
                    error = error if ok else f"{error}; {undo_error}"
                else:
                    state = "failed"
                if self.state.cancelling:
                    state = "cancelled"
                await ctx._record(WfEnded(state, error=error))
            else:
                await ctx._record(WfEnded("completed", msgspec.msgpack.encode(result)))
        except NonDeterminism as exc:
            log.error("%s", exc)
            await ctx._record(WfEnded("failed", error=str(exc)))
        # Announced once the end is journaled (the record's turn committed): the waiting
        # `result()` takes the report from the announcement and need not ask again.
        await announce_end(self.mesh, str(self.id), msgspec.msgpack.encode(self._report()))

    def _input(self, data: bytes) -> Any:
        cls = type(self)
        typ = cls.__dict__.get("__accord_input_type__", _UNSET)
        if typ is _UNSET:  # resolved once per class: string annotations are compiled
            params = list(inspect.signature(cls.run).parameters.values())
            typ = Any
            if len(params) >= 3:
                try:
                    typ = typing.get_type_hints(cls.run).get(params[2].name, Any)
                except Exception:
                    typ = Any
            cls.__accord_input_type__ = typ  # type: ignore[attr-defined]
        try:
            return msgspec.msgpack.decode(data, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequest(f"input of {self.id} does not decode: {exc}") from None

    # -- messages ---------------------------------------------------------------------------

    @handler
    async def _on_start(self, msg: WorkflowStart) -> WorkflowReport:
        if not self.state.started:
            self._input(msg.input)  # refuse an input of the wrong type: nothing is started
            version = type(self).__accord_workflow_version__
            self.emit(WfStarted(msg.input, version, time.time()))
            await self._observe("started")  # the watchdog: the index entry, with the commit
            self._spawn()
        return self._report()

    @handler(read_only=True)
    async def _on_query(self, msg: WorkflowQuery) -> WorkflowReport:
        return self._report(msg.journal)

    @handler
    async def _on_record(self, msg: WorkflowRecord) -> int:
        if msg.token != getattr(self, "_token", None) or self.state.ended is not None:
            raise _Refused(f"{self.id}: record of another activation (or of an ended run)")
        if len(msg.entries) == 1:
            self.emit(msg.entries[0])
        elif msg.entries:
            self.emit(WfBatch(msg.entries))
        for entry in msg.entries:
            await self._observe_entry(entry)
        if msg.wait is not None:
            self._wait(msg.wait)
        if msg.arm and not self._armed:
            self._arm()
        if msg.park:
            j = self.state
            # (a park sent by a coroutine that a cancel then stopped must not turn the watchdog
            # off while the compensations run)
            if msg.park not in j.fired and msg.park not in j.taken and not j.cancelling:
                self._parked, self._armed = msg.park, False
                self._index(watch=0.0)  # the watchdog off (best effort: it only wakes)
        return 0

    def _unpark(self) -> None:
        """In the turn that wakes a parked run: the watchdog on again, before the turn answers
        (so a crash before that makes the timer or the signal be delivered again). If it cannot
        be stored the commit fails (the activation ends; the timer or signal is sent again)."""
        if self._parked:
            self._arm()

    def _wait(self, w: WaitSignal) -> None:
        j = self.state
        if w.n in j.taken:
            return
        used = set(j.taken.values())
        for i, sig in enumerate(j.signals):
            if sig.type == w.type and i not in used:
                self.emit(WfSignalTaken(w.n, i))
                return
        if w.due and w.n not in j.timers:
            self.emit(WfTimerSet(w.n, f"signal {w.type}", w.due))
        self._signal_waits[w.n] = w.type

    @handler
    async def _on_signal(self, msg: WorkflowSignal) -> WorkflowReport:
        j = self.state
        if not j.started:
            raise WorkflowNotFound(f"no workflow run {self.id}")
        if j.ended is None and not any(s.id == msg.id for s in j.signals):
            body = msg.body
            if msg.json:
                try:
                    body = msgspec.msgpack.encode(msgspec.json.decode(msg.body))
                except msgspec.DecodeError as exc:
                    raise BadRequest(f"signal body is not JSON: {exc}") from None
            typ = self._signal_types.get(msg.type)
            if typ is not None:  # a type the run waits for: refuse what would not decode
                try:
                    msgspec.msgpack.decode(body, type=typ)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise BadRequest(f"signal {msg.type} does not decode: {exc}") from None
            self.emit(WfSignal(msg.id, msg.type, body))
            index = len(j.signals) - 1
            for n in sorted(self._signal_waits):
                if self._signal_waits[n] == msg.type and n not in j.taken:
                    del self._signal_waits[n]
                    self.emit(WfSignalTaken(n, index))
                    self._unpark()
                    self._wake(n)
                    break
        return self._report()

    @handler
    async def _on_timer(self, msg: WorkflowTimerFired) -> None:
        j = self.state
        n = msg.n
        if j.ended is not None or n not in j.timers or n in j.fired:
            return
        self.emit(WfTimerFired(n))
        if j.timers[n].name.startswith("signal ") and n not in j.taken:
            self._signal_waits.pop(n, None)
            self.emit(WfSignalTaken(n, -1))
        self._unpark()
        self._wake(n)

    @handler
    async def _on_wake(self, msg: WorkflowWake) -> None:
        if self.state.started and self.state.ended is None:
            self._spawn()
            return
        with contextlib.suppress(AccordError):  # a watchdog key of an older version's run
            await cancel(self.mesh, self.id, WAKE)
        if self.state.started:  # ended, but the index entry that says so was not written
            self._index(watch=0.0)
        else:  # a start whose turn failed after arming: no run
            await unindex(self.mesh, str(self.id))

    @handler
    async def _on_cancel(self, msg: WorkflowCancel) -> WorkflowReport:
        j = self.state
        if not j.started:
            raise WorkflowNotFound(f"no workflow run {self.id}")
        if j.ended is None and not j.cancelling:
            undo = any(s.undo and n not in j.compensations for n, s in j.steps.items())
            task = self._task
            if task is not None:
                task.cancel()  # a step under way is interrupted
            if self._ctx is not None and self._ctx.pending:  # asks it completed: journal them
                done, self._ctx.pending = self._ctx.pending, []
                self.emit(done[0] if len(done) == 1 else WfBatch(done))
            if undo:
                # The compensations are known only to the run's code: a new coroutine replays
                # it; its first call that would do new work raises `CancelRun` (journaled here,
                # so a crash meanwhile goes on compensating), then it ends `cancelled`.
                self.emit(WfCancelling(time.time()))
                self._arm()  # compensating is running: a crash meanwhile resumes it
                self._spawn(after=task)
                await self._observe("cancelling", index_it=False)
            else:
                self._task = None
                self.emit(WfEnded("cancelled", error="cancelled"))
                await self._observe("cancelled", error="cancelled")
                await announce_end(self.mesh, str(self.id))
        return self._report()

    @handler
    async def _on_retry(self, msg: WorkflowRetry) -> WorkflowReport:
        """Go on from the failed step (`accord workflows retry`, after the cause was fixed)."""
        j = self.state
        if not j.started:
            raise WorkflowNotFound(f"no workflow run {self.id}")
        if j.ended is None or j.ended.state not in ("failed", "compensated"):
            state = "running" if j.ended is None else j.ended.state
            raise BadRequest(f"{self.id} is {state}: only a failed or compensated run is retried")
        self.emit(WfRetried(time.time()))
        await self._observe("retried")  # the watchdog on again, or raises
        self._spawn()
        return self._report()

    async def _observe_entry(self, entry: object) -> None:
        if isinstance(entry, WfStep):
            await self._observe("step_completed", step=f"{entry.n}:{entry.name}", index_it=False)
        elif isinstance(entry, WfStepFailed):
            name = "step_failed" if entry.final else "step_retried"
            await self._observe(name, step=f"{entry.n}:{entry.name}", attempt=entry.attempt,
                                error=entry.error, index_it=False)  # fmt: skip
        elif isinstance(entry, WfCompensation):
            name = "compensating" if entry.ok else "compensation_failed"
            await self._observe(name, step=f"{entry.n}:{entry.name}", attempt=entry.attempt,
                                error=entry.error, index_it=False)  # fmt: skip
        elif isinstance(entry, WfEnded):
            await self._observe(entry.state, error=entry.error)

    async def _observe(self, name: str, *, step: str = "", attempt: int = 0, error: str = "",
                       index_it: bool = True) -> None:  # fmt: skip
        """Tell the operators: a lifecycle event, and (for a change of state) the run index."""
        await event(self.mesh, str(self.id), name, step=step, attempt=attempt, error=error)
        if index_it:
            j = self.state
            running = j.started and j.ended is None and not self._parked
            self._index(watch=self.wake_every if running else 0.0)
            self._armed = running

    def _index(self, watch: float) -> None:
        """Write the run index entry with this turn's commit (`index_with_commit`); with
        `watch` > 0 (the watchdog on) it must be stored, else a failure is only logged."""
        st = self._report().status
        index_with_commit(self, RunEntry(
            id=st.id, type=st.type, state=st.state, steps_done=st.steps_done,
            attempts=st.attempts, error=st.error, started=self.state.started_at,
            updated=time.time(), watch=watch,
        ))  # fmt: skip

    def _report(self, journal: bool = False) -> WorkflowReport:
        j = self.state
        if j.ended is not None:
            state, error, result = j.ended.state, j.ended.error, j.ended.result
        else:
            state = "waiting" if self._signal_waits or self._waiters else "running"
            last = max(j.failures.values(), key=lambda f: f.n, default=None)
            error, result = (last.error if last is not None else ""), b""
        status = WorkflowStatus(
            id=str(self.id), state=state if j.started else "unknown", steps_done=len(j.steps),
            attempts=j.attempts, error=error, version=j.version, type=self.id.type,
        )  # fmt: skip
        assert not j.started or state in TERMINAL or state in ("running", "waiting")
        return WorkflowReport(status, j.started, result, j if journal else None)


class _Refused(AccordError):
    code = "refused"
