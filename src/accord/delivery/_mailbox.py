"""The durable mailbox: one work-queue stream per cluster, one subject per shard.

Senders append with a message id (a retried append after an ambiguous ack is stored once, within
the duplicate window). The owner of a shard consumes its subject through a consumer named after
its lease epoch; a new owner deletes the previous owner's consumer and starts a fresh one, which
delivers every message not yet acknowledged, in stream order, at once (no ack-wait to sit out).
Messages are acknowledged only after their turn, and its state write, completed. The streams and
the pull loop are the engine's (`engine.JetStream`); the consumer policy is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from .._errors import NotConnected
from .._retry import Backoff
from ..cluster._config import OPEN_RETRY_FOR, ClusterConfig, Names
from ..engine._api import (
    Consumer,
    ConsumerSpec,
    Delivery,
    JetStream,
    Refused,
    RequestTimeout,
    StreamSpec,
)

log = logging.getLogger("accord.mailbox")

DUPLICATE_WINDOW = 120.0
ACK_WAIT = 30.0
DLQ_MAX_AGE = 14 * 24 * 3600


def mailbox_stream(names: Names) -> str:
    return f"accord_{names.cluster}_mailbox"


def mailbox_subject(names: Names, shard: int) -> str:
    return f"{names.prefix}.mbox.{shard}"


def dlq_stream(names: Names) -> str:
    return f"accord_{names.cluster}_dlq"


def dlq_subject(names: Names, agent_type: str) -> str:
    return f"{names.prefix}.dlq.{agent_type}"


def stream_specs(
    names: Names, replicas: int, config: ClusterConfig | None = None
) -> list[StreamSpec]:
    """The mailbox (work queue), dead-letter and event-log streams of a cluster; with the
    cluster's byte limits (`config`), beyond which an append is refused (`StorageFull`)."""
    limit = config.max_bytes if config is not None else lambda what: 0
    return [
        StreamSpec(
            name=mailbox_stream(names),
            subjects=(f"{names.prefix}.mbox.*",),
            replicas=replicas,
            work_queue=True,
            duplicate_window=DUPLICATE_WINDOW,
            max_bytes=limit("mailbox"),
            discard_new=True,
        ),
        StreamSpec(
            name=dlq_stream(names),
            subjects=(f"{names.prefix}.dlq.>",),
            replicas=replicas,
            max_age=DLQ_MAX_AGE,
            max_bytes=limit("dlq"),
            discard_new=True,
        ),
        StreamSpec(
            name=f"accord_{names.cluster}_es",
            subjects=(f"{names.prefix}.es.>",),
            replicas=replicas,
            max_bytes=limit("es"),
            discard_new=True,
        ),
    ]


async def ensure_streams(
    js: JetStream, names: Names, replicas: int, config: ClusterConfig | None = None
) -> None:
    """Create the mailbox (work queue), dead-letter and event-log streams if missing (with the
    byte limits of `config`; existing streams keep theirs).

    Retried for up to `OPEN_RETRY_FOR` seconds while the engine does not answer (a leader
    election, R3 creations queued on a busy machine); then `NotConnected`.
    """
    deadline = time.monotonic() + OPEN_RETRY_FOR
    for spec in stream_specs(names, replicas, config):
        while True:
            try:
                await js.ensure_stream(spec)
                break
            except (NotConnected, RequestTimeout, Refused) as exc:
                if time.monotonic() > deadline:
                    why = str(exc) or "no answer in time"
                    raise NotConnected(f"cannot create the mailbox streams: {why}") from None
            await asyncio.sleep(0.5)


class DurableDelivery:
    """One mailbox message being handled: acknowledgement and progress signals over the engine's
    `Delivery` (a lost signal is harmless: the message is delivered once more)."""

    __slots__ = ("attempts", "delivery", "mode", "msg_id", "seq")

    def __init__(self, delivery: Delivery, msg_id: str, mode: str) -> None:
        self.delivery = delivery
        self.msg_id = msg_id
        self.mode = mode
        self.attempts = delivery.num_delivered - 1
        self.seq = delivery.seq  # the mailbox stream's sequence

    async def ack(self) -> None:
        with contextlib.suppress(NotConnected):
            await self.delivery.ack()

    async def in_progress(self) -> None:
        with contextlib.suppress(NotConnected):
            await self.delivery.in_progress()

    async def nak(self, delay: float) -> None:
        with contextlib.suppress(NotConnected):
            await self.delivery.nak(delay)


#: (shard, epoch, delivery) -> False once the node no longer owns the shard at that epoch.
Dispatch = Callable[[int, int, Delivery], bool]


class ShardMailbox:
    """Consumes one shard's mailbox subject while this node owns the shard at `epoch`.

    Deliveries reach `dispatch` in stream order from the engine's pull loop
    (`JetStream.consume`), which asks for nothing while `has_capacity` waits (the node's
    bulkhead is full: at most `batch` messages per shard arrive beyond it) and stops once
    `still_owner` turns False or `dispatch` refuses a message.
    """

    def __init__(
        self,
        js: JetStream,
        names: Names,
        shard: int,
        epoch: int,
        dispatch: Dispatch,
        has_capacity: Callable[[], Awaitable[None]],
        still_owner: Callable[[], bool],
        batch: int = 128,
    ) -> None:
        self._js = js
        self._stream = mailbox_stream(names)
        self._subject = mailbox_subject(names, shard)
        self.shard = shard
        self.epoch = epoch
        self._dispatch = dispatch
        self._has_capacity = has_capacity
        self._still_owner = still_owner
        self._batch = batch
        self._name = f"shard-{shard}-e{epoch}"
        self._consumer: Consumer | None = None

    async def start(self, previous_epoch: int | None = None) -> None:
        """Replace the previous owner's consumer (a work queue allows one per subject)."""
        if previous_epoch is not None:
            await self._js.delete_consumer(self._stream, f"shard-{self.shard}-e{previous_epoch}")
        spec = ConsumerSpec(
            name=self._name,
            filter_subject=self._subject,
            ack_wait=ACK_WAIT,
            max_ack_pending=4096,
            inactive_threshold=3600,
        )
        try:
            await self._js.ensure_consumer(self._stream, spec)
        except Refused:
            # Another consumer may still filter this subject (an owner older than the previous
            # one, whose consumer outlived it): replace it. Any other refusal re-raises.
            if not await self._delete_stale():
                raise
            await self._js.ensure_consumer(self._stream, spec)
        self._consumer = await self._js.consume(
            self._stream,
            self._name,
            self._on_delivery,
            has_capacity=self._has_capacity,
            still_going=self._still_owner,
            batch=self._batch,
        )

    async def _delete_stale(self) -> bool:
        """Delete the consumers of other epochs on this shard's subject; False if none."""
        stale = [
            name
            for name, subject in (await self._js.consumers(self._stream)).items()
            if subject == self._subject and name != self._name
        ]
        for name in stale:
            await self._js.delete_consumer(self._stream, name)
        return bool(stale)

    def _on_delivery(self, delivery: Delivery) -> bool:
        return self._dispatch(self.shard, self.epoch, delivery)

    async def stop(self) -> None:
        """Stop pulling; deliveries already dispatched stay with their activations."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


# This module's own generator, never the module-level `random` one (see `accord._retry`).
_rng = random.Random()


def backoff_delay(attempt: int, base: float, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter for the `attempt`-th retry (1-based): a random
    delay in [0, min(cap, base·2^(attempt-1)))."""
    if base <= 0 or cap <= 0:
        return 0.0
    return Backoff(min(base, cap), cap, full=True, rng=_rng).delay_for(attempt)
