"""The dashboard's pure parts: msgs/s from two samples (none across a node restart), agent types
summed over nodes and ordered hottest first, node rows from either status shape, one shared
snapshot for concurrent viewers, and slow sections refreshed behind the snapshot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from accord._errors import NotConnected
from accord.cluster._config import Names
from accord.dashboard import _snapshot as snapshot_module
from accord.dashboard._poller import Poller
from accord.dashboard._snapshot import Observer, _agent_types, _node, _Rates


def test_rates_need_two_samples_and_restart_on_a_counter_reset() -> None:
    rates = _Rates()
    assert rates.rate("n1", 10.0, 100) is None
    assert rates.rate("n1", 12.0, 160) == 30.0
    assert rates.rate("n1", 13.0, 5) is None  # the node restarted: its counters began again
    assert rates.rate("n1", 14.0, 25) == 20.0


def test_agent_types_are_summed_over_nodes_hottest_first() -> None:
    nodes = [
        {"agent_types": ["a", "b"], "per_type": {"a": {"activations": 2, "msgs_per_s": 0.1},
                                                 "b": {"activations": 1, "msgs_per_s": 9.0}}},
        {"agent_types": ["a", "b", "c"], "per_type": {"a": {"activations": 3, "msgs_per_s": 0.2}}},
    ]  # fmt: skip
    rows = _agent_types(nodes)
    assert [r["type"] for r in rows] == ["b", "a", "c"]
    a = rows[1]
    assert (a["nodes"], a["activations"], a["msgs_per_s"]) == (2, 5, 0.3)  # not 0.30000000000000004
    assert rows[2]["activations"] is None  # no node reported it: unknown, not zero


class _Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.paused = 0
        self.fail = False

    async def snapshot(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise NotConnected("no node answers")
        return {"n": self.calls}

    def forget(self, section: str) -> None:
        pass

    def pause(self) -> None:
        self.paused += 1


async def test_concurrent_viewers_share_one_snapshot_and_errors_propagate() -> None:
    obs = _Counting()
    poller = Poller(obs, fresh=60.0)  # type: ignore[arg-type]
    snaps = await asyncio.gather(*(poller.latest() for _ in range(5)))
    assert obs.calls == 1 and all(s == {"n": 1} for s in snaps)
    poller.invalidate("dlq")
    obs.fail = True
    with pytest.raises(NotConnected):
        await poller.latest()
    assert obs.calls == 2


async def test_the_observer_pauses_once_nobody_asked_for_a_while() -> None:
    obs = _Counting()
    poller = Poller(obs, fresh=0.0, idle=0.05)  # type: ignore[arg-type]
    await poller.latest()
    await poller.latest()  # re-arms: one pause after the last request, not one per request
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while obs.paused == 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert obs.paused == 1


def test_a_node_row_prefers_the_metrics_block_and_falls_back_to_counters() -> None:
    seen = {"name": "n1", "state": "alive", "shards": 3}
    with_metrics = {"activations": 4, "agent_types": ["counter"], "metrics_url": "http://m",
                    "stats": {"msgs_per_s": 12.5, "p99_turn_ms": 1.8, "loop_lag_ms": 0.4,
                              "per_type": {"counter": {"activations": 4}}},
                    "counters": {"turns": 100}}  # fmt: skip
    row = _node(seen, with_metrics, 1.0, _Rates())
    assert (row["msgs_per_s"], row["p99_turn_ms"], row["loop_lag_ms"]) == (12.5, 1.8, 0.4)
    assert row["per_type"] == {"counter": {"activations": 4}} and row["metrics_url"] == "http://m"
    rates = _Rates()
    older = {"activations": 1, "stats": {"turns": 10, "loop_lag_last": 0.002}}
    assert _node(seen, older, 1.0, rates)["msgs_per_s"] is None
    row = _node(seen, {**older, "stats": {"turns": 30, "loop_lag_last": 0.002}}, 3.0, rates)
    assert (row["msgs_per_s"], row["p99_turn_ms"], row["loop_lag_ms"]) == (10.0, None, 2.0)
    gone = _node(seen, None, 4.0, rates)
    assert not gone["reachable"] and gone["activations"] is None


class _SlowLedger(Observer):
    """An observer whose `promises` section takes as long as the test lets it."""

    def __init__(self) -> None:
        mesh = SimpleNamespace(_transport=None, names=Names("u"),
                               config=SimpleNamespace(num_shards=4))  # fmt: skip
        super().__init__(mesh)  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.reads = 0

    async def _promises(self) -> dict[str, Any]:
        self.reads += 1
        if self.reads > 1:
            await self.release.wait()
        return {"read": self.reads}


async def test_a_slow_section_is_refreshed_behind_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(snapshot_module, "SLOW_EVERY", 0.0)
    obs = _SlowLedger()
    errors: dict[str, str] = {}
    assert await obs._section("promises", errors) == {"read": 1}  # the first read is awaited
    # Stale now: the old value comes back at once while the second read hangs behind it.
    assert await asyncio.wait_for(obs._section("promises", errors), 1.0) == {"read": 1}
    assert await asyncio.wait_for(obs._section("promises", errors), 1.0) == {"read": 1}
    obs.release.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while obs._slow["promises"][1] != {"read": 2} and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert obs.reads == 2  # one refresh in flight at a time, however many snapshots asked
    assert await obs._section("promises", errors) == {"read": 2} and errors == {}
    await obs.close()
