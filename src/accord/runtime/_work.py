"""What an activation is given to run (`Work`: a message, how to answer it, how it was delivered)
and what comes of it (a recorded exactly-once reply, `NotRun` for asks a lost lease never ran,
dedup entries): shared by the activation, the inbound paths and the in-process route."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .._agent import Agent
from .._errors import AccordError, DeliveryTimeout, RemoteError
from .._ids import AgentId
from .._spec import HandlerSpec
from ..delivery._mailbox import DurableDelivery
from ..state._store import DedupEntry

_enc = msgspec.msgpack.Encoder()

ReplyFn = Callable[[Any, BaseException | None], Awaitable[None] | None]
#: A turn run by the runtime instead of a handler: (activation, agent, work).
SystemTurn = Callable[[Any, Agent, "Work"], Awaitable[None]]


class Work:
    """A message accepted for an agent. `reply` is None for a tell.

    `delivery` is set for mailbox (at-least-once / exactly-once) messages; `lookup` marks a request
    for the recorded outcome of an exactly-once message (`handler` is then None); `system` is a
    turn the runtime itself runs instead of a handler (a split-brain merge, `_cutoff.py`).
    """

    __slots__ = (
        "data", "deadline", "delivery", "handler", "local", "lookup", "msg", "reply", "system",
        "trace",
    )  # fmt: skip

    def __init__(
        self,
        handler: HandlerSpec | None,
        msg: Any,
        deadline: float | None,
        reply: ReplyFn | None,
        delivery: DurableDelivery | None = None,
        data: bytes = b"",
        lookup: str | None = None,
        local: bool = False,
        system: SystemTurn | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:
        self.trace = trace  # the sender's trace context (envelope headers), if it traces
        self.system = system
        self.local = local
        self.handler = handler
        self.msg = msg
        self.deadline = deadline
        self.reply = reply
        self.delivery = delivery
        self.data = data
        self.lookup = lookup


class _Recorded:
    """A reply recorded by exactly-once dedup, already msgpack-encoded."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Pending(AccordError):
    code = "pending"


class NotRun(DeliveryTimeout):
    """Given to a queued ask's `reply` when the lease was lost before its turn: it certainly did
    not run. An in-process sender gets it as an error; a remote one is bounced (the replier
    answers "not delivered", and the sender tries the shard's next owner)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, maybe_delivered=False)


async def _not_run(queue: deque[Work], agent_id: AgentId, *, remote: bool) -> None:
    """The lease was lost: the queued asks never ran; tell their senders so at once. Stored
    messages (`delivery`, not `local`) get nothing: the mailbox hands them to the next owner;
    an unstored exactly-once ask (`LocalRoute.route_once`) is told, its sender asks again.

    Bouncing a remote ask is safe because it was taken while this node's lease was valid
    (`ShardManager.held_epoch`), so no other node subscribed to the shard when NATS routed it:
    nobody else has it. Not so for an orphan (cut off: the next owner may have it too), whose
    remote asks (`remote=False`) are left to time out."""
    for work in queue:
        if work.reply is not None and (work.local or (work.delivery is None and remote)):
            sent = work.reply(None, NotRun(f"{agent_id}: lease lost before its turn"))
            if sent is not None:
                with contextlib.suppress(AccordError):  # best effort: else the ask times out
                    await sent


def _dedup_entry(msg_id: str, result: Any, error: AccordError | None) -> DedupEntry:
    if error is None:
        try:
            return DedupEntry(msg_id, True, msgspec.Raw(_enc.encode(result)))
        except (TypeError, ValueError, OverflowError) as exc:
            error = RemoteError("TypeError", f"reply not encodable: {exc}")
    return DedupEntry(
        msg_id,
        False,
        code=error.code,
        message=getattr(error, "remote_message", str(error)),
        rtype=getattr(error, "remote_type", type(error).__name__),
    )


def _as_remote(exc: Exception) -> AccordError:
    if isinstance(exc, RemoteError):
        return exc
    return RemoteError(type(exc).__name__, str(exc))
