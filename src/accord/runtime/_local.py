"""The in-process route: a message for a shard this node serves is handed to the activation
directly, with the same semantics as over the wire (bulkheads, unknown types, deadlines) and no
network hop. `Mesh` takes it as its `local` route; a plain client has none. `ask` is the common
ask in one step; `route_once` is the exactly-once ask of a caller that asks again until answered
(a workflow's `ctx.ask`).

The message object itself is handed over, not a copy: a sender must not change a message after
sending it (docs/placement.md, "The in-process ask")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .. import _codec as codec
from .. import _trace
from .._context import publishing
from .._errors import AccordError, AgentTypeNotFound, UnknownMessageType
from .._ids import AgentId
from .._observe import PUBLISHED
from .._spec import AgentSpec
from ..delivery._mailbox import DurableDelivery
from . import _inline
from ._bulkhead import Bulkhead
from ._deadlines import Deadlines, Slot
from ._table import ActivationTable
from ._work import ReplyFn, Work, _Recorded


class LocalRoute:
    def __init__(
        self,
        specs: Mapping[str, AgentSpec],
        table: ActivationTable,
        bulkhead: Bulkhead,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._specs = specs
        self._live = table.live
        self._table = table
        self._bulkhead = bulkhead
        self._serving: Callable[[int], int | None] = _nothing  # set by `attach`
        # The epoch to deliver an agent under here (its override's, or its shard's), or None.
        self._epoch_for: Callable[[AgentId, int], int | None] = self._by_shard
        # Sees every at-most-once message this process routes (the communication graph).
        self.observe: Callable[[AgentId, bool], None] | None = None
        self.open = False  # the node takes new messages (False before start, from stop on)
        self._loop = loop
        self._delivered: asyncio.Future[Any] = loop.create_future()  # "handed over" (tells)
        self._delivered.set_result(None)
        self._deadlines = Deadlines(loop)  # every ask future's timeout

    def attach(self, serving: Callable[[int], int | None]) -> None:
        """`serving(shard)`: the epoch under which this node takes new messages for a shard."""
        self._serving = serving

    def attach_placement(self, epoch_for: Callable[[AgentId, int], int | None]) -> None:
        """Agents placed by override: `epoch_for(agent, shard)` replaces `serving(shard)`."""
        self._epoch_for = epoch_for

    def _by_shard(self, agent_id: AgentId, shard: int) -> int | None:
        return self._serving(shard)

    def spec(self, agent_type: str) -> AgentSpec | None:
        """The spec of an agent type hosted here."""
        return self._specs.get(agent_type)

    def tell(self, agent_id: AgentId, shard: int, msg: Any) -> bool:
        """An at-most-once tell to a live activation of a shard served here, in one step.

        Anything else (no activation yet, a new epoch, a full bulkhead, an unknown message, a
        durable mode) returns False and takes the general path, which decides and reports it.
        """
        act = self._live.get(agent_id)
        if act is None or act.closing or not act.tells_direct:
            return False
        h = act.spec.by_class.get(type(msg))
        if h is None or self._epoch_for(agent_id, shard) != act.epoch or not self.open:
            return False
        bulkhead = self._bulkhead
        if bulkhead.total.n >= bulkhead.max_total or act.load.n >= bulkhead.max_per_type:
            return False
        act.put(Work(h, msg, None, None, trace=PUBLISHED if publishing.get() else None))
        if self.observe is not None:
            self.observe(agent_id, True)
        return True

    def ask(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float
    ) -> asyncio.Future[Any] | None:
        """An at-most-once ask to a live activation served here, in one step: the future of its
        reply (`DeliveryTimeout` once `deadline` passes). Anything else (no activation yet, a
        new epoch or an agent placed elsewhere, a full bulkhead, an unknown message, a durable
        mode) returns None and takes `route` or the network, which decide and report it."""
        act = self._live.get(agent_id)
        if act is None or act.closing or not act.tells_direct or not self.open:
            return None
        h = act.spec.by_class.get(type(msg))
        if h is None or self._epoch_for(agent_id, shard) != act.epoch:
            return None
        bulkhead = self._bulkhead
        if bulkhead.total.n >= bulkhead.max_total or act.load.n >= bulkhead.max_per_type:
            return None
        if self.observe is not None:
            self.observe(agent_id, True)
        fut: asyncio.Future[Any] = self._loop.create_future()
        slot = self._deadlines.add(fut, deadline, agent_id, msg)
        tracing = _trace.active  # the turn's span is a child of the caller's
        work = Work(h, msg, deadline, _future_replier(fut, slot), local=True,
                    trace=None if tracing is None else tracing.headers())  # fmt: skip
        if _inline.idle(act, deadline):
            _inline.run(act, work)  # its turn in this task, up to its first suspension
        else:
            act.put(work)
        return fut

    def route(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float | None, *, ask: bool
    ) -> asyncio.Future[Any] | None:
        """Deliver in-process if this node serves `shard`: a future of the reply (an ask) or of
        the hand-over (a tell); None when the shard is not served here. A tell that cannot be
        accepted raises (`Overloaded`, ...); an ask gets the error in its future."""
        epoch = self._epoch_for(agent_id, shard) if self.open else None
        spec = self._specs.get(agent_id.type)
        if spec is not None and spec.stateless:
            return None  # a worker pool: the queue group spreads it (runtime/_pool.py)
        if epoch is None or (spec is None and self._epoch_for is not self._by_shard):
            # Not served here (another node's shard, an agent placed elsewhere, or a type
            # another node may host: the shard's owner places it or refuses).
            if self.observe is not None:
                self.observe(agent_id, False)
            return None
        if self.observe is not None:
            self.observe(agent_id, True)
        h = spec.by_class.get(type(msg)) if spec is not None else None
        try:
            if spec is None:
                raise AgentTypeNotFound(f"no agent type {agent_id.type!r} on this cluster")
            if h is None:
                raise UnknownMessageType(
                    f"{agent_id.type!r} has no handler for {type(msg).__name__}"
                )
            self._bulkhead.check(spec.type_name)
        except AccordError as exc:
            if not ask:
                raise
            failed: asyncio.Future[Any] = self._loop.create_future()
            failed.set_exception(exc)
            return failed
        if not ask:  # a tell: nothing to wait for
            act = self._live.get(agent_id)
            if act is None or act.epoch != epoch or act.closing:
                act = self._table.get_or_create(agent_id, spec, shard, epoch)
            trace = PUBLISHED if publishing.get() else None  # a tell of `Mesh.publish`
            if trace is not None and _trace.active is not None:
                trace = {**(_trace.active.headers() or {}), **trace}
            act.put(Work(h, msg, deadline, None, trace=trace))
            return self._delivered
        fut: asyncio.Future[Any] = self._loop.create_future()
        slot = self._deadlines.add(fut, deadline, agent_id, msg) if deadline is not None else {}
        tracing = _trace.active  # the turn's span is a child of the caller's
        work = Work(h, msg, deadline, _future_replier(fut, slot), local=True,
                    trace=None if tracing is None else tracing.headers())  # fmt: skip
        self._table.get_or_create(agent_id, spec, shard, epoch).put(work)
        return fut

    def route_once(
        self, agent_id: AgentId, shard: int, msg: Any, msg_id: str, deadline: float
    ) -> asyncio.Future[Any] | None:
        """An exactly-once ask handed to the activation of a shard served here without the
        mailbox: its turn is a mailbox message's (dedup by `msg_id`, retried in place, the reply
        recorded with the state, dead-lettered after `max_deliver`), but nothing stores the
        message — it is lost with this process; a lease lost before its turn answers it
        `NotRun`, one lost mid-turn leaves it unanswered until `deadline`. Only for a caller
        that asks again with the same `msg_id` until it is answered. None (take the mailbox)
        when the target is not a durable agent served here, or the message or the bulkhead
        would be refused."""
        spec = self._specs.get(agent_id.type)
        if spec is None or spec.stateless or not spec.durable or not self.open:
            return None
        epoch = self._epoch_for(agent_id, shard)
        h = spec.by_class.get(type(msg))
        if epoch is None or h is None:
            return None
        bulkhead = self._bulkhead
        if bulkhead.total.n >= bulkhead.max_total or bulkhead.load(spec.type_name).n >= (
            bulkhead.max_per_type
        ):
            return None
        body = codec.encode(msg)
        data = codec.encode(codec.Request(  # kept for the dead letters
            v=codec.PROTOCOL_VERSION, kind="ask", target=str(agent_id),
            type=codec.message_type_name(type(msg)),
            body=msgspec.Raw(body), id=msg_id, delivery="exactly_once",
        ))  # fmt: skip
        fut: asyncio.Future[Any] = self._loop.create_future()
        slot = self._deadlines.add(fut, deadline, agent_id, msg)
        delivery = DurableDelivery(_Unstored(data), msg_id, "exactly_once")
        tracing = _trace.active  # the turn's span is a child of the caller's
        work = Work(h, msg, deadline, _future_replier(fut, slot, h.returns), delivery=delivery,
                    data=data, local=True,
                    trace=None if tracing is None else tracing.headers())  # fmt: skip
        self._table.get_or_create(agent_id, spec, shard, epoch).put(work)
        return fut


class _Unstored:
    """The `Delivery` of a message `route_once` hands over: nothing to acknowledge (it is in no
    stream); its sender asks again if it gets no answer."""

    __slots__ = ("data",)
    subject = ""
    headers: dict[str, str] | None = None
    seq = 0  # in no stream: never taken for one applied by sequence
    num_delivered = 1

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def ack(self) -> None:
        return None

    async def nak(self, delay: float = 0.0) -> None:
        return None

    async def in_progress(self) -> None:
        return None


def _nothing(shard: int) -> int | None:
    return None


def _future_replier(fut: asyncio.Future[Any], slot: Slot, returns: Any = Any) -> ReplyFn:
    """The reply of an in-process ask: sets `fut` (once; a timed-out one stays as it is) and
    takes it out of its deadline's `slot`."""

    def reply(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        slot.pop(fut, None)
        if error is not None:
            fut.set_exception(error)
        elif isinstance(result, _Recorded):  # an exactly-once reply recorded before (encoded)
            try:
                fut.set_result(codec.decode_as(result.data, returns))  # as `Sender.unwrap`
            except AccordError as exc:
                fut.set_exception(exc)
        else:
            fut.set_result(result)

    return reply
