"""The shard mailbox consumer against a real nats-server: outstanding pull requests topped up as
messages arrive, stream order, acks, the bulkhead, and a newer epoch taking the shard over.

Each test gets a cluster name of its own on the module's server; messages are appended through
the NATS engine, and the dispatch function records what the mailbox hands over.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from accord.cluster._config import Names
from accord.delivery._mailbox import ShardMailbox, ensure_streams, mailbox_subject
from accord.engine._api import Delivery
from accord.engine._nats import NatsTransport
from accord.engine._nats_consumer import PULL_EXPIRES
from accord.testing import eventually_async

_serials = itertools.count(1)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[NatsTransport]:
    engine = await NatsTransport.connect([nats_url], "test-mailbox")
    try:
        yield engine
    finally:
        await engine.close()


async def _names(js: Any) -> Names:
    names = Names(f"mbox{next(_serials)}")
    await ensure_streams(js, names, 1)
    return names


async def _publish(js: Any, names: Names, shard: int, payloads: list[bytes]) -> None:
    for p in payloads:
        await js.append(mailbox_subject(names, shard), p, msg_id=p.decode())


async def _capacity() -> None:
    return None


async def test_delivers_in_stream_order_beyond_one_batch_and_acked_ones_stay_acked(js: Any) -> None:
    names = await _names(js)
    got: list[bytes] = []
    acks: list[asyncio.Task[None]] = []

    def dispatch(shard: int, epoch: int, msg: Delivery) -> bool:
        got.append(msg.data)
        acks.append(asyncio.get_running_loop().create_task(msg.ack()))
        return True

    mailbox = ShardMailbox(js, names, 3, 1, dispatch, _capacity, lambda: True, batch=8)
    await mailbox.start()
    try:
        sent = [f"m{i}".encode() for i in range(100)]
        await _publish(js, names, 3, sent)
        await eventually_async(lambda: len(got) >= 100, 10, "100 messages")
        assert got == sent  # 100 messages through requests of at most 8: order kept, none twice
        await asyncio.gather(*acks)  # every ack sent before the takeover (else: redelivered)
        await js.flush(5)
    finally:
        await mailbox.stop()
    # A newer epoch's consumer gets only what was never acked: nothing.
    again: list[bytes] = []
    successor = ShardMailbox(
        js, names, 3, 2, lambda s, e, m: again.append(m.data) is None, _capacity, lambda: True
    )
    await successor.start(previous_epoch=1)
    try:
        await _publish(js, names, 3, [b"after"])
        await eventually_async(
            lambda: again == [b"after"], 5, "the message sent after the takeover"
        )
    finally:
        await successor.stop()


async def test_consumes_again_after_its_pull_requests_expired(js: Any) -> None:
    names = await _names(js)
    got: list[bytes] = []
    mailbox = ShardMailbox(
        js, names, 0, 1, lambda s, e, m: got.append(m.data) is None, _capacity, lambda: True
    )
    await mailbox.start()
    try:
        await asyncio.sleep(PULL_EXPIRES + 1.0)  # the first requests end with 408s meanwhile
        await _publish(js, names, 0, [b"late"])
        await eventually_async(
            lambda: got == [b"late"], 2, "a message sent after the requests expired"
        )
    finally:
        await mailbox.stop()


async def test_no_request_while_the_bulkhead_is_full(js: Any) -> None:
    names = await _names(js)
    got: list[Delivery] = []
    room = asyncio.Event()
    blocked = asyncio.Event()

    async def has_capacity() -> None:
        if len(got) >= 10:
            blocked.set()
            await room.wait()

    def dispatch(shard: int, epoch: int, msg: Delivery) -> bool:
        got.append(msg)
        return True

    await _publish(js, names, 1, [f"b{i}".encode() for i in range(60)])
    mailbox = ShardMailbox(js, names, 1, 1, dispatch, has_capacity, lambda: True, batch=8)
    await mailbox.start()
    try:
        # Instead of sleeping to see that nothing more comes: wait until the pull loop (the
        # engine's, `engine/_nats_consumer.py`) waits on the bulkhead and every message it asked
        # for has arrived. Nothing is asked for then, so nothing more can arrive, and the count
        # below is final until there is room.
        pull: Any = mailbox._consumer
        await eventually_async(
            lambda: blocked.is_set() and pull._owed <= 0, 5, "the pull loop blocked, settled"
        )
        assert len(got) <= 10 + 8  # what was asked for before the bulkhead filled, no more
        room.set()
        await eventually_async(lambda: len(got) == 60, 5, "the rest once there is room")
    finally:
        await mailbox.stop()


async def test_a_newer_epoch_redelivers_the_unacked_in_order_and_the_old_owner_stops(
    js: Any,
) -> None:
    names = await _names(js)
    old: list[bytes] = []
    owner = {"epoch": 1}

    def old_dispatch(shard: int, epoch: int, msg: Delivery) -> bool:
        if owner["epoch"] != epoch:
            return False
        old.append(msg.data)  # never acked: the turn "crashed"
        return True

    first = ShardMailbox(js, names, 2, 1, old_dispatch, _capacity, lambda: owner["epoch"] == 1)
    await first.start()
    sent = [f"u{i}".encode() for i in range(20)]
    await _publish(js, names, 2, sent)
    await eventually_async(lambda: len(old) == 20, 5, "the first owner's deliveries")

    owner["epoch"] = 2
    new: list[bytes] = []

    def new_dispatch(shard: int, epoch: int, msg: Delivery) -> bool:
        new.append(msg.data)
        asyncio.get_running_loop().create_task(msg.ack())
        return True

    second = ShardMailbox(js, names, 2, 2, new_dispatch, _capacity, lambda: owner["epoch"] == 2)
    await second.start(previous_epoch=1)
    try:
        await eventually_async(lambda: len(new) >= 20, 5, "the redeliveries to the new epoch")
        assert new == sent  # at once, in stream order, no ack-wait sat out
        await _publish(js, names, 2, [b"next"])
        await eventually_async(lambda: new[-1] == b"next", 5, "a new message")
        assert len(old) == 20  # the superseded consumer got nothing more
    finally:
        await second.stop()
        await first.stop()


async def test_a_consumer_left_by_an_owner_older_than_the_previous_one_is_replaced(
    js: NatsTransport,
) -> None:
    names = await _names(js)
    got: list[bytes] = []
    first = ShardMailbox(js, names, 4, 1, lambda s, e, m: True, _capacity, lambda: False)
    await first.start()
    await first.stop()  # its consumer stays on the server (it is durable)
    # Epoch 3 knows only epoch 2 as its predecessor: epoch 1's consumer still filters the subject.
    third = ShardMailbox(
        js, names, 4, 3, lambda s, e, m: got.append(m.data) is None, _capacity, lambda: True
    )
    await third.start(previous_epoch=2)
    try:
        consumers = await js.consumers(f"accord_{names.cluster}_mailbox")
        assert set(consumers) == {"shard-4-e3"}
        await _publish(js, names, 4, [b"to-the-new-owner"])
        await eventually_async(
            lambda: got == [b"to-the-new-owner"], 5, "the message on the new consumer"
        )
    finally:
        await third.stop()
