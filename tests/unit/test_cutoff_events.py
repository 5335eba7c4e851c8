"""The record of a split-brain merge (`runtime/_cutoff.CutOff.record`): stored in the events
stream with an id of its own, and tried again while the engine does not confirm it (after a heal,
the stream can be without a leader for a few seconds)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from accord._background import Background
from accord._ids import AgentId
from accord.cluster._config import Names
from accord.engine._api import NoResponders, RequestTimeout
from accord.runtime import _cutoff
from accord.runtime._cutoff import CutOff
from accord.runtime._settings import Stats
from accord.state._store import MergeState


class FlakyEngine:
    """Answers `append` with the given failures first, then stores."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0
        self.stored: list[tuple[str, dict[str, Any], str | None]] = []

    async def append(self, subject: str, data: bytes, *, msg_id: str | None = None) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.stored.append((subject, msgspec.json.decode(data), msg_id))


async def _recorded(engine: FlakyEngine, monkeypatch: pytest.MonkeyPatch) -> Stats:
    real_sleep = asyncio.sleep

    async def no_wait(_: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", no_wait)  # the retries' one-second pauses
    sends, stats = Background(), Stats()
    fake: Any = engine  # only `append` is used
    unused: Any = None  # shards, table and the merge's send: record() uses none of them
    cut = CutOff("node-b", Names("evt"), unused, unused, fake, unused, stats, sends)
    state = MergeState(msgspec.Raw(b"\x80"), hlc=7 << 16, node="node-a", epoch=42)
    cut.record(AgentId.parse("reg/k1"), state, "theirs")
    await sends.drain(5.0)
    return stats


async def test_a_merge_is_stored_once_the_engine_confirms_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FlakyEngine([NoResponders("no stream leader"), RequestTimeout("append")])
    stats = await _recorded(engine, monkeypatch)
    assert stats.merges == 1
    assert engine.calls == 3
    [(subject, event, msg_id)] = engine.stored
    assert subject == Names("evt").events_subject("merge")
    assert event == {"agent": "reg/k1", "from_node": "node-a", "from_epoch": 42, "hlc": 7 << 16,
                     "outcome": "theirs", "by": "node-b"}  # fmt: skip
    # the same peer state merged again has the same id: the stream keeps one record
    assert msg_id == f"merge-event:node-b:node-a:42:{7 << 16}:reg/k1"


async def test_a_merge_event_the_engine_never_confirms_is_given_up_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FlakyEngine([NoResponders("down")] * (_cutoff.ATTEMPTS + 5))
    await _recorded(engine, monkeypatch)
    assert engine.calls == _cutoff.ATTEMPTS and not engine.stored
    assert any("given up" in r.message and r.levelname == "ERROR" for r in caplog.records)
