"""The engine seam: what accord needs from its engine, as small protocols.

Core messaging (`Transport`), key-value buckets (`KV`, with per-key TTLs: leases are KV keys), and
streams (`JetStream`: publish with expectations, read back, consumers). Every method takes an
explicit timeout and says what it guarantees. Implementations translate their library's errors
inside each method (`engine/_nats.py` for NATS, `engine/memory.py` for unit tests), so nothing but
the errors named here — accord's own, plus the internal signals below — crosses the seam.

Errors every method may raise besides those it names: `NotConnected` (the engine is unreachable or
did not answer within the timeout; for a write, it may or may not have been applied) and `Refused`
(the engine answered with an error: not applied). A missing stream or bucket is `NotFound`. A write
(or a creation) the engine has no room for is `StorageFull` (not applied).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import msgspec

# -- internal signals (never reach a user: the layer above turns them into accord errors) ------


class NoResponders(Exception):
    """Nobody subscribes to the subject right now (e.g. a shard between two owners): the request
    was certainly not delivered."""


class RequestTimeout(Exception):
    """The request was sent and no reply came in time: the outcome is unknown."""


class WrongRevision(Exception):
    """A conditional write found another revision than it expected (a key already present for
    `create`, changed for `update`, a stream subject with a newer last sequence): not applied."""


class NotFound(Exception):
    """The bucket, stream or consumer does not exist."""


class Refused(Exception):
    """The engine answered with an error other than those named (a limit reached, a config it
    rejects, a second consumer on a work-queue subject): certainly not applied."""


# -- core messaging -------------------------------------------------------------------------


class Message(Protocol):
    """One message as delivered by a subscription or as a reply."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


Handler = Callable[[Message], Awaitable[None]]
DirectHandler = Callable[[Message], None]


class Subscription(Protocol):
    async def unsubscribe(self) -> None:
        """Stop delivery now; messages not yet handed to the handler are dropped."""

    async def drain(self) -> None:
        """Stop taking new messages and return once those already received were handled."""


