"""How a server's refusal reaches a nats-py JetStream call under way (`_refusable`), no server: a
refused API request of the call's family naming its stream ends it at once with
`PermissionDenied`; a refusal about another stream or family leaves it alone; the abandoned
nats-py call is cancelled. (Against the real server: tests/integration/test_security_roles.py.)"""

from __future__ import annotations

import asyncio

import pytest

from accord import PermissionDenied
from accord.engine._nats_js import NatsJetStream


def _engine() -> NatsJetStream:
    js = object.__new__(NatsJetStream)  # only the refusal bookkeeping, no connection
    js._refusable_calls = set()
    return js


async def _forever(started: asyncio.Event, cancelled: list[bool]) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.append(True)
        raise


async def test_a_refusal_of_the_calls_stream_and_family_ends_it_at_once() -> None:
    js, started, cancelled = _engine(), asyncio.Event(), []
    call = asyncio.ensure_future(
        js._refusable("accord_C_mailbox", _forever(started, cancelled), 600, "CONSUMER")
    )
    await started.wait()
    js._api_refused("$js.api.consumer.durable.create.accord_c_mailbox.steal")
    with pytest.raises(PermissionDenied, match=r"consumer\.durable\.create\.accord_c_mailbox"):
        await asyncio.wait_for(call, 10)
    await asyncio.sleep(0)  # the abandoned call's cancellation runs
    assert cancelled == [True] and not js._refusable_calls


@pytest.mark.parametrize(
    "refused",
    [
        "$js.api.consumer.create.accord_c_mailbox2",  # another stream (a prefix of it is not it)
        "$js.api.stream.create.accord_c_mailbox",  # another family on the same stream
        "accord.c.shard.3",  # not a JetStream request
    ],
)
async def test_other_refusals_leave_the_call_to_its_timeout(refused: str) -> None:
    js, started = _engine(), asyncio.Event()
    call = js._refusable("accord_C_mailbox", _forever(started, []), 0.2, "CONSUMER")
    task = asyncio.ensure_future(call)
    await started.wait()
    js._api_refused(refused)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(task, 10)
