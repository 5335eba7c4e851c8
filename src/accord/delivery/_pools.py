"""Worker pools on the wire: the subjects of a stateless agent type and its durable work queue.

Asks and at-most-once tells go to core subjects that every hosting node subscribes to in one
queue group; durable tells are appended to one work-queue stream and taken by one shared
consumer per type (competing pullers, acked after the handler returned). `runtime/_pool.py`
serves them, `_sender.py` sends to them.
"""

from __future__ import annotations

import asyncio
import random

import msgspec

from .. import _codec as codec
from .._context import current_sender
from .._errors import AccordError, DeliveryTimeout, Overloaded
from .._ids import AgentId
from .._retry import Backoff
from ..cluster._config import ClusterConfig, Names
from ..engine._api import ConsumerSpec, Engine, NoResponders, RequestTimeout, StreamSpec
from ._mailbox import DUPLICATE_WINDOW

POOL_ACK_WAIT = 6.0
"""Seconds a durable pool message taken by a node that then went silent (SIGKILL) waits before
it is delivered to another node; a node still working on one says so every third of it."""

POOL_QUEUE = "pool"  # the queue group of every hosting node


def pool_ask_subject(names: Names, agent_type: str) -> str:
    return f"{names.prefix}.pool.{agent_type}.ask"


def pool_tell_subject(names: Names, agent_type: str) -> str:
    return f"{names.prefix}.pool.{agent_type}.tell"


def pool_stream(names: Names) -> str:
    return f"accord_{names.cluster}_pool"


def pool_job_subject(names: Names, agent_type: str) -> str:
    """Durable messages of a pool type (the stream's subject; apart from the core ones, which a
    stream capturing them would answer with acknowledgements)."""
    return f"{names.prefix}.pjob.{agent_type}"


def pool_stream_spec(names: Names, replicas: int, config: ClusterConfig) -> StreamSpec:
    """The pools' work queue. Its byte limit is a third of the mailbox's share (pool messages
    are durable messages not yet processed, as the mailbox's are); full: appends refused."""
    return StreamSpec(
        name=pool_stream(names),
        subjects=(f"{names.prefix}.pjob.*",),
        replicas=replicas,
        work_queue=True,
        duplicate_window=DUPLICATE_WINDOW,
        max_bytes=config.max_bytes("mailbox") // 3,
        discard_new=True,
    )


def pool_consumer_spec(names: Names, agent_type: str, max_pending: int) -> ConsumerSpec:
    """The one consumer every hosting node pulls from (a work queue takes one per subject)."""
    return ConsumerSpec(
        name=f"pool-{agent_type}",
        filter_subject=pool_job_subject(names, agent_type),
        ack_wait=POOL_ACK_WAIT,
        max_ack_pending=max_pending,
        inactive_threshold=3600.0,
    )


async def pool_ask(
    engine: Engine,
    names: Names,
    agent_id: AgentId,
    type_name: str,
    body: bytes,
    enc: codec.Encoding,
    deadline: float,
    rng: random.Random,
    headers: dict[str, str] | None = None,
) -> bytes:
    """Ask whichever hosting node the queue group picks; return the raw reply envelope.

    A node at its `max_concurrency` answers `overloaded` without running the handler, and
    "no responders" means no node hosts the type right now: both are retried with backoff
    (the queue group picks again) until `deadline`, then `Overloaded`, resp.
    `DeliveryTimeout(maybe_delivered=False)`. A request that reached a node and got no reply
    in time (the node died, or the handler is slow) is `DeliveryTimeout(maybe_delivered=True)`:
    never sent again here, since the handler may have run. `headers`: the envelope's trace
    context (the caller's `send` span).
    """
    loop = asyncio.get_running_loop()
    subject = pool_ask_subject(names, agent_id.type)
    backoff = Backoff(_RETRY_START, _RETRY_CAP, rng=rng)
    overloaded: str | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            if overloaded is not None:
                raise Overloaded(f"ask {agent_id} {type_name}: every try found its node full "
                                 f"until the deadline ({overloaded})")  # fmt: skip
            raise DeliveryTimeout(
                f"ask {agent_id} {type_name}: no node serves the pool {agent_id.type!r}",
                maybe_delivered=False,
            )
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind="ask",
            target=str(agent_id),
            type=type_name,
            body=msgspec.Raw(body),
            timeout_ms=max(1, int(remaining * 1000)),
            sender=current_sender.get(),
            headers=headers,
        )
        try:
            data = await engine.request(subject, codec.encode(req, enc), remaining)
        except NoResponders:
            await asyncio.sleep(min(backoff.next(), remaining))
            continue
        except RequestTimeout:
            raise DeliveryTimeout(
                f"ask {agent_id} {type_name}: no reply within the deadline",
                maybe_delivered=True,
            ) from None
        why = _overloaded(data)
        if why is None:
            return data
        overloaded = why
        await asyncio.sleep(min(backoff.next(), max(0.0, deadline - loop.time())))


def _overloaded(data: bytes) -> str | None:
    """The message of an `overloaded` error reply, else None (any other reply is the answer)."""
    if _OVERLOADED not in data:  # cheap test first: most replies are answers
        return None
    try:
        reply, _ = codec.decode_reply(data)
    except AccordError:
        return None
    if reply.ok or reply.error is None or reply.error.code != Overloaded.code:
        return None
    return reply.error.message


_OVERLOADED = Overloaded.code.encode()
_RETRY_START = 0.002
_RETRY_CAP = 0.05
