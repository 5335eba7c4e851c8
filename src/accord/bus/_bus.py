"""`accord.bus.connect()` and `Bus`: publish, subscribe, route, on whichever backend the URL names.

`nats://…` (or None: the cluster's own NATS) is the JetStream backend, `redis://…` Redis Streams.
Routing to agents needs a `Mesh`: the one passed in, or one connected to the cluster's NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
import typing
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from .. import _codec as codec
from .._errors import ConfigurationError, RemoteError
from .._mesh import Mesh
from ._api import Backend, BusDeadLetter, Delivery, Event, GroupStats, PublishAck, check_name
from ._consumer import ConsumerSettings, GroupConsumer, Poison

HandlerFn = Callable[..., Awaitable[None]]


class Subscription:
    """A running consumer of one group; `stop()` ends it (also on leaving `async with`)."""

    def __init__(self, consumer: GroupConsumer) -> None:
        self._consumer = consumer

    @property
    def handled(self) -> int:
        """Events this consumer handled (or dead-lettered) and acknowledged."""
        return self._consumer.handled

    @property
    def partitions(self) -> list[int]:
        """The partitions this consumer holds right now."""
        return sorted(self._consumer.held)

    async def stop(self) -> None:
        """Finish the handlings under way and acknowledge them; the rest stays pending for the
        group's other consumers. Idempotent."""
        await self._consumer.stop()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _decoder(handler: HandlerFn) -> tuple[Callable[[bytes], Any], bool]:
    """Decode by the first parameter's annotation (any JSON value without one); whether the
    handler takes the `Delivery` as second argument."""
    params = list(inspect.signature(handler).parameters.values())
    if not params:
        raise ConfigurationError("a bus handler takes the message (and the Delivery)")
    try:
        hints = typing.get_type_hints(handler)
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve the handler's annotations: {exc}") from None
    target = hints.get(params[0].name, Any)
    dec = msgspec.json.Decoder(target)
    return dec.decode, len(params) > 1


