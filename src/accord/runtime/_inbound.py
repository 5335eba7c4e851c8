"""Inbound dispatch: messages arriving on a shard's subject, its standby subject or its durable
mailbox become work for activations; anything malformed or unroutable gets a clear error reply
(or goes to the dead letters), never a crash of the node."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NamedTuple

import msgspec

from .. import _codec as codec
from .._background import Background
from .._errors import (
    AccordError,
    AgentTypeNotFound,
    BadRequest,
    ConfigurationError,
    Degraded,
    Overloaded,
    UnknownMessageType,
)
from .._ids import AgentId
from .._observe import Observers, kind_of
from .._spec import DELIVERY_MODES, AgentSpec, HandlerSpec
from ..cluster._config import Names
from ..cluster._shards import ShardManager
from ..delivery._dlq import dead_letter
from ..delivery._mailbox import DurableDelivery
from ..engine._api import Delivery, Engine, Message
from ..state._store import MERGE_TYPE, MergeState
from ._bulkhead import Bulkhead
from ._cutoff import CutOff, merge_turn
from ._placement import DURABLE, HANDLED, NodePlacement, RelayedDelivery
from ._settings import Stats
from ._table import ActivationTable
from ._work import NotRun, ReplyFn, Work, _Recorded

log = logging.getLogger("accord.node")


class _Target(NamedTuple):
    agent_id: AgentId
    spec: AgentSpec
    handler: HandlerSpec | None
    body: Any
    deadline: float | None


class Inbound:
    def __init__(
        self,
        node: str,
        names: Names,
        num_shards: int,
        specs: Mapping[str, AgentSpec],
        resolve: Callable[[str], tuple[AgentId, int]],
        shards: ShardManager,
        cutoff: CutOff,
        table: ActivationTable,
        bulkhead: Bulkhead,
        transport: Engine,
        stats: Stats,
        sends: Background,
        loop_time: Callable[[], float],
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        self._node = node
        self._names = names
        self._num_shards = num_shards
        self._specs = specs
        self._resolve = resolve
        self._shards = shards
        self._cutoff = cutoff
        self._table = table
        self._bulkhead = bulkhead
        self._transport = transport
        self._stats = stats
        self._sends = sends
        self._time = loop_time
        self.placement: NodePlacement | None = None  # per-agent overrides (attached by the node)

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self, shard: int, data: bytes) -> tuple[codec.Request, codec.Encoding, _Target]:
        """Decode and validate a request for `shard`; raise an AccordError naming the problem."""
        req, enc = codec.decode_request(data)
        try:
            agent_id, target_shard = self._resolve(req.target)
        except ConfigurationError as exc:
            raise BadRequest(f"bad target: {exc}") from None
        if target_shard != shard:
            raise BadRequest(f"{agent_id} does not live in shard {shard}")
        spec = self._specs.get(agent_id.type)
        if spec is None:
            raise AgentTypeNotFound(f"no agent type {agent_id.type!r} on this cluster")
        if req.kind == "result":
            return req, enc, _Target(agent_id, spec, None, None, None)
        if req.type == MERGE_TYPE:
            merge = codec.decode_as(req.body, MergeState, enc)
            return req, enc, _Target(agent_id, spec, None, merge, None)
        h = spec.handler_for_name(req.type)
        if h is None:
            raise UnknownMessageType(
                f"agent type {agent_id.type!r} has no handler for {req.type!r}"
            )
        body = codec.decode_as(req.body, h.msg_type, enc)
        deadline = None
        if req.timeout_ms is not None:
            if not -(2**63) <= req.timeout_ms < 2**64:
                raise BadRequest(f"timeout_ms out of range: {req.timeout_ms}")
            deadline = self._time() + req.timeout_ms / 1000
        if req.delivery is not None and req.delivery not in DELIVERY_MODES:
            raise BadRequest(f"unknown delivery mode {req.delivery!r}")
        return req, enc, _Target(agent_id, spec, h, body, deadline)

    # -- the shard subject ----------------------------------------------------------------------

    def on_request(self, shard: int, msg: Message, placed: bool = False) -> None:
        # A message that reached this subscription is ours while the lease is valid, also while
        # the shard is being handed off: the subscription drains before the lease is released.
        # `placed`: it came on this node's placement subject (an agent placed here by override).
        epoch = self._shards.held_epoch(shard)
        orphan = False
        if placed and msg.headers and DURABLE in msg.headers and self.placement is not None:
            self.on_mailbox(shard, 0, RelayedDelivery(self._transport, msg), placed=True)
            return
        if epoch is None and not placed:
            epoch = self._cutoff.cut_off_epoch(shard)
            if epoch is None:
                # A stale subscription, or a cut-off one whose shard another node now serves
                # where this message also arrived: stay silent, the valid owner answers (else
                # both would apply it).
                self._stats.dropped_not_owner += 1
                return
            orphan = True
        reply_to = msg.reply or None
        enc: codec.Encoding = codec.sniff(msg.data)
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind == "result" and (reply_to is None or not req.id):
                raise BadRequest("a result request needs a reply subject and an id")
            if req.type == MERGE_TYPE:
                raise BadRequest("state merges go through the mailbox")
            self._bulkhead.check(t.spec.type_name)
        except AgentTypeNotFound as exc:
            if self.placement is None or not self.placement.foreign(shard, msg, None, 0):
                self._reject(exc, reply_to, enc)
            return
        except AccordError as exc:
            if isinstance(exc, Overloaded):  # only the bulkhead: `req` and `t` are parsed
                self._refused(t.spec.type_name, req)
            self._reject(exc, reply_to, enc)
            return
        except Exception as exc:  # anything a hostile envelope provokes must not kill the node
            self._reject(BadRequest(f"rejected: {exc}"), reply_to, enc)
            return
        if self.placement is not None:
            routed = self.placement.route(shard, t.agent_id, msg, placed)
            if routed == HANDLED:
                return
            if routed:
                epoch, orphan = routed, False
        if epoch is None:
            return
        if orphan and not self._serve_cut_off(t, reply_to, enc):
            return
        reply = None
        if req.kind != "tell" and reply_to is not None:
            reply = self._remote_replier(reply_to, enc, epoch)
        act = self._table.get_or_create(t.agent_id, t.spec, shard, epoch, orphan=orphan)
        if req.kind == "result":
            act.put(Work(None, None, t.deadline, reply, lookup=req.id))
        else:
            act.put(Work(t.handler, t.body, t.deadline, reply, trace=req.headers))

    def _serve_cut_off(self, t: _Target, reply_to: str | None, enc: codec.Encoding) -> bool:
        """While cut off: absolute types stay silent, degraded ones refuse writes."""
        failover = t.spec.options.failover
        if failover == "absolute" or t.handler is None:
            self._stats.dropped_not_owner += 1
            return False
        if failover == "degraded" and not t.handler.read_only:
            self._reject(Degraded(f"{t.agent_id} is cut off from the cluster: writes are "
                                  "refused until the partition heals"), reply_to, enc)  # fmt: skip
            return False
        return True

    # -- the standby subject (split_brain_allowed agents of a vanished owner) -------------------

    async def on_standby_msg(self, msg: Message) -> None:
        self.on_standby(msg)

    def on_standby(self, msg: Message) -> None:
        """An ask for a `split_brain_allowed` agent whose shard had no subscriber (its owner's
        process died): serve it now from the stored state, as a split-brain replica, instead of
        waiting out the lease. When the shard has an owner again, what changed here is merged
        into it (as after a partition). Other failover strategies never come here."""
        try:
            shard = int(msg.subject.rsplit(".", 1)[-1])
        except ValueError:
            shard = -1
        reply_to = msg.reply or None
        enc: codec.Encoding = codec.sniff(msg.data)
        if not 0 <= shard < self._num_shards:
            self._reject(BadRequest(f"no shard {shard}"), reply_to, enc)
            return
        if self._shards.held_epoch(shard) is not None:  # it is ours by now: serve as owner
            self.on_request(shard, msg)
            return
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind != "ask" or t.handler is None:
                raise BadRequest("the standby subject takes asks only")
            if t.spec.options.failover != "split_brain_allowed":
                raise BadRequest(f"{t.agent_id} is not split_brain_allowed: no standby serving")
            self._bulkhead.check(t.spec.type_name)
        except AccordError as exc:
            if isinstance(exc, Overloaded):  # only the bulkhead: `req` and `t` are parsed
                self._refused(t.spec.type_name, req)
            self._reject(exc, reply_to, enc)
            return
        except Exception as exc:  # a hostile envelope must not kill the node
            self._reject(BadRequest(f"rejected: {exc}"), reply_to, enc)
            return
        epoch = self._cutoff.standby_epoch(shard)
        reply = self._remote_replier(reply_to, enc, epoch) if reply_to is not None else None
        act = self._table.get_or_create(t.agent_id, t.spec, shard, epoch, orphan=True)
        act.put(Work(t.handler, t.body, t.deadline, reply, trace=req.headers))

    # -- the durable mailbox --------------------------------------------------------------------

    def on_mailbox(self, shard: int, epoch: int, msg: Delivery, placed: bool = False) -> bool:
        """Dispatch one mailbox message; False once this node no longer owns `shard` at `epoch`.
        `placed`: relayed by the shard's owner for an agent placed here by override."""
        if not placed and self._shards.held_epoch(shard) != epoch:
            return False
        enc: codec.Encoding = codec.sniff(msg.data)
        fallback_id = f"js:{msg.seq}"
        try:
            req, enc, t = self._parse(shard, msg.data)
            if req.kind == "result":
                raise BadRequest("result requests do not go through the mailbox")
        except AgentTypeNotFound as exc:
            if self.placement is None or not self.placement.foreign(shard, None, msg, epoch):
                self._stats.rejected += 1
                self._sends.spawn(self._reject_durable(msg, exc, fallback_id))
            return True
        except Exception as exc:
            error = exc if isinstance(exc, AccordError) else BadRequest(f"rejected: {exc}")
            self._stats.rejected += 1
            self._sends.spawn(self._reject_durable(msg, error, fallback_id))
            return True
        if self.placement is not None:
            routed = (
                self.placement.placed_here(t.agent_id) or HANDLED
                if placed
                else self.placement.route_durable(shard, t.agent_id, msg, epoch)
            )
            if routed == HANDLED:
                if placed:  # not placed here (any more): back to the owner, delivered again
                    self._sends.spawn(msg.nak())
                return True
            if routed:
                epoch = routed
        mode = req.delivery or t.spec.options.delivery
        if mode == "at_most_once":
            mode = "at_least_once"  # it is in the mailbox: at least once is the floor
        delivery = DurableDelivery(msg, req.id or fallback_id, mode)
        reply = None
        if req.kind == "ask" and req.reply_to:
            reply = self._remote_replier(req.reply_to, enc, epoch)
        system = merge_turn if req.type == MERGE_TYPE else None
        work = Work(t.handler, t.body, None, reply, delivery=delivery, data=msg.data,
                    system=system, trace=req.headers)  # fmt: skip
        self._table.get_or_create(t.agent_id, t.spec, shard, epoch).put(work)
        return True

    async def _reject_durable(self, msg: Delivery, error: AccordError, msg_id: str) -> None:
        """A mailbox message that can never be handled goes straight to the dead letters."""
        target = msg_type = ""
        with contextlib.suppress(Exception):
            req, enc = codec.decode_request(msg.data)
            target, msg_type = req.target, req.type
            if req.reply_to and req.kind == "ask":
                self._send(req.reply_to, codec.error_reply(error.code, str(error), enc))
        with contextlib.suppress(Exception):
            await dead_letter(
                self._transport,
                self._names,
                msg.data,
                target=target,
                msg_type=msg_type,
                msg_id=msg_id,
                reason=f"{error.code}: {error}",
                deliveries=1,
            )
            self._stats.dead_lettered += 1
            self._dead_lettered(target)
        with contextlib.suppress(Exception):
            await msg.ack()

    async def dead_letter(self, data: bytes, dd: DurableDelivery, error: AccordError) -> None:
        """A message failed `max_deliver` times: move it to the dead letters with the reason."""
        try:
            req, _ = codec.decode_request(data)
            target, msg_type = req.target, req.type
        except AccordError:
            target = msg_type = ""
        reason = f"{getattr(error, 'remote_type', error.code)}: " + getattr(
            error, "remote_message", str(error)
        )
        await dead_letter(self._transport, self._names, data, target=target, msg_type=msg_type,
                          msg_id=dd.msg_id, reason=reason, deliveries=dd.attempts)  # fmt: skip
        self._stats.dead_lettered += 1
        self._dead_lettered(target)
        log.warning("dead-lettered %s %s after %d attempts: %s", target, msg_type, dd.attempts,
                    reason)  # fmt: skip

    def _refused(self, agent_type: str, req: codec.Request) -> None:
        if self._observe.active:
            self._observe.message_rejected(agent_type, kind_of(req.kind != "tell", req.headers))

    def _dead_lettered(self, target: str) -> None:
        if self._observe.active:
            agent_type = target.split("/", 1)[0]  # a label: only hosted types, never free text
            self._observe.dead_lettered(agent_type if agent_type in self._specs else "")

    # -- replies ------------------------------------------------------------------------------

    def _reject(self, exc: AccordError, reply_to: str | None, enc: codec.Encoding) -> None:
        self._stats.rejected += 1
        log.debug("rejected request: %s", exc)
        if reply_to:
            self._send(reply_to, codec.error_reply(exc.code, str(exc), enc))

    def _remote_replier(self, reply_to: str, enc: codec.Encoding, epoch: int) -> ReplyFn:
        transport = self._transport
        node = self._node

        def reply(result: Any, error: BaseException | None) -> Coroutine[Any, Any, None]:
            if isinstance(error, NotRun):
                return transport.bounce(reply_to)
            if error is not None:
                code = getattr(error, "code", "error")
                rtype = getattr(error, "remote_type", type(error).__name__)
                rmsg = getattr(error, "remote_message", str(error))
                data = codec.error_reply(code, rmsg, enc, rtype)
            else:
                try:
                    body = (
                        _recorded_body(result, enc)
                        if isinstance(result, _Recorded)
                        else (codec.encode(result, enc))
                    )
                    data = codec.ok_reply(body, enc, epoch, node)
                except (TypeError, ValueError, OverflowError) as exc:
                    data = codec.error_reply("remote_error", f"reply not encodable: {exc}", enc,
                                             "TypeError")  # fmt: skip
            if len(data) > transport.max_payload:
                data = codec.error_reply(
                    "remote_error",
                    f"reply of {len(data)} bytes exceeds the server's max_payload",
                    enc,
                    "MaxPayloadError",
                )
            return transport.publish(reply_to, data)  # awaited by the turn: no task per reply

        return reply

    def _send(self, subject: str, data: bytes) -> None:
        self._sends.spawn(self._transport.publish(subject, data))


def _recorded_body(rec: _Recorded, enc: codec.Encoding) -> bytes:
    return rec.data if enc == "msgpack" else msgspec.json.encode(msgspec.msgpack.decode(rec.data))
