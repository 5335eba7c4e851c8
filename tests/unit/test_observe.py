"""The observation seam: the fan-out reports to every observer, drops one that raises, and the
activation reports each turn's kind (a tell of `Mesh.publish` as `publish`, from its envelope
header), outcome and duration; the bulkhead its refusals, inbound dispatch a refusal as a
`rejected` message of its kind."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import msgspec
import pytest

import accord
from accord import _codec as codec
from accord._context import publishing
from accord._errors import Overloaded
from accord._ids import AgentId
from accord._observe import KIND_HEADER, PUBLISHED, Kind, Observer, Observers, Outcome, kind_of
from accord._sender import _tell_headers
from accord.runtime._activation import Activation
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._metrics import NodeMetrics
from accord.runtime._settings import NodeSettings, Stats
from accord.runtime._work import Work
from accord.state._store import StateStore

from . import test_inbound as inb
from .test_activation import Host, _replier, store  # noqa: F401  (store: a fixture)


class Ping(msgspec.Struct):
    fail: bool = False


class Echo(accord.Agent, type="obs-echo"):
    @accord.handler
    async def ping(self, msg: Ping) -> str:
        if msg.fail:
            raise ValueError("asked to fail")
        return "pong"


class Recorder(Observer):
    def __init__(self) -> None:
        self.turns: list[tuple[str, Kind, Outcome]] = []
        self.rejected: list[str] = []

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        assert seconds >= 0
        self.turns.append((agent_type, kind, outcome))

    def bulkhead_rejected(self, agent_type: str) -> None:
        self.rejected.append(agent_type)


class Broken(Observer):
    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        raise RuntimeError("observer bug")


def test_fan_out_is_inactive_until_an_observer_is_added_and_drops_a_failing_one() -> None:
    obs = Observers()
    assert not obs.active
    rec, broken = Recorder(), Broken()
    obs.add(broken)
    obs.add(rec)
    assert obs.active
    obs.turn_ended("t", "ask", "ok", 0.1)
    obs.turn_ended("t", "tell", "error", 0.1)
    assert rec.turns == [("t", "ask", "ok"), ("t", "tell", "error")]  # the broken one is gone
    obs.remove(rec)
    assert not obs.active


async def test_activation_reports_each_turn_with_kind_and_outcome(store: StateStore) -> None:  # noqa: F811
    host = Host(store)
    rec = Recorder()
    host.observe.add(rec)
    spec = Echo.__accord_spec__
    act = Activation(host, AgentId("obs-echo", "a"), spec, 0, 1, None)  # type: ignore[arg-type]
    handler = spec.by_class[Ping]
    ok: asyncio.Future[Any] = host.loop.create_future()
    bad: asyncio.Future[Any] = host.loop.create_future()
    act.put(Work(handler, Ping(), None, _replier(ok)))
    act.put(Work(handler, Ping(fail=True), None, _replier(bad)))
    act.put(Work(handler, Ping(), None, None))  # a tell
    assert await asyncio.wait_for(ok, 5) == "pong"
    with pytest.raises(accord.RemoteError):
        await asyncio.wait_for(bad, 5)
    act.close()
    await asyncio.wait_for(act.task, 5)
    assert rec.turns == [
        ("obs-echo", "ask", "ok"),
        ("obs-echo", "ask", "error"),
        ("obs-echo", "tell", "ok"),
    ]


def test_bulkhead_reports_refusals_by_type() -> None:
    obs = Observers()
    rec = Recorder()
    obs.add(rec)
    bulkhead = Bulkhead(NodeSettings(max_inflight_per_type=1), Stats(), "n1", obs)
    bulkhead.add("hot", 1)
    with pytest.raises(Overloaded):
        bulkhead.check("hot")
    bulkhead.check("cold")
    assert rec.rejected == ["hot"]


class Refusals(Observer):
    def __init__(self) -> None:
        self.rejected: list[tuple[str, Kind]] = []

    def message_rejected(self, agent_type: str, kind: Kind) -> None:
        self.rejected.append((agent_type, kind))


def test_a_received_message_is_a_publish_only_when_its_headers_say_so() -> None:
    assert kind_of(False, PUBLISHED) == "publish"
    assert kind_of(False, {"traceparent": "00-ab-cd-01", **PUBLISHED}) == "publish"
    assert kind_of(False, None) == "tell"
    assert kind_of(False, {"traceparent": "00-ab-cd-01"}) == "tell"
    assert kind_of(True, PUBLISHED) == "ask"  # an ask is an ask, whatever it carries


def test_only_tells_sent_while_publishing_carry_the_publish_kind() -> None:
    aid = AgentId("obs-echo", "k")
    assert _tell_headers(aid, "tell") is None  # tracing off: nothing on the wire
    token = publishing.set(True)
    try:
        assert _tell_headers(aid, "tell") == {KIND_HEADER: "publish"}
        assert _tell_headers(aid, "ask") is None
    finally:
        publishing.reset(token)


async def test_activation_reports_a_published_tell_as_publish(store: StateStore) -> None:  # noqa: F811
    host = Host(store)
    rec = Recorder()
    host.observe.add(rec)
    spec = Echo.__accord_spec__
    act = Activation(host, AgentId("obs-echo", "p"), spec, 0, 1, None)  # type: ignore[arg-type]
    handler = spec.by_class[Ping]
    act.put(Work(handler, Ping(), None, None, trace=PUBLISHED))
    act.put(Work(handler, Ping(), None, None))
    act.close()
    await asyncio.wait_for(act.task, 5)
    assert rec.turns == [("obs-echo", "publish", "ok"), ("obs-echo", "tell", "ok")]


async def test_bulkhead_refusals_from_the_wire_count_as_rejected_by_kind() -> None:
    obs = Observers()
    rec = Refusals()
    metrics = NodeMetrics([inb.Echo.__accord_spec__.type_name], {})
    obs.add(rec)
    obs.add(metrics)
    inbound, wire, table, _ = inb._inbound(NodeSettings(max_inflight_per_type=1))
    inbound._observe = obs
    inbound._bulkhead.add("inb-echo", 1)  # full
    target = "inb-echo/a"
    shard = inb._shard(target)
    sent: tuple[tuple[Literal["ask", "tell"], dict[str, str] | None], ...] = (
        ("ask", None), ("tell", None), ("tell", PUBLISHED)
    )  # fmt: skip
    for kind, headers in sent:
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind=kind,
            target=target,
            type="Ping",
            body=msgspec.Raw(codec.encode(inb.Ping(1))),
            headers=headers,
        )
        data = codec.encode(req)
        inbound.on_request(shard, inb.Msg("s", data))  # type: ignore[arg-type]
    assert (await inb._error_reply(wire)).code == "overloaded"
    assert not table.work
    assert rec.rejected == [("inb-echo", "ask"), ("inb-echo", "tell"), ("inb-echo", "publish")]
    text = metrics.render().decode()
    for kind in ("ask", "tell", "publish"):
        line = f'accord_messages_total{{agent_type="inb-echo",kind="{kind}",outcome="rejected"}}'
        assert f"{line} 1.0" in text
