"""One activation of one virtual agent: a mailbox and a task that runs one turn at a time.

An activation belongs to a shard epoch. Before each turn, and again before replying, it checks that
its node still validly holds that epoch; once not, it stops without running or answering anything.
Durable agents load their state before the first turn and persist it per turn (`state/_durable`);
mailbox deliveries are retried in place (keeping per-agent order), acknowledged only after the
turn and its state write, and dead-lettered after `max_deliver` attempts. A turn that runs past
its type's `turn_timeout` is answered `TurnTimeout` and its activation is abandoned: the table
puts a fresh one in its place, which takes over the queue without waiting for the stuck handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .. import _trace
from .._agent import Agent
from .._context import current_deadline, current_sender
from .._errors import (
    AccordError,
    Degraded,
    DeliveryTimeout,
    Fenced,
    RemoteError,
    StateError,
    StorageFull,
    TurnTimeout,
)
from .._ids import AgentId
from .._observe import Kind, Outcome, kind_of
from .._spec import AgentSpec, HandlerSpec
from ..delivery._mailbox import DurableDelivery, backoff_delay
from ..state._durable import Durable
from ..state._store import DedupEntry, MergeState, StateDeleted
from ._host import Host
from ._work import Work, _as_remote, _dedup_entry, _not_run, _Pending, _Recorded

log = logging.getLogger("accord.activation")

STORAGE_FULL_RETRY = 2.0
"""Seconds before a message whose state write found the store full is delivered again."""


class Activation:
    """One virtual agent's activation, hosted by a `Host` (the node)."""

    def __init__(
        self,
        host: Host,
        agent_id: AgentId,
        spec: AgentSpec,
        shard: int,
        epoch: int,
        previous: asyncio.Task[None] | None,
    ) -> None:
        self.host = host
        self.id = agent_id
        self._name = str(agent_id)
        self.spec = spec
        self.shard = shard
        self.epoch = epoch
        self.queue: deque[Work] = deque()
        self.last_active = host.loop.time()
        self.closing = False  # drain what is queued, then deactivate
        self.busy = False
        self.durable: Durable | None = None
        self._streak = 0
        self.orphan = False  # serving while cut off from the majority (split brain / degraded)
        # Set when an orphan's shard has an owner again: gets what this activation changed,
        # computed once its last turn is done (a turn in flight at the heal is included).
        self.merge_to: Callable[[MergeState], None] | None = None
        self.agent: Agent | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._previous = previous
        self._shard_valid = host.valid
        self._bulkhead = host.bulkhead
        self.load = host.bulkhead.load(spec.type_name)
        self._total = host.bulkhead.total
        self.tells_direct = spec.options.delivery == "at_most_once"  # `LocalRoute.tell` may put
        self._after_turn = host.after_turn
        self._turn_timeout = spec.options.turn_timeout
        self.abandoned = False  # a turn timed out: no more turns here (see `_abandon`)
        self._stuck: asyncio.Task[Any] | None = None  # the timed-out handler, maybe still running
        # An in-process ask may run its turn in the caller's task (`_inline.py`): no state, no
        # turn timeout, not cut off. `inline_task`: such a turn that suspended, still running.
        self.inline_ok = not spec.durable and self._turn_timeout is None
        self.inline_task: asyncio.Task[None] | None = None
        self.task = host.loop.create_task(self._run(), name=f"accord-agent-{agent_id}")

    def put(self, work: Work) -> None:
        self.queue.append(work)
        self.load.n += 1
        self._total.n += 1
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        """Deactivate once the mailbox is empty (idle timeout, graceful handoff, node stop)."""
        self.closing = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _valid(self) -> bool:
        if self.orphan:
            return self.host.orphan_epoch(self.shard) == self.epoch
        return self._shard_valid(self.shard, self.epoch)

    def make_orphan(self) -> None:
        self.orphan = True
        self.inline_ok = False
        if self.durable is not None:
            self.durable.orphaned = True

    def merge_payload(self) -> MergeState | None:
        if self.durable is None or self.agent is None:
            return None
        return self.durable.merge_payload(self.agent, self.host.name)

    async def _run(self) -> None:
        host = self.host
        if self._previous is not None:  # the last activation of this id is still deactivating
            await asyncio.shield(self._previous)
            self._previous = None
        agent = self.spec.cls()
        agent.id = self.id
        agent.mesh = host.mesh
        agent.replica_id = f"{host.name}:{self.epoch}"
        self.agent = agent
        activated = False
        graceful = False
        cancelled = False
        try:
            if self.spec.durable:
                self.durable = host.durable_for(self.id, self.spec, self.shard, self.epoch)
                await self.durable.load(agent)
                self.durable.orphaned = self.orphan
            await agent.on_activate()
            activated = True
            host.stats.activations += 1
            sender_token = current_sender.set(self._name)  # for every turn; this task's context
            try:
                await self._turns(agent)
            finally:
                current_sender.reset(sender_token)
            graceful = True
        except asyncio.CancelledError:
            # Lease lost: stop at once. Queued asks learn they were not run (`_not_run`).
            cancelled = True
            inline = self.inline_task
            if inline is not None:  # an inline turn is this activation's turn: it stops too
                inline.cancel()
                await asyncio.wait((inline,))
            await _not_run(self.queue, self.id, remote=not self.orphan)
        except StateDeleted as exc:
            # Deleted or expired under this activation: its memory must not be written back;
            # the queued messages go to a fresh activation (from no state).
            log.info("%s: %s; activation ended", self.id, exc)
            await self._fail_queued(None)
        except Fenced as exc:
            log.warning("%s fenced: %s", self.id, exc)  # a newer owner exists: stay silent
        except StorageFull as exc:
            log.warning("%s: state not written, the store is full: %s", self.id, exc)
            await self._fail_queued(exc)
        except Exception as exc:
            log.exception("activation of %s failed", self.id)
            error = (
                exc
                if isinstance(exc, StateError)
                else RemoteError(type(exc).__name__, f"activation failed: {exc}")
            )
            await self._fail_queued(error)
        finally:
            if self.abandoned:
                await self._abandon(agent, restart=not cancelled)
            else:
                if self.merge_to is not None:
                    payload = self.merge_payload()
                    if payload is not None:
                        self.merge_to(payload)
                host.ended(self)
                if activated:
                    await self._deactivate(agent, graceful)
            self._bulkhead.add(self.spec.type_name, -len(self.queue))

    async def _turns(self, agent: Agent) -> None:
        host = self.host
        loop = host.loop
        bulkhead = self._bulkhead
        queue = self.queue
        load = self.load
        total = self._total
        shard_valid, shard, epoch = self._shard_valid, self.shard, self.epoch
        while True:
            if not queue or self.busy:  # busy here: an inline turn runs (it wakes this task)
                if self.closing and not queue and not self.busy:
                    return
                self._waiter = loop.create_future()
                if self.durable is not None and self.durable.dirty:
                    try:
                        async with asyncio.timeout(self.spec.options.flush_interval):
                            await self._waiter
                    except TimeoutError:
                        await self.durable.flush(agent)
                else:
                    await self._waiter
                self._waiter = None
                continue
            work = queue.popleft()
            load.n -= 1
            total.n -= 1
            if total.waiting:
                bulkhead.freed()
            self._streak += 1
            if self._streak % 64 == 0:
                await asyncio.sleep(0)  # a long queue of instant turns must not starve the loop
            if not (self._valid() if self.orphan else shard_valid(shard, epoch)):
                return  # the lease moved on: nothing more runs or replies here
            if work.deadline is not None and loop.time() >= work.deadline:
                host.stats.expired += 1
                continue  # the caller has given up; running it would be wasted and unseen
            self.busy = True
            try:
                if work.lookup is not None:
                    await self._answer_lookup(work)
                elif work.system is not None:
                    await work.system(self, agent, work)
                elif self.orphan and not await self._cut_off_may_run(work):
                    pass
                elif work.delivery is not None:
                    await self._durable_turn(agent, work, work.delivery)
                elif work.local and work.reply is not None and self.durable is None:
                    result, error = await self._invoke(agent, work)  # an in-process ask, no state
                    if self._valid():
                        work.reply(result, error)  # sets the caller's future: nothing to await
                    else:
                        host.stats.replies_withheld += 1
                elif work.reply is None and self.durable is None:
                    await self._invoke(agent, work)  # a tell to a stateless agent: nothing after
                else:
                    await self._turn(agent, work)
            finally:
                self.busy = False
                self.last_active = loop.time()
            if self.abandoned:
                return  # the agent object may still be in use by the timed-out handler

    async def _invoke(
        self, agent: Agent, work: Work, traced: bool = False
    ) -> tuple[Any, AccordError | None]:
        """Run `work`'s handler (in a `process` span when tracing); report the turn to the
        node's observers. One coroutine frame on the hot path."""
        if not traced and _trace.active is not None:
            return await _traced(self, agent, work)
        assert work.handler is not None
        observe = self.host.observe
        start = self.host.loop.time() if observe.active else 0.0
        error: AccordError | None = None
        dl_token = current_deadline.set(work.deadline)
        try:
            if self._turn_timeout is None:
                result = await work.handler.fn(agent, work.msg)
            else:
                result = await _bounded(self, work.handler.fn(agent, work.msg), self._turn_timeout)
            after = self._after_turn.get(type(work.msg)) if self._after_turn else None
            if after is not None:
                await after(work.msg, self._name, result)
        except _Expired:
            result, error = None, self._timed_out(work.handler)
        except Exception as exc:
            result, error = None, _handler_error(self, work, exc)
        finally:
            current_deadline.reset(dl_token)
            self.host.stats.turns += 1
        if observe.active:
            _report(self, work, error, start)
        return result, error

    def _timed_out(self, handler: HandlerSpec) -> TurnTimeout:
        self.abandoned = True
        self.host.stats.turn_timeouts += 1
        log.warning("%s: handler %s ran past turn_timeout (%gs): answered TurnTimeout, "
                    "activation abandoned and restarted", self.id, handler.name,
                    self._turn_timeout)  # fmt: skip
        return TurnTimeout(
            f"{self.id}: handler {handler.name} ran past turn_timeout ({self._turn_timeout}s);"
            " its state changes were rolled back and the agent restarted"
        )

    async def _abandon(self, agent: Agent, restart: bool) -> None:
        """After a turn timed out: keep what earlier turns left unwritten (eventual state), then
        let the table put a fresh activation in this one's place, with the queue. The agent
        object is not deactivated (`on_deactivate` is not called): the stuck handler may still
        be using it."""
        durable = self.durable
        if durable is not None and durable.dirty and not self.orphan and self._valid():
            try:
                await durable.flush(agent)  # rolled back already: the timed-out turn is not in it
            except Exception:
                log.exception("flush of abandoned %s failed", self.id)
        restart = restart and self._valid() and (bool(self.queue) or not self.closing)
        self.host.abandon(self, self._stuck, restart)

    async def _turn(self, agent: Agent, work: Work) -> None:
        """An at-most-once message: run once; persist state if the agent has any; reply."""
        result, error = await self._invoke(agent, work)
        if self.durable is not None:
            if error is None:
                try:
                    await self.durable.commit(agent)  # Fenced propagates: stop, no reply
                except StorageFull as exc:
                    await self._reply(work, None, exc)  # not stored: the activation ends
                    raise
            else:
                self.durable.rollback(agent)
        if work.reply is not None:
            if self._valid():
                await self._reply(work, result, error)
            else:
                self.host.stats.replies_withheld += 1

    async def _durable_turn(self, agent: Agent, work: Work, dd: DurableDelivery) -> None:
        """A mailbox message: dedup, run with in-place retries, persist, ack, reply."""
        exactly_once = dd.mode == "exactly_once" and self.durable is not None
        if exactly_once:
            assert self.durable is not None
            entry = self.durable.lookup(dd.msg_id)
            if entry is not None or self.durable.applied(dd.seq):
                # Applied before: a redelivery (crash before the ack) or a retried publish.
                self.host.stats.deduplicated += 1
                await dd.ack()
                if entry is not None:
                    await self._reply_entry(work, entry)
                return
        opts = self.spec.options
        while True:
            dd.attempts += 1
            result, error = await self._invoke(agent, work)
            if not self._valid():
                if self.durable is not None:
                    self.durable.rollback(agent)
                return  # not acked: the next owner redelivers it
            if error is None:
                entry = _dedup_entry(dd.msg_id, result, None) if exactly_once else None
                if self.durable is not None:
                    try:
                        await self.durable.commit(agent, entry, dd.seq if exactly_once else 0)
                    except StorageFull as exc:
                        # Not stored, so not acknowledged: processed again once space is freed.
                        # The activation ends, and its memory of this turn with it.
                        await dd.nak(delay=STORAGE_FULL_RETRY)
                        await self._reply(work, None, exc)
                        raise
                    except StateDeleted:
                        await dd.nak(delay=0.0)  # for the next activation, from no state
                        raise
                await dd.ack()
                await self._reply(work, result, None)
                return
            if self.durable is not None:
                self.durable.rollback(agent)
            if self.abandoned and dd.attempts < opts.max_deliver:
                # Timed out: the caller learns it now; the fresh activation retries the message
                # first (per-agent order kept), as one more attempt.
                await self._reply(work, None, error)
                work.reply = None
                self.queue.appendleft(work)
                self.load.n += 1
                self._total.n += 1
                await dd.in_progress()
                return
            if dd.attempts >= opts.max_deliver:
                await self.host.dead_letter(work.data, dd, error)
                if exactly_once:
                    assert self.durable is not None
                    await self.durable.commit(agent, _dedup_entry(dd.msg_id, None, error), dd.seq)
                await dd.ack()
                await self._reply(work, None, error)
                return
            await dd.in_progress()
            await asyncio.sleep(backoff_delay(dd.attempts, opts.retry_backoff))

    async def _cut_off_may_run(self, work: Work) -> bool:
        """Degraded agents cut off from the majority answer reads only."""
        if self.spec.options.failover == "degraded" and not (
            work.handler and work.handler.read_only
        ):
            error = Degraded(f"{self.id} is cut off: writes refused until healed")
            await self._reply(work, None, error)
            return False
        return True

    async def _reply(self, work: Work, result: Any, error: BaseException | None) -> None:
        if work.reply is not None:
            sending = work.reply(result, error)
            if sending is not None:
                try:
                    await sending
                except Exception as exc:  # the asker will time out; the agent goes on
                    log.warning("reply of %s not sent: %s", self.id, exc)

    async def _answer_lookup(self, work: Work) -> None:
        assert work.lookup is not None
        entry = self.durable.lookup(work.lookup) if self.durable is not None else None
        if entry is None:
            pending = _Pending(f"no recorded outcome for message {work.lookup} yet")
            await self._reply(work, None, pending)
        else:
            await self._reply_entry(work, entry)

    async def _reply_entry(self, work: Work, entry: DedupEntry) -> None:
        if entry.ok:
            await self._reply(work, _Recorded(bytes(entry.reply)), None)
        else:
            await self._reply(work, None, RemoteError(entry.rtype or "Exception", entry.message))

    async def _fail_queued(self, error: BaseException | None) -> None:
        """End the queued messages: stored ones are delivered again later, others answered
        `error` (None: the state was deleted under this activation; stored ones come back at
        once, to a fresh activation, and the others learn they were not run)."""
        while self.queue:
            work = self.queue.popleft()
            self._bulkhead.add(self.spec.type_name, -1)
            if work.delivery is not None:
                # not the message's fault: try again later
                await work.delivery.nak(delay=5.0 if error is not None else 0.0)
                if error is None:
                    continue
            await self._reply(work, None, error or DeliveryTimeout(
                f"{self.id}: its state was deleted before this message's turn; not run",
                maybe_delivered=False))  # fmt: skip

    async def _deactivate(self, agent: Agent, graceful: bool) -> None:
        try:
            if graceful and self.durable is not None and self._valid():
                await self.durable.flush(agent)
            await asyncio.wait_for(agent.on_deactivate(), self.host.deactivate_timeout)
        except Exception:
            log.exception("deactivation of %s failed", self.id)


