"""The inline turn: an in-process ask (`LocalRoute.ask`) to an idle activation runs the callee's
turn in the caller's task, up to its first suspension, instead of queueing it and waking the
callee's turn task (two task switches, ~8 µs of the ~25 µs an in-process ask cost).

Taken only when the activation is parked with nothing to do: no turn running (`busy`), nothing
queued, not closing, not cut off (orphan), no state (`durable`), no `turn_timeout`, and its
turn task waiting for work. The turn then marks the activation `busy`: every other sender
queues behind it as behind any turn, and the turn task does not run queued work until it ends
(`Activation._turns`), which wakes it if work came meanwhile. It is the same turn as the
queued one (`Activation._invoke`: the deadline, the observers, the stats, the trace span; the
fence check before the reply).

The turn runs as a task of its own from its first step on: its first step runs synchronously
with that task as `asyncio.current_task()` (so `asyncio.timeout` / `TaskGroup` entered there
bind to the turn, not the caller), in a copy of the caller's context. A turn that finishes in
that step (the common case: a handler that computes and returns, or whose own asks ran inline)
has answered the caller's future before the caller awaits it: no task switch at all. One that
suspends is handed to the task, which resumes it: from then on it is a turn of its own task,
so a caller that is cancelled or times out (its future's deadline slot) does not touch it, as
with a queued turn. The activation's turn task cancels it if it is cancelled itself (a lost
lease), as it would cancel its own turn.

On Python 3.12 and later the turn's task is an eager task (`eager_start`): its constructor runs
the first step, and schedules the task only if the turn suspends. Python 3.11 has no eager
tasks: there the task is created uninitialized (`Task.__new__`), made the current task for the
first step by hand (`asyncio.tasks._enter_task`/`_leave_task`), and initialized (scheduled)
only if the turn suspends, with the started coroutine wrapped (`_resume`).
Nested inline turns (a callee that asks an idle agent in turn) are capped at `MAX_DEPTH`, past
which the ask is queued: a long chain must not grow the C stack. And every `MAX_STREAK`-th
inline-eligible ask is queued instead: a queued ask suspends its caller, so a handler asking in
a tight loop still lets the event loop run (lease renewals, other agents) as it did before."""

from __future__ import annotations

import asyncio
import contextvars
import math
import sys
import types
from asyncio import tasks as _tasks
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from .._context import current_sender
from ._work import Work

if TYPE_CHECKING:
    from ._activation import Activation

MAX_DEPTH = 8
"""Inline turns nested in one first step (A's turn asks B inline, whose turn asks C, ...)."""

MAX_STREAK = 64
"""Inline turns in a row before one ask is queued (a task switch: the loop runs in between)."""

_depth = 0
_streak = 0
_enter_task = _tasks._enter_task
_leave_task = _tasks._leave_task
_current_task = _tasks.current_task
_Task = asyncio.Task


def idle(act: Activation, deadline: float = math.inf) -> bool:
    """`act` may run an in-process ask due by `deadline` inline now. Every `MAX_STREAK`-th ask
    that may is queued instead (False): its caller yields to the loop."""
    global _streak
    waiter = act._waiter
    if (
        act.busy
        or act.queue
        or waiter is None
        or waiter.done()
        or not act.inline_ok
        or act.closing
        or _depth >= MAX_DEPTH
        or not act._shard_valid(act.shard, act.epoch)
        or act.host.loop.time() >= deadline
    ):
        return False
    _streak += 1
    if _streak >= MAX_STREAK:
        _streak = 0
        return False
    return True


def _run_eager(act: Activation, work: Work) -> None:
    global _depth
    act.busy = True
    _depth += 1
    try:  # the constructor runs the first step, in a copy of the caller's context
        task = _Task(_turn(act, work), loop=act.host.loop, eager_start=True)  # type: ignore[call-arg]
    finally:
        _depth -= 1
    if task.done():
        task.result()  # finished in its first step (what it raised, the caller gets)
    else:
        act.inline_task = task


def _run_311(act: Activation, work: Work) -> None:
    global _depth
    loop = act.host.loop
    act.busy = True
    coro = _turn(act, work)
    ctx = contextvars.copy_context()
    task = _Task.__new__(_Task)  # the turn's task, initialized only if it suspends
    caller = _current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    _depth += 1
    try:
        yielded = ctx.run(coro.send, None)
    except StopIteration:
        return  # finished in its first step: the caller's future is answered
    finally:
        _depth -= 1
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    task.__init__(_resume(coro, yielded), loop=loop, context=ctx)  # type: ignore[misc]
    act.inline_task = task


#: `run(act, work)`: run `work` (an in-process ask with its reply) as `act`'s turn, inline (see
#: the module docstring). The caller checked `idle(act, deadline)` just before (no await in
#: between). Chosen once, by interpreter version.
run = _run_eager if sys.version_info >= (3, 12) else _run_311


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """The rest of a turn that suspended in its first step: hands what it awaits to the task
    running this, and what the task sends or throws back to it (`yield from` but for a
    coroutine already started)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return


async def _turn(act: Activation, work: Work) -> None:
    current_sender.set(act._name)  # in the turn's own context (a copy of the caller's)
    try:
        assert act.agent is not None and work.reply is not None
        result, error = await act._invoke(act.agent, work)
        if act._valid():
            work.reply(result, error)  # sets the caller's future: nothing to await
        else:
            act.host.stats.replies_withheld += 1
    finally:
        act.busy = False
        act.inline_task = None
        act.last_active = act.host.loop.time()
        waiter = act._waiter
        if (act.queue or act.closing) and waiter is not None and not waiter.done():
            waiter.set_result(None)  # the turn task runs what came meanwhile