class Bus:
    """A connection to one bus backend. Publishing is safe from many tasks at once."""

    def __init__(
        self, backend: Backend, *, partitions: int = 8, mesh: Mesh | None = None,
        mesh_factory: Callable[[], contextlib.AbstractAsyncContextManager[Mesh]] | None = None,
    ) -> None:  # fmt: skip
        if partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        self.backend = backend
        self._default_partitions = partitions
        self._partitions: dict[str, int] = {}
        self._resolving: dict[str, asyncio.Task[int]] = {}
        self._subs: list[Subscription] = []
        self._mesh = mesh
        self._mesh_factory = mesh_factory
        self._stack = contextlib.AsyncExitStack()

    @property
    def kind(self) -> str:
        """ "jetstream" or "redis"."""
        return self.backend.kind

    async def _partitions_of(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is not None:
            return n
        # One lookup per topic however many publishes wait for it: at 5,000/s a slow first
        # lookup (a loaded server) had thousands of publishes each create the stream and read
        # the topic's record, which kept the server from answering any of them within 5 s.
        task = self._resolving.get(topic)
        if task is None:
            task = asyncio.create_task(self.backend.partitions(topic, self._default_partitions))
            self._resolving[topic] = task
            task.add_done_callback(lambda _t: self._resolving.pop(topic, None))
        n = self._partitions[topic] = await asyncio.shield(task)  # a failure: the next retries
        return n

    async def publish(self, topic: str, msg: Any, *, key: str | None = None) -> PublishAck:
        """Store `msg` (a msgspec struct, or any JSON-encodable value) on `topic`.

        Returns only once the store confirmed it (see `PublishAck.durable` / `loss_window`).
        Events with the same `key` are handled in publish order within each group; without a
        key the event goes to any partition. Raises `PublishUnconfirmed` when the store did not
        confirm it (it may or may not be stored) and `BusUnavailable` when the store cannot be
        reached. On cancellation the event may or may not be stored.
        """
        type_name = codec.message_type_name(type(msg))
        try:
            body = msgspec.json.encode(msg)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ConfigurationError(f"cannot encode the event as JSON: {exc}") from None
        return await self.publish_json(topic, type_name, body, key=key)

    async def publish_json(
        self, topic: str, type_name: str, body: bytes, *, key: str | None = None
    ) -> PublishAck:
        """`publish` with a JSON body named by its wire type (for the CLI and tools)."""
        check_name("topic", topic)
        event_id = os.urandom(16).hex()  # 128 random bits, like uuid4 but a third of its cost
        k = key if key is not None else ""
        n = await self._partitions_of(topic)
        partition = zlib.crc32((k or event_id).encode()) % n
        event = Event(event_id, k, type_name, body, time.time())
        return await self.backend.append(topic, partition, event)

    async def subscribe(
        self,
        topic: str,
        *,
        group: str,
        handler: HandlerFn,
        max_deliver: int = 5,
        max_concurrency: int = 64,
        min_idle: float = 5.0,
    ) -> Subscription:
        """Consume `topic` as a member of `group`; returns once this consumer has taken its
        first partitions (it may hold none while others do).

        Consumers of one group share the events; every group gets every event (a new group
        starts from the oldest event still stored). At least once: an event is acknowledged after
        `handler(msg, delivery)` returns; a raise is retried with backoff, up to `max_deliver`
        attempts, then the event goes to the dead letters (`accord dlq list --bus`), as does an
        event whose body does not decode to the handler's annotation. Same-key events are handled
        one at a time in publish order; different keys concurrently, at most `max_concurrency`.
        A consumer silent for `min_idle` seconds has its partitions and pending events taken over.
        """
        check_name("topic", topic)
        check_name("group", group)
        if max_deliver < 1 or max_concurrency < 1 or min_idle <= 0:
            raise ConfigurationError("max_deliver, max_concurrency and min_idle must be positive")
        decode, with_delivery = _decoder(handler)

        async def handle(ev: Event, d: Delivery) -> None:
            try:
                msg = decode(ev.body)
            except msgspec.DecodeError as exc:
                raise Poison(f"body does not decode: {exc}") from None
            await (handler(msg, d) if with_delivery else handler(msg))

        settings = ConsumerSettings(
            max_deliver=max_deliver, max_concurrency=max_concurrency, min_idle=min_idle
        )
        return await self._start(topic, group, handle, settings)

    async def route(
        self,
        topic: str,
        *,
        group: str,
        agent_type: str,
        max_deliver: int = 5,
        max_concurrency: int = 64,
        min_idle: float = 5.0,
        timeout: float = 30.0,
    ) -> Subscription:
        """Deliver each event of `topic` to the agent `agent_type/<key>` (an ask with the agent's
        delivery mode and the message id `bus:<topic>:<group>:<event id>`) and acknowledge it
        after the agent's turn. An `exactly_once` agent therefore handles each event once even
        when the bus redelivers it; other modes may see a redelivered event again. A failed or
        timed-out ask is retried like a failed handler, then dead-lettered."""
        check_name("topic", topic)
        check_name("group", group)
        mesh = await self._mesh_for_route()

        async def handle(ev: Event, d: Delivery) -> None:
            if not ev.key:
                raise Poison("an event without a key names no agent")
            try:
                await mesh.ask_json(
                    f"{agent_type}/{ev.key}", ev.type, ev.body, timeout=timeout,
                    msg_id=f"bus:{topic}:{group}:{ev.id}",
                )  # fmt: skip
            except RemoteError as exc:
                raise RuntimeError(f"agent {agent_type}/{ev.key}: {exc}") from None

        settings = ConsumerSettings(
            max_deliver=max_deliver, max_concurrency=max_concurrency, min_idle=min_idle
        )
        return await self._start(topic, group, handle, settings)

    async def _mesh_for_route(self) -> Mesh:
        if self._mesh is None:
            if self._mesh_factory is None:
                raise ConfigurationError("route needs a Mesh: pass mesh= to accord.bus.connect")
            self._mesh = await self._stack.enter_async_context(self._mesh_factory())
        return self._mesh

    async def _start(
        self,
        topic: str,
        group: str,
        handle: Callable[[Event, Delivery], Awaitable[None]],
        settings: ConsumerSettings,
    ) -> Subscription:
        n = await self._partitions_of(topic)
        consumer = GroupConsumer(self.backend, topic, group, n, handle, settings)
        await consumer.start()
        sub = Subscription(consumer)
        self._subs.append(sub)
        return sub

    async def remove_group(self, topic: str, group: str) -> None:
        """Forget `group` on `topic`: its position and pending events on every partition (a
        consumer subscribing under that name later starts from the oldest stored event). On
        Redis a left-behind group also holds back trimming. Stop the group's consumers first:
        `ConfigurationError` if one of this bus's subscriptions still consumes it."""
        check_name("topic", topic)
        check_name("group", group)
        for sub in self._subs:
            c = sub._consumer
            if (c.topic, c.group) == (topic, group) and not c.stopped:
                raise ConfigurationError(f"group {group} of {topic} still consumes: stop it first")
        await self.backend.remove_group(topic, group, await self._partitions_of(topic))

    async def dead_letters(self, limit: int = 1000) -> list[BusDeadLetter]:
        """The oldest `limit` dead letters of every topic and group."""
        return await self.backend.dead_letters(limit)

    async def replay(self, letter_id: str) -> str:
        """Publish a dead letter again, for its group only (other groups skip it), under a new
        event id; then remove it from the dead letters. Returns the new event id. A replay
        whose removal fails leaves the letter listed (replaying it again publishes it again)."""
        letter = next((x for x in await self.backend.dead_letters(100_000) if x.id == letter_id),
                      None)  # fmt: skip
        if letter is None:
            raise ConfigurationError(f"no bus dead letter with id {letter_id}")
        n = await self._partitions_of(letter.topic)
        new_id = f"{letter.event_id}-r{uuid.uuid4().hex[:8]}"
        event = Event(new_id, letter.key, letter.type, letter.body, time.time(), only=letter.group)
        partition = zlib.crc32((letter.key or new_id).encode()) % n
        await self.backend.append(letter.topic, partition, event)
        await self.backend.remove_dead_letter(letter_id)
        return new_id

    async def purge_dead_letter(self, letter_id: str) -> bool:
        """Delete one dead letter for good; False if there was none with that id."""
        return await self.backend.remove_dead_letter(letter_id)

    async def stats(self) -> list[GroupStats]:
        """Per topic and group: published, pending, oldest pending age, redeliveries, dead
        letters (see `GroupStats`)."""
        return await self.backend.stats()

    async def close(self) -> None:
        """Stop every subscription, then close the backend (and a Mesh the bus opened)."""
        for sub in self._subs:
            await sub.stop()
        self._subs.clear()
        await self._stack.aclose()
        await self.backend.close()


@contextlib.asynccontextmanager
async def connect(
    url: str | None = None,
    *,
    partitions: int = 8,
    mesh: Mesh | None = None,
    nats: str | None = None,
) -> AsyncIterator[Bus]:
    """A `Bus` on `url`: `redis://host:port[/db]` (Redis Streams), `nats://…` (JetStream), or
    None (the cluster's NATS: $ACCORD_NATS, else the one `accord up` runs).

    `partitions`: how many partitions a topic this bus creates gets (fixed by its first
    publisher or subscriber). `route` delivers through `mesh`, else through a Mesh connected to
    `nats` (default: the bus's own NATS, or the cluster's for a Redis bus). Raises
    `BusUnavailable` when the store cannot be reached, `ConfigurationError` for a bad URL.
    """
    from .. import _connect

    backend: Backend
    if url is not None and url.startswith(("redis://", "rediss://", "unix://")):
        from ._redis import RedisBackend

        backend = await RedisBackend.connect(url)
        mesh_url = nats
    else:
        from ._jetstream import JetStreamBackend

        backend = await JetStreamBackend.connect(url)
        mesh_url = nats or url

    def mesh_factory() -> contextlib.AbstractAsyncContextManager[Mesh]:
        return _connect.connect(mesh_url)

    try:
        bus = Bus(backend, partitions=partitions, mesh=mesh, mesh_factory=mesh_factory)
    except BaseException:
        await backend.close()
        raise
    try:
        yield bus
    finally:
        await bus.close()