async def _bounded(act: Activation, turn: Awaitable[Any], timeout: float) -> Any:
    """Run the handler as a task of its own and wait at most `timeout` for it, so that a
    handler stuck in an await that ignores cancellation cannot hold this activation."""
    task = asyncio.ensure_future(turn)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()  # best effort: it may ignore it, or be blocked in a worker thread
    task.add_done_callback(_consume)
    act._stuck = task
    raise _Expired


async def _traced(act: Activation, agent: Agent, work: Work) -> tuple[Any, AccordError | None]:
    """`Activation._invoke` in a `process` span, a child of the sender's."""
    tracing = _trace.active
    assert tracing is not None
    kind: Kind = "ask" if work.reply is not None else kind_of(False, work.trace)
    with tracing.process(act.spec.type_name, kind, act._name, work.trace) as failed:
        result, error = await act._invoke(agent, work, traced=True)
        if error is not None:
            failed(error)
    return result, error


def _report(act: Activation, work: Work, error: AccordError | None, start: float) -> None:
    """A turn to the node's observers: its kind, outcome and duration."""
    kind: Kind = "ask" if work.reply is not None else kind_of(False, work.trace)
    outcome: Outcome = (
        "ok" if error is None
        else "timeout" if isinstance(error, TurnTimeout | DeliveryTimeout)
        else "error"
    )  # fmt: skip
    act.host.observe.turn_ended(act.spec.type_name, kind, outcome, act.host.loop.time() - start)


def _handler_error(act: Activation, work: Work, exc: Exception) -> AccordError:
    """What a caller is answered when the handler raised `exc`."""
    if (
        isinstance(exc, DeliveryTimeout)
        and work.deadline is not None
        and act.host.loop.time() >= work.deadline
    ):
        return exc  # the caller's own deadline passed: answered as "timeout"
    act.host.stats.handler_errors += 1
    assert work.handler is not None
    log.debug("handler %s of %s raised", work.handler.name, act.id, exc_info=True)
    return _as_remote(exc)


class _Expired(Exception):
    """The handler did not finish within `turn_timeout`."""


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve an abandoned handler's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.debug("abandoned turn ended with %r", exc)
