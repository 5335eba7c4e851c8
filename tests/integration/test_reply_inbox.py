"""`Transport.reply_inbox` on the NATS engine: a reply that comes later than a request's (the
consumer of a stored message answers the subject its envelope names) resolves the waiter through
the connection's shared inbox, and a waiter given up on leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from accord.engine._nats import NatsTransport
from accord.testing import eventually_async


@pytest.fixture
async def engine(nats_url: str) -> AsyncIterator[NatsTransport]:
    eng = await NatsTransport.connect([nats_url], "test-reply-inbox")
    try:
        yield eng
    finally:
        await eng.close()


async def test_a_message_to_the_reply_subject_resolves_its_waiter(engine: NatsTransport) -> None:
    first, fut1 = await engine.reply_inbox()
    second, fut2 = await engine.reply_inbox()
    assert first != second
    await engine.publish(second, b"for the second", headers={"Accord-Test": "1"})
    msg = await asyncio.wait_for(fut2, 5)
    assert (msg.subject, msg.data, (msg.headers or {}).get("Accord-Test")) == (
        second,
        b"for the second",
        "1",
    )
    assert not fut1.done()  # each subject has its own waiter
    fut1.cancel()


async def test_a_waiter_given_up_on_is_forgotten_and_a_late_reply_dropped(
    engine: NatsTransport,
) -> None:
    subject, fut = await engine.reply_inbox()
    fut.cancel()  # the caller's deadline passed
    await eventually_async(
        lambda: engine._waiting == {}, 5.0, "the waiter forgotten"
    )  # by a done callback
    await engine.publish(subject, b"too late")  # dropped: nobody waits, nothing raises
    await engine.flush(5)
    # The shared inbox still serves requests and new waiters.
    again, fut2 = await engine.reply_inbox()
    await engine.publish(again, b"on time")
    assert (await asyncio.wait_for(fut2, 5)).data == b"on time"
