"""The engine contract (`accord/engine/_api.py`), run against both implementations: the in-memory
engine on a virtual clock, and the NATS engine on a real nats-server.

Time is the harness's: `until` polls a condition, moving the virtual clock forward between polls
for the memory engine and waiting in real time (with a deadline) for NATS, so the same test proves
TTL expiry, ack-wait redelivery and timeouts on both.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from accord import NotConnected
from accord._clock import VirtualClock
from accord.engine._api import (
    BucketSpec,
    ConsumerSpec,
    Delivery,
    Engine,
    Message,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StreamSpec,
    WrongRevision,
)
from accord.engine._nats import NatsTransport
from accord.engine.memory import MemoryEngine

_serials = itertools.count(1)


class Harness:
    def __init__(self, engine: Engine, clock: VirtualClock | None) -> None:
        self.engine = engine
        self.clock = clock

    async def until(
        self, cond: Callable[[], Awaitable[bool] | bool], what: str, within: float = 10.0
    ) -> None:
        """Poll `cond` until true; `within` seconds of the engine's time, else fail."""
        waited = 0.0
        while True:
            got = cond()
            if not isinstance(got, bool):
                got = await got
            if got:
                return
            if waited > within:
                raise AssertionError(f"not within {within}s: {what}")
            if self.clock is not None:
                await self.clock.advance(0.25)
                waited += 0.25
            else:
                await asyncio.sleep(0.05)
                waited += 0.05


