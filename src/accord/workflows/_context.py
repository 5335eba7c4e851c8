"""`WorkflowContext`: what a run's code calls, each call a numbered, journaled step.

On replay (a re-activated run) every call finds its number in the journal: a completed step
returns its recorded result without running, a step of another name raises `NonDeterminism`.
Writes go to the run's own agent (`WorkflowRecord`), which appends them in one turn before
answering, so the run never gets ahead of its journal — except the results of `ctx.ask` steps,
which wait (at most `MAX_PENDING`) to be journaled in one append with the next entry: the agent
asked records its reply under the step's message id, so asking again after a crash returns it;
and a local step without compensation, journaled with the next call before that call acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import typing
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from .._codec import message_type_name
from .._errors import (
    AccordError,
    AgentTypeNotFound,
    BadRequest,
    NonDeterminism,
    RemoteError,
    UnknownMessageType,
)
from .._ids import AgentId
from .._spec import known_spec
from ._model import (
    Entry,
    Journal,
    Retry,
    WaitSignal,
    WfCompensation,
    WfStep,
    WfStepFailed,
    WfTimerSet,
    WorkflowRecord,
    WorkflowTimerFired,
)

T = TypeVar("T")
M = TypeVar("M", bound=msgspec.Struct)
_enc = msgspec.msgpack.Encoder()
ASK_RETRY_CAP = 5.0
MAX_PENDING = 16
"""At most this many completed `ctx.ask` steps wait to be journaled together: bounds how many
message ids an agent's dedup window must still hold when a run is replayed after a crash."""


class CancelRun(BaseException):
    """Raised into `run` at its first call that would do new work once a cancel is under way
    (a BaseException: `run`'s own `except Exception` must not swallow it)."""


class StepFailed(AccordError):
    """A step exhausted its retries (raised into `run`, which may catch it)."""

    code = "step_failed"

    def __init__(self, message: str, *, step: str, error: str) -> None:
        super().__init__(message)
        self.step = step
        self.error = error


