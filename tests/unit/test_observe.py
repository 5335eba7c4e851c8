"""The observation seam: the fan-out reports to every observer, drops one that raises, and the
activation reports each turn's kind, outcome and duration; the bulkhead its refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import accord
from accord._errors import Overloaded
from accord._ids import AgentId
from accord._observe import Kind, Observer, Observers, Outcome
from accord.runtime._activation import Activation, Work
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._settings import NodeSettings, Stats
from accord.state._store import StateStore

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