@pytest.fixture(params=["memory", "nats"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = VirtualClock()
        mem = MemoryEngine(clock=clock)
        yield Harness(mem, clock)
        await mem.close()
        return
    url = request.getfixturevalue("nats_url")
    nats = await NatsTransport.connect([url], "contract")
    try:
        yield Harness(nats, None)
    finally:
        await nats.close()


def _name(what: str) -> str:
    return f"ct{what}{next(_serials)}"


async def _ready() -> None:
    return None


def _true() -> bool:
    return True


# -- core messaging ------------------------------------------------------------------------


async def test_request_reply_queue_groups_and_no_responders(h: Harness) -> None:
    """Replies come back; a queue group answers once per request; nobody listening is
    `NoResponders`; `*` and `>` match one and several tokens."""
    eng, base = h.engine, _name("rr")
    answered: list[str] = []

    def responder(tag: str) -> Callable[[Message], Awaitable[None]]:
        async def cb(msg: Message) -> None:
            answered.append(tag)
            await eng.publish(msg.reply, tag.encode() + b":" + msg.data)

        return cb

    await eng.subscribe(f"{base}.svc.*", responder("a"), queue="q")
    await eng.subscribe(f"{base}.svc.*", responder("b"), queue="q")
    seen: list[str] = []
    await eng.subscribe_direct(f"{base}.>", lambda m: seen.append(m.subject))
    await eng.flush(2)
    for i in range(4):
        reply = await eng.request(f"{base}.svc.x", b"%d" % i, 2.0)
        assert reply.endswith(b":%d" % i)
    assert len(answered) == 4 and set(answered) <= {"a", "b"}
    await h.until(lambda: len(seen) == 4, "the wildcard subscriber saw every request")
    with pytest.raises(NoResponders):
        await eng.request(f"{_name('none')}.x", b"", 2.0)


async def test_request_without_reply_times_out(h: Harness) -> None:
    """A subscriber that never answers makes the request raise `RequestTimeout`."""
    eng, subject = h.engine, _name("silent")

    async def ignore(msg: Message) -> None:
        return None

    await eng.subscribe(subject, ignore)
    await eng.flush(2)
    task = asyncio.create_task(eng.request(subject, b"", 0.5))
    await h.until(task.done, "the request ended")
    with pytest.raises(RequestTimeout):
        task.result()


# -- KV ------------------------------------------------------------------------------------


async def test_kv_conditional_writes(h: Harness) -> None:
    """create iff absent, update iff at `last`, delete iff at `last`; revisions only grow and a
    deleted key is absent and creatable again."""
    kv = await h.engine.bucket(BucketSpec(name=_name("kv")))
    r1 = await kv.create("a", b"1")
    with pytest.raises(WrongRevision):
        await kv.create("a", b"x")
    with pytest.raises(WrongRevision):
        await kv.update("a", b"x", r1 + 100)
    r2 = await kv.update("a", b"2", r1)
    assert r2 > r1
    got = await kv.get("a")
    assert got is not None and (got.value, got.revision, got.deleted) == (b"2", r2, False)
    with pytest.raises(WrongRevision):
        await kv.delete("a", last=r1)
    await kv.delete("a", last=r2)
    assert await kv.get("a") is None and await kv.get("a", leader=True) is None
    r3 = await kv.create("a", b"3")
    assert r3 > r2
    await kv.put("b", b"b")
    await kv.put("c", b"c")
    await kv.purge("c")
    assert await kv.keys() == ["a", "b"]
    assert await kv.get("missing") is None
    with pytest.raises(NotFound):
        await h.engine.bucket(BucketSpec(name=_name("nobucket")), create=False)


async def test_kv_ttl_expiry_frees_the_key(h: Harness) -> None:
    """A key written with a TTL expires on its own; the marker left behind reads as absent, a
    watch sees it as a deletion, and `create` takes the key again with a higher revision. A renew
    (`update` with the TTL) is compare-and-set on the revision."""
    kv = await h.engine.bucket(BucketSpec(name=_name("ttl"), marker_ttl=1))
    r1 = await kv.create("lease", b"me", ttl=1)
    r2 = await kv.update("lease", b"me", r1, ttl=1)
    with pytest.raises(WrongRevision):
        await kv.update("lease", b"me", r1, ttl=1)
    watch = await kv.watch("lease")
    first = await watch.next(5)
    assert first is not None and first.revision == r2
    assert await watch.next(5) is None

    async def gone() -> bool:
        return await kv.get("lease", leader=True) is None

    await h.until(gone, "the lease expired")
    marker = await watch.next(5)
    assert marker is not None and marker.key == "lease" and marker.deleted
    await watch.stop()
    r3 = await kv.create("lease", b"you", ttl=1)
    assert r3 > r2
    assert await kv.keys() == ["lease"]


async def test_watch_current_values_then_changes(h: Harness) -> None:
    """A watch yields each key's current value, None once, then every change; silence is
    `RequestTimeout`."""
    kv = await h.engine.bucket(BucketSpec(name=_name("watch")))
    await kv.put("x.1", b"a")
    await kv.put("x.2", b"b")
    await kv.put("y.1", b"other")
    watch = await kv.watch("x.>")
    initial = [await watch.next(5), await watch.next(5)]
    assert [(e.key, e.value) for e in initial if e] == [("x.1", b"a"), ("x.2", b"b")]
    assert await watch.next(5) is None
    await kv.put("x.1", b"c")
    await kv.delete("x.2")
    await kv.put("y.1", b"ignored")
    changed = await watch.next(5)
    deleted = await watch.next(5)
    assert changed is not None and (changed.key, changed.value) == ("x.1", b"c")
    assert deleted is not None and (deleted.key, deleted.deleted) == ("x.2", True)
    task = asyncio.create_task(watch.next(0.5))
    await h.until(task.done, "the silent watch timed out")
    with pytest.raises(RequestTimeout):
        task.result()
    await watch.stop()
    await watch.stop()  # idempotent
    with pytest.raises(NotConnected):
        await watch.next(1)
    empty = await h.engine.bucket(BucketSpec(name=_name("empty")))
    assert await empty.keys() == []
    quiet = await empty.watch()
    assert await quiet.next(5) is None
    await quiet.stop()


# -- streams -------------------------------------------------------------------------------


async def _stream(h: Harness, **kw: Any) -> tuple[str, str]:
    name = _name("st")
    await h.engine.ensure_stream(StreamSpec(name=name, subjects=(f"{name}.>",), **kw))
    return name, f"{name}.a"


async def test_append_expectations_dedup_and_reads(h: Harness) -> None:
    """`expect_last_subject_seq` guards a subject; a repeated `msg_id` is stored once; stored
    messages read back by sequence, by subject and after a sequence; delete and purge."""
    eng = h.engine
    stream, subj = await _stream(h, duplicate_window=60)
    a1 = await eng.append(subj, b"1", expect_last_subject_seq=0, headers={"k": "v"})
    with pytest.raises(WrongRevision):
        await eng.append(subj, b"x", expect_last_subject_seq=0)
    a2 = await eng.append(subj, b"2", expect_last_subject_seq=a1.seq, msg_id="m2")
    dup = await eng.append(subj, b"2", msg_id="m2")
    assert (dup.seq, dup.duplicate, a2.duplicate) == (a2.seq, True, False)
    b1 = await eng.append(f"{stream}.b", b"b")
    with pytest.raises(NoResponders):
        await eng.append(f"{_name('nostream')}.x", b"", timeout=2)

    first = await eng.get_message(stream, seq=a1.seq)
    assert first is not None and (first.data, first.subject) == (b"1", subj)
    assert first.headers is not None and first.headers.get("k") == "v"
    last_a = await eng.get_message(stream, subject=subj)
    assert last_a is not None and last_a.seq == a2.seq
    nxt = await eng.get_message(stream, seq=a2.seq + 1, after=True)
    assert nxt is not None and nxt.seq == b1.seq
    assert await eng.get_message(stream, seq=b1.seq + 1, after=True) is None
    assert await eng.get_message(stream, seq=999) is None

    assert await eng.delete_message(stream, a1.seq)
    assert not await eng.delete_message(stream, a1.seq)
    state = await eng.stream_state(stream)
    assert state is not None and state.messages == 2
    assert await eng.purge(stream) == 2
    assert await eng.stream_state(_name("nostream")) is None
    with pytest.raises(NotFound):
        await eng.get_message(_name("nostream"), seq=1)


async def test_tail_reads_the_last_messages_of_a_subject_oldest_first(h: Harness) -> None:
    """`tail` gives the last `last` messages on a subject or wildcard, only among the stream's
    latest `within` when given; `max_msgs_per_subject` bounds each subject on its own."""
    eng = h.engine
    stream, subj = await _stream(h, max_msgs_per_subject=3)
    for i in range(5):
        await eng.append(subj, f"a{i}".encode())
    b = await eng.append(f"{stream}.b", b"b0")
    got = await eng.tail(stream, subj, 2)
    assert [m.data for m in got] == [b"a3", b"a4"]  # a0, a1 went with the per-subject limit
    assert [m.data for m in await eng.tail(stream, f"{stream}.>", 10)] == [b"a2", b"a3", b"a4",
                                                                            b"b0"]  # fmt: skip
    assert [m.seq for m in await eng.tail(stream, f"{stream}.>", 10, within=2)] == [5, b.seq]
    assert await eng.tail(stream, f"{stream}.none", 10) == []
    with pytest.raises(NotFound):
        await eng.tail(_name("nostream"), "x.>", 1)


async def test_consumers_on_a_work_queue(h: Harness) -> None:
    """A work queue takes one consumer per subject (`Refused` for a second); `consumers` names
    them with their filters; `delete_consumer` says whether there was one."""
    eng = h.engine
    stream, subj = await _stream(h, work_queue=True)
    await eng.ensure_consumer(stream, ConsumerSpec(name="c1", filter_subject=subj))
    with pytest.raises(Refused):
        await eng.ensure_consumer(stream, ConsumerSpec(name="c2", filter_subject=subj))
    assert await eng.consumers(stream) == {"c1": subj}
    assert await eng.delete_consumer(stream, "c1")
    assert not await eng.delete_consumer(stream, "c1")
    with pytest.raises(NotFound):
        await eng.consume(stream, "c1", lambda d: True, has_capacity=_ready, still_going=_true)
    await eng.ensure_consumer(stream, ConsumerSpec(name="c2", filter_subject=subj))
    assert await eng.consumers(stream) == {"c2": subj}


class Recorder:
    """A dispatch function that records deliveries and acts on them as told."""

    def __init__(self, act: Callable[[Delivery], Awaitable[None] | None] | None = None) -> None:
        self.got: list[Delivery] = []
        self.act = act
        self.stop_after = 0
        self._acting: set[asyncio.Future[None]] = set()

    def __call__(self, d: Delivery) -> bool:
        self.got.append(d)
        if self.act is not None:
            result = self.act(d)
            if result is not None:
                fut = asyncio.ensure_future(result)
                self._acting.add(fut)
                fut.add_done_callback(self._acting.discard)
        return not (self.stop_after and len(self.got) >= self.stop_after)


async def test_consume_in_order_and_ack_removes(h: Harness) -> None:
    """Deliveries come in stream order, numbered by their stream sequence; acknowledged ones
    leave a work queue."""
    eng = h.engine
    stream, subj = await _stream(h, work_queue=True)
    seqs = [(await eng.append(subj, b"%d" % i)).seq for i in range(10)]
    await eng.ensure_consumer(stream, ConsumerSpec(name="c", filter_subject=subj))
    rec = Recorder(lambda d: d.ack())
    c = await eng.consume(stream, "c", rec, has_capacity=_ready, still_going=lambda: True)
    try:
        await h.until(lambda: len(rec.got) == 10, "all ten delivered")

        async def drained() -> bool:
            state = await eng.stream_state(stream)
            return state is not None and state.messages == 0

        await h.until(drained, "acked messages left the work queue")
    finally:
        await c.stop()
    assert [d.seq for d in rec.got] == seqs
    assert [d.data for d in rec.got] == [b"%d" % i for i in range(10)]
    assert {d.num_delivered for d in rec.got} == {1}


async def test_nak_and_ack_wait_redeliver(h: Harness) -> None:
    """A nak'd message comes again at once; one neither acked nor nak'd comes again after the
    ack-wait; `num_delivered` counts the deliveries."""
    eng = h.engine
    stream, subj = await _stream(h, work_queue=True)
    await eng.append(subj, b"nak-me")
    await eng.append(subj, b"forget-me")
    await eng.ensure_consumer(stream, ConsumerSpec(name="c", filter_subject=subj, ack_wait=1.0))

    def act(d: Delivery) -> Awaitable[None] | None:
        if d.num_delivered > 1:
            return d.ack()
        return d.nak() if d.data == b"nak-me" else None

    rec = Recorder(act)
    c = await eng.consume(stream, "c", rec, has_capacity=_ready, still_going=lambda: True)
    try:
        await h.until(lambda: len(rec.got) >= 4, "both messages redelivered")
    finally:
        await c.stop()
    again = {d.data: d.num_delivered for d in rec.got if d.num_delivered > 1}
    assert again == {b"nak-me": 2, b"forget-me": 2}


async def test_takeover_by_a_new_consumer(h: Harness) -> None:
    """A consumer whose dispatch says stop gets nothing more; after it is deleted a new
    consumer on the subject receives every unacknowledged message, from the first."""
    eng = h.engine
    stream, subj = await _stream(h, work_queue=True)
    for i in range(5):
        await eng.append(subj, b"%d" % i)
    await eng.ensure_consumer(stream, ConsumerSpec(name="e1", filter_subject=subj))
    old = Recorder(lambda d: d.ack() if d.data == b"0" else None)
    old.stop_after = 2
    c1 = await eng.consume(stream, "e1", old, has_capacity=_ready, still_going=lambda: True)
    await h.until(lambda: len(old.got) >= 2, "the first owner got two")
    await c1.stop()

    async def acked_first() -> bool:
        state = await eng.stream_state(stream)
        return state is not None and state.messages == 4

    await h.until(acked_first, "the first owner's ack was applied")
    assert await eng.delete_consumer(stream, "e1")
    await eng.ensure_consumer(stream, ConsumerSpec(name="e2", filter_subject=subj))
    new = Recorder(lambda d: d.ack())
    c2 = await eng.consume(stream, "e2", new, has_capacity=_ready, still_going=lambda: True)
    try:
        await h.until(lambda: len(new.got) == 4, "the new owner got the rest")
    finally:
        await c2.stop()
    assert [d.data for d in new.got] == [b"1", b"2", b"3", b"4"]
    assert len(old.got) == 2


async def test_closed_engine_raises_not_connected(h: Harness) -> None:
    """After `close`, calls raise `NotConnected`."""
    kv = await h.engine.bucket(BucketSpec(name=_name("closed")))
    await h.engine.close()
    with pytest.raises(NotConnected):
        await kv.put("k", b"v")
    with pytest.raises(NotConnected):
        await h.engine.append("x.y", b"")
    with pytest.raises(NotConnected):
        await h.engine.request("x", b"", 1.0)


async def test_core_request_to_a_stream_subject_is_stored(h: Harness) -> None:
    """A core request on a subject a stream captures is stored and answered with the PubAck
    (the cheap durable publish the mailbox uses), `Nats-Msg-Id` deduplicating it."""
    eng = h.engine
    stream, subj = await _stream(h, duplicate_window=60)
    first = json.loads((await eng.request_msg(subj, b"x", 2, {"Nats-Msg-Id": "r1"})).data)
    again = json.loads((await eng.request_msg(subj, b"x", 2, {"Nats-Msg-Id": "r1"})).data)
    assert first["stream"] == stream and first["seq"] >= 1 and not first.get("duplicate")
    assert again["seq"] == first["seq"] and again["duplicate"]
    stored = await eng.get_message(stream, seq=first["seq"])
    assert stored is not None and stored.data == b"x"


async def test_reply_inbox_resolves_on_the_first_message_to_its_subject(h: Harness) -> None:
    """Each `reply_inbox` subject has its own waiter, resolved by the first message sent to it
    (later than any request's reply: durable asks); a waiter given up on drops what comes."""
    eng = h.engine
    first, fut1 = await eng.reply_inbox()
    second, fut2 = await eng.reply_inbox()
    assert first != second
    await eng.publish(second, b"for the second", headers={"Accord-Test": "1"})
    await h.until(fut2.done, "the second waiter resolved")
    msg = fut2.result()
    assert (msg.data, (msg.headers or {}).get("Accord-Test")) == (b"for the second", "1")
    assert not fut1.done()
    fut1.cancel()  # the caller's deadline passed
    await eng.publish(first, b"too late")  # dropped, nothing raises
    await eng.flush(2)
    again, fut3 = await eng.reply_inbox()
    await eng.publish(again, b"on time")
    await h.until(fut3.done, "a new waiter after one was given up on")
    assert fut3.result().data == b"on time"


async def test_consumer_progress_and_start_sequence(h: Harness) -> None:
    """`consumer_info` reports the ack floor, undelivered and unacknowledged counts (None for a
    missing consumer); a consumer created with `start_seq` delivers from that sequence on."""
    eng = h.engine
    stream, subj = await _stream(h)
    seqs = [(await eng.append(subj, b"%d" % i)).seq for i in range(4)]
    assert await eng.consumer_info(stream, "nope") is None
    await eng.ensure_consumer(stream, ConsumerSpec(name="p", filter_subject=subj))
    fresh = await eng.consumer_info(stream, "p")
    assert fresh is not None and (fresh.ack_floor, fresh.pending, fresh.ack_pending) == (0, 4, 0)
    rec = Recorder(lambda d: d.ack() if d.data == b"0" else None)
    c = await eng.consume(stream, "p", rec, has_capacity=_ready, still_going=_true)

    async def progressed() -> bool:
        st = await eng.consumer_info(stream, "p")
        return st is not None and st.ack_floor == seqs[0] and st.ack_pending == 3

    try:
        await h.until(progressed, "first acknowledged, three delivered and open")
    finally:
        await c.stop()
    st = await eng.consumer_info(stream, "p")
    assert st is not None and st.pending == 0
    await eng.ensure_consumer(
        stream, ConsumerSpec(name="q", filter_subject=subj, start_seq=st.ack_floor + 1)
    )
    later = Recorder(lambda d: d.ack())
    c2 = await eng.consume(stream, "q", later, has_capacity=_ready, still_going=_true)
    try:
        await h.until(lambda: len(later.got) == 3, "the new consumer got the unacknowledged")
    finally:
        await c2.stop()
    assert [d.data for d in later.got] == [b"1", b"2", b"3"]