class WorkflowContext:
    """The handle a workflow's `run` gets: journaled steps, agent calls, durable time and
    randomness, durable sleeps and signals. One per run activation; not shared between runs."""

    def __init__(self, wf: Any) -> None:  # the run's `Workflow` agent (it imports this module)
        self._wf = wf
        self._n = 0
        self._rng = random.Random()
        #: Completed ask steps not journaled yet (they go with the next record, in one append).
        self.pending: list[Entry] = []
        #: Completed steps with a compensation, in order: (n, name, fn, args, retry).
        self.undo: list[tuple[int, str, Callable[..., Awaitable[Any]], tuple[Any, ...], Retry]] = []

    @property
    def _j(self) -> Journal:
        # Read through the agent each time: a failed turn's rollback replaces its state object.
        journal: Journal = self._wf.state
        return journal

    @property
    def run_id(self) -> str:
        """The run's id, `"<type>/<key>"`."""
        return str(self._wf.id)

    # -- steps ------------------------------------------------------------------------------

    async def step(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        name: str | None = None,
        retry: Retry | None = None,
        compensate: Callable[..., Awaitable[Any]] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run `fn(*args)` as step: once it completed its result is journaled and a replay
        returns that without running it; a step under way when its node died runs again
        (at-least-once). A raising (or, with `timeout`, too slow) attempt is journaled and retried
        per `retry` (default `Retry()`); after the last, `StepFailed` is raised into `run`.
        `compensate(*args)` is run, if the run later fails, to undo this completed step."""
        step_name: str = name or getattr(fn, "__qualname__", None) or repr(fn)
        policy = retry or Retry()
        n, done = self._replayed("step", step_name)
        if done is not None:
            if compensate is not None:
                self.undo.append((n, step_name, compensate, args, policy))
            return typing.cast(T, _decode(done.result, _returns(fn)))
        failed = self._j.failures.get(n)
        if failed is not None and failed.final:
            raise StepFailed(f"step {n} ({step_name}) failed: {failed.error}",
                             step=f"{n}:{step_name}", error=failed.error)  # fmt: skip
        attempt = failed.attempt if failed is not None else 0
        self._go_on()
        await self.flush()  # a local step's effect may not be repeatable: journal what came before
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(timeout):
                    result = await fn(*args)
            except Exception as exc:
                error = _describe(exc)
                final = attempt >= policy.attempts
                await self._record(WfStepFailed(n, step_name, attempt, error, final, time.time()))
                if final:
                    msg = f"step {n} ({step_name}) failed after {attempt} attempts: {error}"
                    raise StepFailed(msg, step=f"{n}:{step_name}", error=error) from None
                await asyncio.sleep(policy.delay(attempt, self._rng))
                continue
            done = WfStep(
                n, step_name, "step", _enc.encode(result), time.time(), compensate is not None
            )
            if compensate is not None:
                await self._record(done)  # a cancel must see it to undo it
                self.undo.append((n, step_name, compensate, args, policy))
            else:
                # Journaled with the run's next call, before that call does anything (or with
                # the end): until then the run only computes, so a crash re-runs the step just
                # as a crash before its own append would.
                self.pending.append(done)
            return result

    async def ask(self, agent_id: AgentId | str, msg: msgspec.Struct,
                  timeout: float | None = None) -> Any:  # fmt: skip
        """Ask `agent_id` as a journaled step, `exactly_once`, with the message id
        `"<run id>#<step>"`: an exactly-once agent applies it once even when the run's node dies
        mid-step and the step is asked again (the agent then returns its recorded reply). Sends
        that did not get an answer are retried with the same id; the handler raising
        (`RemoteError`) or an unknown type or message fails the step (no retry: the outcome is
        recorded). Returns the handler's reply. When the target's type is known here to record
        replies (durable, not a pool), the step's result is journaled with the run's next entry
        (in one append), not on its own: a replay after a crash asks again under the same id and
        gets the recorded reply, as long as the agent's dedup window holds it."""
        target = str(agent_id)
        wire = message_type_name(type(msg))
        step_name = f"ask {target} {wire}"
        n, done = self._replayed("ask", step_name)
        if done is not None:
            return _decode(done.result, _reply_type(target, wire))
        retries = self._j.retries  # a retried run asks again under new ids: undone asks redo
        msg_id = f"{self.run_id}#{n}" + (f".{retries}" if retries else "")
        self._go_on()
        if any(e.kind != "ask" for e in self.pending if isinstance(e, WfStep)):
            await self.flush()  # a local step's result is journaled before the next effect
        dedups = _dedups(target)
        mesh = self._wf.mesh
        attempt = 0
        while True:
            attempt += 1
            try:
                # A target served in this process gets it without the mailbox: this loop asks
                # again with the same id until answered, and a replay does too (below).
                here = mesh._ask_here_once(target, msg, msg_id, timeout) if dedups else None
                if here is not None:
                    result = await here
                else:
                    result = await mesh.ask(target, msg, delivery="exactly_once", msg_id=msg_id,
                                            timeout=timeout)  # fmt: skip
                break
            except (RemoteError, AgentTypeNotFound, UnknownMessageType) as exc:
                error = _describe(exc)
                await self._record(WfStepFailed(n, step_name, attempt, error, True, time.time()))
                raise StepFailed(f"step {n} ({step_name}) failed: {error}",
                                 step=f"{n}:{step_name}", error=error) from None  # fmt: skip
            except AccordError:  # not answered (timeout, no owner yet, outcome unknown): again
                await self.flush()  # the asks before this one must not age in the dedup window
                await asyncio.sleep(min(ASK_RETRY_CAP, 0.2 * 2 ** min(attempt, 5)))
        done = WfStep(n, step_name, "ask", _enc.encode(result), time.time())
        if dedups:
            self.pending.append(done)
            if len(self.pending) >= MAX_PENDING:
                await self.flush()
        else:  # a pool, or a type not known here: asking again would run it again
            await self._record(done)
        return result

    async def _value(self, kind: str, make: Callable[[], T]) -> T:
        n, done = self._replayed(kind, kind)
        if done is not None:
            return typing.cast(T, msgspec.msgpack.decode(done.result))
        self._go_on()
        value = make()
        await self._record(WfStep(n, kind, kind, _enc.encode(value), time.time()))
        return value

    async def now(self) -> float:
        """The wall-clock time (Unix seconds), journaled: a replay sees the same value."""
        return await self._value("now", time.time)

    async def random(self) -> float:
        """A random float in [0, 1), journaled."""
        return await self._value("random", self._rng.random)

    async def uuid(self) -> str:
        """A random UUID (hex string), journaled."""
        return await self._value("uuid", lambda: uuidlib.uuid4().hex)

    # -- durable waits ----------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the due time is journaled and kept in the timer index, so the sleep
        ends on time (or as soon as a node serves the run again) after deactivation, node death
        or a full restart."""
        n, _ = self._replayed("sleep", "sleep", journal_kind=False)
        timer = self._j.timers.get(n)
        if timer is not None and timer.name != "sleep":
            self._diverged(n, timer.name, "sleep")
        if n in self._j.fired:
            return
        self._go_on()
        fut = self._wf._waiter(n)
        if timer is None:
            timer = WfTimerSet(n, "sleep", time.time() + max(0.0, seconds))
            await self._record(timer)
        if n not in self._j.fired:
            await self._wf._schedule(f"wf-{n}", WorkflowTimerFired(n), timer.due)
            await self._parked(n, fut)

    async def wait_signal(self, msg_type: type[M], timeout: float | None = None) -> M | None:
        """Wait for a signal of `msg_type` (sent with `handle.signal`), or None after `timeout`
        seconds (a durable timer; None: no timeout). Signals are journaled as they arrive and
        taken in arrival order, so one sent before the run waits for it is kept, not lost."""
        wire = message_type_name(msg_type)
        self._wf._signal_types[wire] = msg_type
        name = f"signal {wire}"
        n, _ = self._replayed("signal", name, journal_kind=False)
        timer = self._j.timers.get(n)
        if timer is not None and timer.name != name:
            self._diverged(n, timer.name, name)
        if n not in self._j.taken:
            self._go_on()
            fut = self._wf._waiter(n)
            due = 0.0 if timeout is None else time.time() + max(0.0, timeout)
            await self._record(None, WaitSignal(n, wire, due))
            if n not in self._j.taken:
                timer = self._j.timers.get(n)
                if timer is not None:
                    await self._wf._schedule(f"wf-{n}", WorkflowTimerFired(n), timer.due)
                await self._parked(n, fut)
        index = self._j.taken[n]
        if index < 0:
            return None
        signal = self._j.signals[index]
        try:
            return msgspec.msgpack.decode(signal.body, type=msg_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # sent before the run waited for its type (so not checked on arrival): fails the run
            raise BadRequest(f"signal {signal.id} does not decode as {wire}: {exc}") from None

    # -- the saga ---------------------------------------------------------------------------

    async def compensate(self) -> tuple[bool, str]:
        """Run the compensations of the completed steps, newest first, each retried per its
        step's policy and journaled. Returns (all completed, the first error)."""
        all_ok, first_error = True, ""
        for n, name, fn, args, policy in reversed(self.undo):
            done = self._j.compensations.get(n)
            if done is not None:
                all_ok = all_ok and done.ok
                first_error = first_error or done.error
                continue
            attempt = 0
            while True:
                attempt += 1
                try:
                    await fn(*args)
                except Exception as exc:
                    error = _describe(exc)
                    final = attempt >= policy.attempts
                    await self._record(WfCompensation(n, name, attempt, False, error, final))
                    if not final:
                        await asyncio.sleep(policy.delay(attempt, self._rng))
                        continue
                    all_ok, first_error = False, first_error or f"undo of step {n}: {error}"
                    break
                await self._record(WfCompensation(n, name, attempt, True))
                break
        return all_ok, first_error

    # -- journal ----------------------------------------------------------------------------

    def _replayed(
        self, kind: str, name: str, journal_kind: bool = True
    ) -> tuple[int, WfStep | None]:
        """The next step number, and its journal record if it completed before."""
        self._n += 1
        n = self._n
        done = self._j.steps.get(n)
        recorded = done.name if done is not None else None
        if recorded is None and n in self._j.failures:
            recorded = self._j.failures[n].name
        if recorded is None and n in self._j.timers:
            recorded = self._j.timers[n].name
        if recorded is not None and recorded != name:
            self._diverged(n, recorded, name)
        return n, done if journal_kind else None

    def _diverged(self, n: int, recorded: str, asked: str) -> typing.NoReturn:
        raise NonDeterminism(
            f"{self.run_id}: step {n} is {recorded!r} in the journal but the code now asks for "
            f"{asked!r} (the workflow changed under a running run)",
            step=f"{n}:{asked}",
        )

    def _go_on(self) -> None:
        if self._j.cancelling:
            raise CancelRun()

    async def flush(self) -> None:
        """Journal the completed ask steps that wait for the next record."""
        if self.pending:
            await self._record(None)

    async def _record(
        self, entry: Entry | None, wait: WaitSignal | None = None, park: int = 0
    ) -> None:
        """Journal `entry` (after the ask steps pending, in one append) and/or the wait/park."""
        entries, self.pending = self.pending, []  # handed over now: a cancel takes only the rest
        if entry is not None:
            entries.append(entry)
        await self._wf._record(WorkflowRecord(self._wf._token, entries, wait, park))

    async def _parked(self, n: int, fut: asyncio.Future[None]) -> None:
        """Wait for step `n`'s timer or signal (its timer is stored already). Meanwhile the
        watchdog is off — the timer or the signal re-activates the run, so a long wait lets its
        activation idle out. Both switches happen in turns of the run agent (`park` here, the
        waking turn after), so they cannot cross, and a crash between them leaves a timer or a
        signal sender that will deliver again."""
        await self._record(None, park=n)
        await fut
        await self._sync()

    async def _sync(self) -> None:
        """Wait until the turn that woke this run has committed its journal entries."""
        await self._record(None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: step timed out"
    if isinstance(exc, RemoteError):
        return f"{exc.remote_type}: {exc.remote_message}"
    return f"{type(exc).__name__}: {exc}"


_hints: dict[Any, Any] = {}


def _returns(fn: Callable[..., Any]) -> Any:
    """`fn`'s return annotation (cached: resolving string annotations compiles them)."""
    try:
        return _hints[fn]
    except (KeyError, TypeError):
        pass
    try:
        typ = typing.get_type_hints(fn).get("return", Any)
    except Exception:
        typ = Any
    with contextlib.suppress(TypeError):  # an unhashable callable: not cached
        _hints[fn] = typ
    return typ


def _dedups(target: str) -> bool:
    """Does `target` record its reply under an exactly-once message id (so that asking it again
    after a crash returns the same reply)? Only a type known in this process, with durable
    state and not a worker pool, is known to."""
    spec = known_spec(AgentId.parse(target).type)
    return spec is not None and spec.durable and not spec.stateless


def _reply_type(target: str, wire: str) -> Any:
    spec = known_spec(AgentId.parse(target).type)
    handler = spec.handlers.get(wire) if spec is not None else None
    return handler.returns if handler is not None else Any


def _decode(data: bytes, typ: Any) -> Any:
    if typ is None or typ is type(None):
        return None
    try:
        return msgspec.msgpack.decode(data, type=typ)
    except (msgspec.ValidationError, TypeError):
        return msgspec.msgpack.decode(data)