class Transport(Protocol):
    """Core messaging: subjects, requests with replies, queue groups. At most once."""

    name: str

    @property
    def max_payload(self) -> int:
        """The largest message the engine accepts, in bytes."""

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """Send `data` and return the reply's data.

        Raises `NoResponders` (nobody subscribes: not delivered), `RequestTimeout` (sent, no reply
        within `timeout`: outcome unknown) or `NotConnected` (not sent, or unknown). A late reply
        is dropped. On cancellation the request may or may not have been delivered.
        """

    async def request_msg(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Message:
        """`request` with headers, returning the whole reply message."""

    async def publish(
        self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Hand `data` to the connection (buffered): it may or may not be delivered.

        Raises `NotConnected` when the connection is closed or its buffer is full.
        """

    async def bounce(self, reply: str) -> None:
        """Answer the request waiting on `reply` with "not delivered": its `request` raises
        `NoResponders`, as if nobody had subscribed, so its sender tries again. Only for a
        request the responder knows never ran (queued when its shard's lease was lost)."""

    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> Subscription:
        """Run `cb` for every message on `subject` (one task per subscription, arrival order).

        With `queue`, each message goes to one member of the queue group.
        """

    async def subscribe_direct(self, subject: str, fn: DirectHandler) -> Subscription:
        """Run the non-blocking `fn` for every message, in arrival order, in the read loop.

        Whatever `fn` raises is logged and the message dropped; saves a queue and a task hop per
        message over `subscribe`.
        """

    def new_inbox(self) -> str:
        """A subject unique to this connection, for replies."""

    async def flush(self, timeout: float) -> None:
        """Return once the server has received everything published so far (`NotConnected` if
        not within `timeout`)."""

    async def close(self) -> None:
        """Drain and close the connection; idempotent."""

    def cluster_size(self) -> int:
        """How many servers the engine runs on, as far as this connection was told (1 for a
        single server); decides default replica counts."""

    async def reply_inbox(self) -> tuple[str, asyncio.Future[Message]]:
        """A fresh reply subject on this connection's shared inbox, and the future that the
        first message to it resolves: for a reply that comes later than a request's, sent by
        whoever handles a stored message whose envelope names the subject (durable asks).

        The future does not time out by itself: the caller bounds the wait (cancel the future or
        set an exception on it). Once the future is done the subject is forgotten, and a later
        message to it is dropped.
        """


# -- key-value buckets ------------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True):
    """One key's value at one revision. `deleted` marks a delete, a purge or a TTL expiry."""

    key: str
    value: bytes
    revision: int
    deleted: bool = False


class Watch(Protocol):
    """A running watch of a bucket's keys (see `KV.watch`)."""

    async def next(self, timeout: float) -> Entry | None:
        """The next change. None once, after every key's current value was delivered.

        Raises `RequestTimeout` when nothing arrived within `timeout` (the caller may restart a
        watch that went silent) and `NotConnected` when the watch ended.
        """

    async def stop(self) -> None:
        """End the watch; idempotent, never raises."""


class KV(Protocol):
    """A bucket of keys, each with a revision that only grows. Conditional writes make leases,
    fencing and counters; a per-key TTL (whole seconds) makes a key expire on its own."""

    name: str

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        """The key's latest value, or None when it is absent, deleted or expired.

        `leader=True` reads from the stream leader, never a replica that may lag behind (use it
        where a stale read would be acted upon). Without it a replica may answer (so a node cut
        off from the leader can still read), possibly an older value.
        """

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        """Write unconditionally; return the new revision. `ttl` > 0: the key expires after `ttl`
        seconds (the bucket needs `marker_ttl` > 0 for the expiry to be seen by watches)."""

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        """Write iff the key is absent, deleted or expired; else `WrongRevision`. The returned
        revision grows with every successful create of the key: it serves as a fencing token."""

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        """Write iff the key's revision is still `last` (compare-and-set); else `WrongRevision`.
        With `ttl`, this also refreshes the key's expiry (renews a lease)."""

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        """Delete the key (iff its revision is `last`, when given: else `WrongRevision`)."""

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        """Remove the key and its history."""

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        """Every live key, sorted (an empty list for an empty bucket)."""

    async def watch(self, pattern: str = ">", *, timeout: float = 5.0) -> Watch:
        """Watch the keys matching `pattern`: current values first, then every change
        (`timeout` bounds starting the watch)."""


# -- streams ---------------------------------------------------------------------------------

Storage = Literal["file", "memory"]


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What accord asks of one stream. Limits of 0 mean none; a `duplicate_window` of 0 means the
    engine's default (2 minutes on NATS), not "no deduplication". At a limit the oldest messages
    are dropped, unless `discard_new`: then an append is refused with `StorageFull` (a stream of
    data that must not be lost). `memory` storage is lost when the (single) server restarts."""

    name: str
    subjects: tuple[str, ...]
    replicas: int = 1
    storage: Storage = "file"
    work_queue: bool = False
    max_msgs: int = 0
    max_bytes: int = 0
    max_age: float = 0.0
    duplicate_window: float = 0.0
    max_msgs_per_subject: int = 0
    discard_new: bool = False


class BucketSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What accord asks of one KV bucket. `marker_ttl` > 0 enables per-key TTLs, and the server
    leaves a marker (kept that long) when a key expires. A write beyond `max_bytes` (0: none) is
    refused with `StorageFull`. `first_seq` > 0: the first revision a new bucket hands out (a
    `memory` bucket re-created after a restart must not reuse revisions used as fencing tokens)."""

    name: str
    replicas: int = 1
    storage: Storage = "file"
    history: int = 1
    max_bytes: int = 0
    marker_ttl: int = 0
    first_seq: int = 0


class StreamState(msgspec.Struct, frozen=True):
    """A stream's (or bucket's) configuration and size as the engine reports it."""

    name: str
    replicas: int
    messages: int
    bytes: int
    leader: str = ""


class PubAck(msgspec.Struct, frozen=True):
    """A stored message's stream and sequence; `duplicate`: an earlier append with the same
    `msg_id` stored it (at `seq`)."""

    stream: str
    seq: int
    duplicate: bool = False


class StoredMessage(msgspec.Struct, frozen=True):
    """A message as the stream keeps it (KV tombstones and expiry markers included)."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


class Delivery(Protocol):
    """A message handed out by a consumer; it is redelivered until acknowledged."""

    data: bytes
    subject: str
    headers: dict[str, str] | None
    seq: int  # the stream's sequence number of the message
    num_delivered: int  # 1 on the first delivery

    async def ack(self) -> None:
        """Done with it: never delivered again (best effort: an ack lost on the way means one
        more delivery)."""

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver it again after `delay` seconds."""

    async def in_progress(self) -> None:
        """Still working on it: restart its ack-wait."""


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable pull consumer over one subject filter, explicit acks."""

    name: str
    filter_subject: str
    ack_wait: float = 30.0
    max_ack_pending: int = 4096
    inactive_threshold: float = 3600.0
    start_seq: int = 0  # > 0: deliver from this stream sequence on, not from the first stored


class ConsumerState(msgspec.Struct, frozen=True):
    """A durable consumer's progress: every message at or below `ack_floor` (a stream sequence)
    is acknowledged; `pending`: matching messages not yet delivered; `ack_pending`: delivered
    and not yet acknowledged; `redelivered`: of those, how many were delivered more than once."""

    name: str
    ack_floor: int
    pending: int
    ack_pending: int
    redelivered: int


class Consumer(Protocol):
    """A running pull loop: deliveries go to `dispatch` in stream order, while it returns True."""

    async def stop(self) -> None:
        """End the loop; deliveries not yet acknowledged are delivered again (to the next
        consumer, or to this one after their ack-wait)."""


#: Called for each delivery from the read loop; False means "stop consuming" (the caller lost
#: the right to consume, e.g. its lease).
Dispatch = Callable[[Delivery], bool]


class JetStream(Protocol):
    """Durable streams and buckets."""

    async def bucket(self, spec: BucketSpec, *, create: bool = True, timeout: float = 5.0) -> KV:
        """Open the bucket, creating it as `spec` says if missing. Concurrent creators all get
        the same bucket. With `create=False` a missing bucket raises `NotFound`."""

    async def ensure_stream(self, spec: StreamSpec, *, timeout: float = 5.0) -> None:
        """Create the stream if missing (concurrent creators are fine); an existing one is kept
        as it is."""

    async def stream_state(self, name: str, *, timeout: float = 5.0) -> StreamState | None:
        """The stream's replicas and size, None if it does not exist."""

    async def set_replicas(self, name: str, replicas: int, *, timeout: float = 5.0) -> None:
        """Change the stream's replica count (the engine moves data as needed)."""

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        expect_last_subject_seq: int | None = None,
        ttl: int = 0,
        timeout: float = 5.0,
    ) -> PubAck:
        """Store `data` in the stream that captures `subject`; return once it is stored.

        `msg_id`: a publish with an id seen within the stream's duplicate window is stored once
        (`PubAck.duplicate`). `expect_last_subject_seq`: store only if the subject's last
        sequence is that (0: no message yet), else `WrongRevision`. `ttl` > 0: the message is
        removed after `ttl` seconds (the stream must allow per-message TTLs, as buckets do).
        Raises `RequestTimeout` when the store was not confirmed in time (it may or may not be
        stored; retry with the same `msg_id`), `NoResponders` when no stream captures the subject.
        """

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        after: bool = False,
        timeout: float = 5.0,
    ) -> StoredMessage | None:
        """A stored message: at `seq`; the last one on `subject`; or with `after`, the first at
        or after `seq` (on `subject`, if given; wildcards allowed). None when there is none;
        `NotFound` when the stream does not exist. Read from the stream leader."""

    async def delete_message(self, stream: str, seq: int, *, timeout: float = 5.0) -> bool:
        """Remove one message; False if there was none at `seq`."""

    async def purge(self, stream: str, *, subject: str | None = None, timeout: float = 5.0) -> int:
        """Remove every message (on `subject`, if given); return how many were removed."""

    async def ensure_consumer(
        self, stream: str, spec: ConsumerSpec, *, timeout: float = 5.0
    ) -> None:
        """Create the durable consumer (delivering from the first message still stored); an
        existing one of that name is kept. `Refused` when the stream does not take it, e.g. a
        work queue where another consumer filters the same subject."""

    async def delete_consumer(self, stream: str, name: str, *, timeout: float = 5.0) -> bool:
        """False if it did not exist."""

    async def consumers(self, stream: str, *, timeout: float = 5.0) -> dict[str, str]:
        """The stream's consumers: name -> filter subject."""

    async def consume(
        self,
        stream: str,
        consumer: str,
        dispatch: Dispatch,
        *,
        has_capacity: Callable[[], Awaitable[None]],
        still_going: Callable[[], bool],
        batch: int = 128,
    ) -> Consumer:
        """Start pulling from a durable consumer: at most `batch` messages are outstanding, no
        new ones are requested while `has_capacity` waits or after `still_going` turns False or
        `dispatch` returned False. `dispatch` runs in the connection's read loop: it must not
        block (hand the delivery to a task). `NotFound` when the consumer does not exist."""

    async def tail(
        self, stream: str, subject: str, last: int, *, within: int = 0, timeout: float = 5.0
    ) -> list[StoredMessage]:
        """The last `last` messages stored on `subject` (wildcards allowed), oldest first.

        With `within` > 0, only the stream's latest `within` messages are searched (bounds the
        cost for a rare subject in a long stream). `NotFound` if the stream does not exist.
        """

    async def reservable_bytes(self, *, replicas: int = 1, timeout: float = 10.0) -> int:
        """How many bytes of file storage a new stream of `replicas` could still reserve as its
        byte limit (the engine's storage limit less what other streams reserved), to within an
        eighth; 0 when the engine sets no limit (or a TiB is free). `NotConnected` when the
        engine did not answer in `timeout`."""

    async def consumer_info(
        self, stream: str, name: str, *, timeout: float = 5.0
    ) -> ConsumerState | None:
        """The durable consumer's progress, None if it (or its stream) does not exist."""


class Engine(Transport, JetStream, Protocol):
    """One connection to the engine: messaging and streams."""
