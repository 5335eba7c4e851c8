"""The in-memory engine's own features, beyond the shared contract (tests/contract): time on the
injected clock, faults injected per connection, and connections sharing one server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from accord import AccordError, NotConnected
from accord._clock import VirtualClock
from accord.engine._api import (
    BucketSpec,
    ConsumerSpec,
    Delivery,
    Engine,
    Message,
    StreamSpec,
    WrongRevision,
)
from accord.engine.memory import MemoryEngine


async def _ready() -> None:
    return None


async def test_ttl_is_judged_on_the_injected_clock() -> None:
    """A key with a 5 s TTL is present until the virtual clock passes 5 s, and absent after,
    however long the test really takes; the marker itself goes after `marker_ttl`."""
    clock = VirtualClock()
    eng = MemoryEngine(clock=clock)
    kv = await eng.bucket(BucketSpec(name="leases", marker_ttl=2))
    await kv.create("k", b"v", ttl=5)
    await clock.advance(4.9)
    assert await kv.get("k") is not None
    await clock.advance(0.2)
    assert await kv.get("k") is None
    state = await eng.stream_state("KV_leases")
    assert state is not None and state.messages == 1  # the expiry marker
    await clock.advance(2.1)
    state = await eng.stream_state("KV_leases")
    assert state is not None and state.messages == 0


async def test_renewal_pushes_the_expiry_back() -> None:
    """`update` with a TTL restarts it: the key outlives its first TTL."""
    clock = VirtualClock()
    kv = await MemoryEngine(clock=clock).bucket(BucketSpec(name="b", marker_ttl=1))
    rev = await kv.create("k", b"v", ttl=3)
    await clock.advance(2)
    await kv.update("k", b"v", rev, ttl=3)
    await clock.advance(2)
    assert await kv.get("k") is not None
    await clock.advance(1.5)
    assert await kv.get("k") is None


async def test_duplicate_window_on_the_clock() -> None:
    """A msg id is deduplicated within the window and stored anew after it."""
    clock = VirtualClock()
    eng = MemoryEngine(clock=clock)
    await eng.ensure_stream(StreamSpec(name="s", subjects=("s.>",), duplicate_window=10))
    first = await eng.append("s.a", b"1", msg_id="m")
    assert (await eng.append("s.a", b"1", msg_id="m")).duplicate
    await clock.advance(11)
    again = await eng.append("s.a", b"1", msg_id="m")
    assert not again.duplicate and again.seq > first.seq


def _every_call(eng: Engine) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    async def cb(msg: Message) -> None:
        return None

    spec = ConsumerSpec(name="c", filter_subject="s.a")
    return [
        ("request", lambda: eng.request("x", b"", 1)),
        ("publish", lambda: eng.publish("x", b"")),
        ("subscribe", lambda: eng.subscribe("x", cb)),
        ("subscribe_direct", lambda: eng.subscribe_direct("x", lambda m: None)),
        ("flush", lambda: eng.flush(1)),
        ("bucket", lambda: eng.bucket(BucketSpec(name="b"))),
        ("ensure_stream", lambda: eng.ensure_stream(StreamSpec(name="t", subjects=("t",)))),
        ("stream_state", lambda: eng.stream_state("s")),
        ("set_replicas", lambda: eng.set_replicas("s", 3)),
        ("append", lambda: eng.append("s.a", b"")),
        ("get_message", lambda: eng.get_message("s", seq=1)),
        ("delete_message", lambda: eng.delete_message("s", 1)),
        ("purge", lambda: eng.purge("s")),
        ("ensure_consumer", lambda: eng.ensure_consumer("s", spec)),
        ("delete_consumer", lambda: eng.delete_consumer("s", "c")),
        ("consumers", lambda: eng.consumers("s")),
        (
            "consume",
            lambda: eng.consume(
                "s", "c", lambda d: True, has_capacity=_ready, still_going=lambda: True
            ),
        ),
    ]


async def test_down_makes_every_call_raise_not_connected() -> None:
    """While a connection is down every engine and bucket method raises `NotConnected`; after
    `up()` they work again."""
    eng = MemoryEngine(clock=VirtualClock())
    await eng.ensure_stream(StreamSpec(name="s", subjects=("s.>",)))
    kv = await eng.bucket(BucketSpec(name="b"))
    watch = await kv.watch()
    eng.down()
    kv_calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("kv.get", lambda: kv.get("k")),
        ("kv.put", lambda: kv.put("k", b"")),
        ("kv.create", lambda: kv.create("k", b"")),
        ("kv.update", lambda: kv.update("k", b"", 1)),
        ("kv.delete", lambda: kv.delete("k")),
        ("kv.purge", lambda: kv.purge("k")),
        ("kv.keys", lambda: kv.keys()),
        ("kv.watch", lambda: kv.watch()),
        ("watch.next", lambda: watch.next(1)),
    ]
    for name, call in [*_every_call(eng), *kv_calls]:
        try:
            await call()
        except NotConnected:
            continue
        raise AssertionError(f"{name} did not raise NotConnected while down")
    eng.up()
    await kv.put("k", b"v")
    assert await eng.stream_state("s") is not None


async def test_fail_next_injects_one_failure() -> None:
    """`fail_next` fails exactly the next call(s) of one method, with the error given."""
    eng = MemoryEngine(clock=VirtualClock())
    kv = await eng.bucket(BucketSpec(name="b"))
    eng.fail_next("kv.create", WrongRevision("injected"), times=2)
    for _ in range(2):
        with pytest.raises(WrongRevision):
            await kv.create("k", b"")
    await kv.create("k", b"")
    eng.fail_next("append")
    with pytest.raises(AccordError):
        await eng.append("nowhere", b"")


async def test_connections_share_a_server_and_fail_alone() -> None:
    """Two connections see the same buckets and subjects; one that is down gets no messages and
    its consumer pauses, then resumes after `up()`."""
    clock = VirtualClock()
    a = MemoryEngine(name="a", clock=clock)
    b = a.connect("b")
    await (await a.bucket(BucketSpec(name="shared"))).put("k", b"from-a")
    got = await (await b.bucket(BucketSpec(name="shared"))).get("k")
    assert got is not None and got.value == b"from-a"

    seen: list[bytes] = []
    await b.subscribe_direct("news", lambda m: seen.append(m.data))
    b.down()
    await a.publish("news", b"lost")
    await a.ensure_stream(StreamSpec(name="wq", subjects=("wq.*",), work_queue=True))
    await a.ensure_consumer("wq", ConsumerSpec(name="c", filter_subject="wq.1"))
    b.up()
    delivered: list[Delivery] = []

    def dispatch(d: Delivery) -> bool:
        delivered.append(d)
        return True

    consumer = await b.consume("wq", "c", dispatch, has_capacity=_ready, still_going=lambda: True)
    b.down()
    await a.append("wq.1", b"m")
    await clock.advance(1)
    assert delivered == []
    b.up()
    await clock.advance(0.1)
    await a.publish("news", b"kept")
    await clock.advance(0.1)
    await consumer.stop()
    assert [d.data for d in delivered] == [b"m"]
    assert seen == [b"kept"]


async def test_queue_group_handlers_run_in_order() -> None:
    """A subscription's handler runs one message at a time, in arrival order."""
    eng = MemoryEngine(clock=VirtualClock())
    order: list[bytes] = []
    done = asyncio.Event()

    async def slow(msg: Message) -> None:
        await asyncio.sleep(0)
        order.append(msg.data)
        if len(order) == 5:
            done.set()

    await eng.subscribe("q", slow, queue="workers")
    for i in range(5):
        await eng.publish("q", b"%d" % i)
    await asyncio.wait_for(done.wait(), 5)
    assert order == [b"%d" % i for i in range(5)]


async def test_an_ack_sent_while_down_is_lost() -> None:
    """An ack from a cut-off connection does not reach the server: the message comes again
    after its ack-wait, as on NATS."""
    clock = VirtualClock()
    eng = MemoryEngine(clock=clock)
    await eng.ensure_stream(StreamSpec(name="wq", subjects=("wq.*",), work_queue=True))
    await eng.append("wq.1", b"m")
    await eng.ensure_consumer("wq", ConsumerSpec(name="c", filter_subject="wq.1", ack_wait=5))
    got: list[Delivery] = []

    def dispatch(d: Delivery) -> bool:
        got.append(d)
        return True

    consumer = await eng.consume("wq", "c", dispatch, has_capacity=_ready, still_going=lambda: True)
    await clock.advance(0.1)
    assert len(got) == 1
    eng.down()
    await got[0].ack()
    eng.up()
    await clock.advance(5.1)
    assert [d.num_delivered for d in got] == [1, 2]
    await got[1].ack()
    state = await eng.stream_state("wq")
    assert state is not None and state.messages == 0
    await consumer.stop()
