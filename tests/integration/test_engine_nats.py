"""The NATS engine adapter against a real nats-server: what only NATS can show — the TTL-expiry
marker read as an absent key, server error replies mapped to the seam's errors, the pull loop
topping up its requests, and a closed connection surfacing as `NotConnected` from every call.

Semantics shared with the in-memory engine are in tests/contract/test_engine.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from accord import NotConnected
from accord.engine._api import (
    BucketSpec,
    ConsumerSpec,
    Delivery,
    NoResponders,
    NotFound,
    Refused,
    RequestTimeout,
    StreamSpec,
    WrongRevision,
)
from accord.engine._nats import NatsTransport
from accord.engine._nats_errors import map_errors
from accord.testing import eventually_async

_serials = itertools.count(1)


@pytest.fixture
async def engine(nats_url: str) -> AsyncIterator[NatsTransport]:
    eng = await NatsTransport.connect([nats_url], "test-engine")
    try:
        yield eng
    finally:
        await eng.close()


def _name(what: str) -> str:
    return f"eng{what}{next(_serials)}"


async def test_create_takes_a_key_whose_ttl_expired(engine: NatsTransport) -> None:
    """The server's expiry marker (`Nats-Marker-Reason`) counts as absent for `create`, and the
    new revision is above the expired one (a fencing token that only grows)."""
    kv = await engine.bucket(BucketSpec(name=_name("lease"), marker_ttl=1))
    first = await kv.create("shard.1", b"a", ttl=1)
    with pytest.raises(WrongRevision):
        await kv.create("shard.1", b"b", ttl=1)

    async def expired() -> bool:
        return await kv.get("shard.1", leader=True) is None

    await eventually_async(expired, 10.0, "the key expired")
    second = await kv.create("shard.1", b"b", ttl=1)
    assert second > first
    got = await kv.get("shard.1", leader=True)
    assert got is not None and (got.value, got.revision) == (b"b", second)


async def test_server_errors_map_to_seam_errors(engine: NatsTransport) -> None:
    """Each refusal the server answers with arrives as the seam's error, never nats-py's."""
    stream = _name("s")
    await engine.ensure_stream(StreamSpec(name=stream, subjects=(f"{stream}.>",)))
    await engine.ensure_stream(StreamSpec(name=stream, subjects=(f"{stream}.>",)))  # kept
    with pytest.raises(NoResponders):
        await engine.append(f"{_name('nostream')}.x", b"x", timeout=2)
    await engine.append(f"{stream}.a", b"1")
    with pytest.raises(WrongRevision):
        await engine.append(f"{stream}.a", b"2", expect_last_subject_seq=0)
    with pytest.raises(NotFound):
        await engine.bucket(BucketSpec(name=_name("missing")), create=False)
    with pytest.raises(NotFound):
        await engine.get_message(_name("missing"), seq=1)
    with pytest.raises(Refused):  # a second stream over the same subjects
        await engine.ensure_stream(StreamSpec(name=_name("s"), subjects=(f"{stream}.>",)))
    assert await engine.stream_state(_name("missing")) is None
    assert await engine.get_message(stream, seq=99) is None
    assert not await engine.delete_consumer(stream, "nobody")
    assert engine.cluster_size() == 1  # one server, no peers announced


async def test_pull_loop_tops_up_and_keeps_stream_order(engine: NatsTransport) -> None:
    """More messages than one batch arrive in stream order through requests topped up at half."""
    stream = _name("wq")
    await engine.ensure_stream(
        StreamSpec(name=stream, subjects=(f"{stream}.*",), work_queue=True, duplicate_window=60)
    )
    for i in range(300):
        await engine.append(f"{stream}.1", b"%d" % i, msg_id=f"m{i}")
    await engine.ensure_consumer(stream, ConsumerSpec(name="c1", filter_subject=f"{stream}.1"))
    got: list[int] = []
    done = asyncio.Event()

    def dispatch(d: Delivery) -> bool:
        got.append(int(d.data))
        asyncio.get_running_loop().create_task(d.ack())
        if len(got) == 300:
            done.set()
        return True

    async def capacity() -> None:
        return None

    consumer = await engine.consume(
        stream, "c1", dispatch, has_capacity=capacity, still_going=lambda: True, batch=32
    )
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await consumer.stop()
    assert got == list(range(300))

    async def drained() -> bool:
        state = await engine.stream_state(stream)
        return state is not None and state.messages == 0

    await eventually_async(drained, 10.0, "acked messages left the work queue")


async def test_closed_connection_raises_not_connected(nats_url: str) -> None:
    """Once the connection is closed, calls raise `NotConnected` (no nats-py error escapes)."""
    eng = await NatsTransport.connect([nats_url], "test-closed")
    kv = await eng.bucket(BucketSpec(name=_name("closed")))
    await eng.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: kv.get("k"),
        lambda: kv.get("k", leader=True),
        lambda: kv.put("k", b"v"),
        lambda: kv.create("k", b"v"),
        lambda: kv.watch(),
        lambda: eng.append("x.y", b"v"),
        lambda: eng.bucket(BucketSpec(name="other")),
        lambda: eng.stream_state("other"),
        lambda: eng.consumers("other"),
        lambda: eng.request("x", b"", 1.0),
    ]
    for call in calls:
        with pytest.raises(NotConnected):
            await call()


async def test_no_pull_request_while_has_capacity_waits(engine: NatsTransport) -> None:
    """While `has_capacity` blocks, no new pull request goes out: once the outstanding ones have
    ended, the server has delivered at most what was asked before the block (10 + one batch)."""
    stream = _name("bh")
    await engine.ensure_stream(StreamSpec(name=stream, subjects=(f"{stream}.*",), work_queue=True))
    for i in range(60):
        await engine.append(f"{stream}.1", b"%d" % i)
    await engine.ensure_consumer(stream, ConsumerSpec(name="c", filter_subject=f"{stream}.1"))
    got: list[Delivery] = []
    room = asyncio.Event()

    async def has_capacity() -> None:
        if len(got) >= 10:
            await room.wait()

    def dispatch(d: Delivery) -> bool:
        got.append(d)
        return True

    consumer = await engine.consume(
        stream, "c", dispatch, has_capacity=has_capacity, still_going=lambda: True, batch=8
    )
    try:

        async def requests_ended() -> bool:
            info = await engine.api_call(f"CONSUMER.INFO.{stream}.c", b"", 5.0)
            return len(got) >= 10 and info["num_waiting"] == 0

        await eventually_async(
            requests_ended, 10.0, "the pull requests made before the block ended"
        )
        info = await engine.api_call(f"CONSUMER.INFO.{stream}.c", b"", 5.0)
        assert 10 <= info["delivered"]["consumer_seq"] <= 10 + 8
        room.set()
        await eventually_async(lambda: _true(len(got) == 60), 10.0, "the rest once there is room")
    finally:
        await consumer.stop()


async def _true(value: bool) -> bool:
    return value


async def test_direct_get_on_a_bucket_that_allows_it(engine: NatsTransport) -> None:
    """On a bucket created with direct gets allowed, `get` without `leader` reads through
    DIRECT.GET and still treats tombstones and missing keys as absent."""
    name = _name("direct")
    await engine.js.create_key_value(KeyValueConfig(bucket=name, direct=True))
    kv = await engine.bucket(BucketSpec(name=name), create=False)
    rev = await kv.put("k", b"v")
    got = await kv.get("k")
    assert got is not None and (got.value, got.revision) == (b"v", rev)
    await kv.delete("k")
    assert await kv.get("k") is None
    assert await kv.get("never") is None


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (nats.errors.NoRespondersError(), NoResponders),
        (nats.errors.TimeoutError(), NotConnected),
        (TimeoutError(), NotConnected),
        (nats.errors.ConnectionClosedError(), NotConnected),
        (nats.errors.ConnectionReconnectingError(), NotConnected),
        (nats.errors.OutboundBufferLimitError(), NotConnected),
        (nats.errors.MaxPayloadError(), Refused),
        (ConnectionResetError(), NotConnected),
        (nats.js.errors.BucketNotFoundError(), NotFound),
        (nats.js.errors.NotFoundError(), NotFound),
        (nats.js.errors.APIError(code=400, err_code=10071), WrongRevision),
        (nats.js.errors.APIError(code=400, err_code=10164), WrongRevision),
        (nats.js.errors.APIError(code=503, err_code=10008), NotConnected),
        (nats.js.errors.ServiceUnavailableError(), NotConnected),
        (nats.js.errors.APIError(code=400, err_code=10058), Refused),
    ],
)
def test_map_errors_translates_nats_errors(raised: Exception, expected: type[Exception]) -> None:
    """Every nats-py error class accord meets comes out of `map_errors` as the seam's error."""
    with pytest.raises(expected), map_errors("op"):
        raise raised


def test_map_errors_times_out_as_the_method_documents() -> None:
    """A method whose contract says `RequestTimeout` gets it for a timeout, not `NotConnected`."""
    with pytest.raises(RequestTimeout), map_errors("op", timeout_is=RequestTimeout):
        raise nats.errors.TimeoutError


@pytest.mark.parametrize("engine_kind", ["nats", "memory"])
async def test_a_bounced_request_is_no_responders(engine: NatsTransport, engine_kind: str) -> None:
    """A responder that knows a request never ran bounces it: the requester sees exactly what
    "nobody subscribed" gives (`NoResponders`, so its sender retries), on both engines."""
    from accord.engine.memory import MemoryEngine

    eng: Any = engine if engine_kind == "nats" else MemoryEngine()
    subject = _name("bounce")

    async def bounce(msg: Any) -> None:
        await eng.bounce(msg.reply)

    sub = await eng.subscribe(subject, bounce)
    try:
        with pytest.raises(NoResponders):
            await eng.request(subject, b"x", 5.0)
    finally:
        await sub.unsubscribe()
