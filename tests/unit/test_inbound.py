"""Inbound dispatch rejects what it cannot handle with a clear error reply and keeps serving: a
malformed envelope, a wrong shard, an unknown type or message, a full bulkhead. Above the engine
seam: the transport here only records what the node would send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

import accord
from accord import _codec as codec
from accord._background import Background
from accord._ids import AgentId, shard_of
from accord.cluster._config import Names
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._inbound import Inbound
from accord.runtime._settings import NodeSettings, Stats

SHARDS = 8


class Ping(msgspec.Struct):
    n: int


class Echo(accord.Agent, type="inb-echo"):
    @accord.handler
    async def ping(self, msg: Ping) -> int:
        return msg.n


@dataclass
class Msg:
    subject: str
    data: bytes
    reply: str = "_INBOX.r"
    headers: dict[str, str] | None = None


@dataclass
class Wire:
    """The transport as seen by `Inbound`: what it publishes."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    max_payload: int = 1 << 20

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        self.sent.append((subject, data))


class Held:
    def held_epoch(self, shard: int) -> int | None:
        return 7


class Table:
    def __init__(self) -> None:
        self.work: list[Any] = []

    def get_or_create(self, *args: Any, **kwargs: Any) -> Any:
        table = self

        class Act:
            def put(self, work: Any) -> None:
                table.work.append(work)

        return Act()


def _resolve(target: str) -> tuple[AgentId, int]:
    agent_id = AgentId.parse(target)
    return agent_id, shard_of(agent_id, SHARDS)


def _inbound(settings: NodeSettings | None = None) -> tuple[Inbound, Wire, Table, Stats]:
    wire, table, stats = Wire(), Table(), Stats()
    spec = Echo.__accord_spec__
    bulkhead = Bulkhead(settings or NodeSettings(), stats, "n1")
    inbound = Inbound(
        "n1", Names("inb"), SHARDS, {spec.type_name: spec}, _resolve, Held(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        table, bulkhead, wire, stats, Background(), lambda: 0.0,  # type: ignore[arg-type]
    )  # fmt: skip
    return inbound, wire, table, stats


def _request(target: str, msg_type: str = "Ping", body: Any = None, **kw: Any) -> bytes:
    req = codec.Request(v=codec.PROTOCOL_VERSION, kind="ask", target=target, type=msg_type,
                        body=msgspec.Raw(codec.encode(body if body is not None else Ping(1))),
                        **kw)  # fmt: skip
    return codec.encode(req)


async def _error_reply(wire: Wire) -> codec.ErrorInfo:
    for _ in range(50):
        if wire.sent:
            break
        await asyncio.sleep(0)
    assert wire.sent, "no error reply was sent"
    reply, _ = codec.decode_reply(wire.sent[-1][1])
    assert not reply.ok and reply.error is not None
    return reply.error


def _shard(target: str) -> int:
    return _resolve(target)[1]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\x00garbage", "bad_request"),
        (b"{not json", "bad_request"),
        (codec.encode({"v": 99, "kind": "ask", "target": "inb-echo/a", "type": "Ping"}),
         "bad_request"),
    ],
)  # fmt: skip
async def test_a_malformed_envelope_gets_bad_request_and_runs_nothing(
    data: bytes, code: str
) -> None:
    inbound, wire, table, stats = _inbound()
    inbound.on_request(_shard("inb-echo/a"), Msg("accord.inb.shard.0", data))
    assert (await _error_reply(wire)).code == code
    assert table.work == [] and stats.rejected == 1


async def test_a_message_for_another_shard_is_refused() -> None:
    inbound, wire, table, _ = _inbound()
    wrong = (_shard("inb-echo/a") + 1) % SHARDS
    inbound.on_request(wrong, Msg("s", _request("inb-echo/a")))
    error = await _error_reply(wire)
    assert error.code == "bad_request" and "does not live in shard" in error.message
    assert table.work == []


async def test_unknown_agent_type_and_message_type_are_named() -> None:
    inbound, wire, table, _ = _inbound()
    inbound.on_request(_shard("nobody/a"), Msg("s", _request("nobody/a")))
    assert (await _error_reply(wire)).code == "agent_type_not_found"
    wire.sent.clear()
    inbound.on_request(_shard("inb-echo/a"), Msg("s", _request("inb-echo/a", "Pong")))
    assert (await _error_reply(wire)).code == "unknown_message_type"
    assert table.work == []


async def test_a_body_of_the_wrong_shape_is_refused() -> None:
    inbound, wire, table, _ = _inbound()
    inbound.on_request(_shard("inb-echo/a"), Msg("s", _request("inb-echo/a", body={"n": "x"})))
    error = await _error_reply(wire)
    assert error.code == "bad_request" and "Ping" in error.message
    assert table.work == []


async def test_a_full_bulkhead_answers_overloaded() -> None:
    inbound, wire, table, stats = _inbound(NodeSettings(max_inflight=1))
    inbound._bulkhead.add("inb-echo", 1)  # one message in flight already
    inbound.on_request(_shard("inb-echo/a"), Msg("s", _request("inb-echo/a")))
    assert (await _error_reply(wire)).code == "overloaded"
    assert table.work == [] and stats.overloaded == 1


async def test_a_valid_ask_becomes_work_with_its_deadline() -> None:
    inbound, wire, table, _ = _inbound()
    inbound.on_request(_shard("inb-echo/a"), Msg("s", _request("inb-echo/a", timeout_ms=1500)))
    assert len(table.work) == 1 and wire.sent == []
    work = table.work[0]
    assert work.msg == Ping(1) and work.deadline == pytest.approx(1.5)


async def test_a_tell_without_reply_subject_is_dropped_silently_when_bad() -> None:
    inbound, wire, table, stats = _inbound()
    inbound.on_request(_shard("inb-echo/a"), Msg("s", b"\xff", reply=""))
    for _ in range(10):
        await asyncio.sleep(0)
    assert wire.sent == [] and table.work == [] and stats.rejected == 1
