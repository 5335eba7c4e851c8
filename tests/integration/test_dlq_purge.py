"""`accord dlq purge` against a real nats-server: one dead letter by sequence, all of them with
`--all`, and bad input (an unknown sequence, no argument) as one clear error line with exit 2.
The dead letters come from a real in-process node whose handler always fails."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import accord

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from durable_app import Add, Flaky  # noqa: E402

CLUSTER = "dlqpurge"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord", *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip


async def _acli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: a blocking call would stall the test's node (no lease renewals)."""
    return await asyncio.to_thread(_cli, "dlq", *args, "--nats", url, "--cluster", CLUSTER)


async def _listed(url: str) -> list[dict[str, Any]]:
    done = await _acli(url, "list", "--json")
    assert done.returncode == 0, done.stderr
    entries: list[dict[str, Any]] = json.loads(done.stdout)
    return entries


async def test_dlq_purge_by_sequence_all_and_bad_input(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCORD_FIXED", str(tmp_path / "never"))  # flaky stays broken
    node = accord.Node(
        [Flaky], nats=nats_url, name="p1", settings=accord.NodeSettings(cluster=CLUSTER)
    )
    await node.start()
    try:
        for key in ("a", "b", "c"):
            with pytest.raises(accord.RemoteError, match="flaky is broken"):
                await node.ask(f"flaky/{key}", Add(1), timeout=20)
        entries = await _listed(nats_url)
        assert sorted(e["target"] for e in entries) == ["flaky/a", "flaky/b", "flaky/c"]

        # One by sequence: exactly that entry goes, the others stay.
        victim = entries[1]
        one = await _acli(nats_url, "purge", str(victim["seq"]))
        assert one.returncode == 0, one.stderr
        assert "purged 1 dead letter" in one.stdout
        left = await _listed(nats_url)
        assert sorted(e["seq"] for e in left) == sorted(
            e["seq"] for e in entries if e["seq"] != victim["seq"]
        )

        # The same sequence again is unknown now: bad input, one line, exit 2.
        again = await _acli(nats_url, "purge", str(victim["seq"]))
        assert again.returncode == 2, (again.stdout, again.stderr)
        assert f"no dead letter with sequence {victim['seq']}" in again.stderr
        assert "Traceback" not in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        unknown = await _acli(nats_url, "purge", "99999")
        assert unknown.returncode == 2 and "no dead letter with sequence 99999" in unknown.stderr
        assert await _listed(nats_url) == left  # nothing was purged by the failed attempts

        # Neither a sequence nor --all: refused, nothing purged.
        bare = await _acli(nats_url, "purge")
        assert bare.returncode == 2, (bare.stdout, bare.stderr)
        assert "give a sequence number or --all" in bare.stderr
        assert "Traceback" not in bare.stderr
        assert await _listed(nats_url) == left

        # --all: everything left goes, and the count says how many.
        everything = await _acli(nats_url, "purge", "--all")
        assert everything.returncode == 0, everything.stderr
        assert f"purged {len(left)} dead letter" in everything.stdout
        assert await _listed(nats_url) == []
    finally:
        await node.stop()
