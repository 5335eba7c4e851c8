"""`failover="degraded"` agents under a real network partition (accord.testing.netlab): while their
owner's node is cut off from the NATS majority, reads (`read_only` handlers) are still answered
there and writes are refused with `Degraded` and not applied; the majority side takes the shards
over and writes there; after the heal one value remains, with none of the refused writes in it.

The lab (3 servers, 3 nodes, one per network namespace) is test_partitions.py's.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

import accord
from accord import Degraded
from accord.testing import connect_retrying

from ._support import eventually
from .test_partitions import HOSTS, _agents_by_owner, _placed, _read, lab

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
__all__ = ["lab"]  # the fixture, imported for use here

from partition_app import Add, Read  # noqa: E402  (on sys.path through test_partitions)

REFUSED_WRITES = 5


async def _refused(mesh: accord.Mesh, agent: str, seen: list[str]) -> Degraded | None:
    """A write's outcome on the cut-off side: the `Degraded` refusal, or None while the node
    still holds its lease (the write waits on a JetStream without quorum and times out).
    Other outcomes are appended to `seen`, for the failure message."""
    try:
        await mesh.ask(agent, Add(1), timeout=3, delivery="at_most_once")
    except Degraded as exc:
        return exc
    except accord.AccordError as exc:
        seen.append(f"{type(exc).__name__}: {exc}")
        return None
    raise AssertionError(f"a write to {agent} was accepted on the cut-off side")


async def _status(mesh: accord.Mesh, node: str) -> Any:
    try:
        subject = f"{mesh.names.admin_subject}.{node}"
        return msgspec.json.decode(await mesh._sender.transport_request(subject, b"{}", 2.0))
    except accord.AccordError as exc:
        return f"nothing ({type(exc).__name__}: {exc})"


async def test_degraded_agents_answer_reads_and_refuse_writes_while_cut_off(lab: Any) -> None:
    nats_cluster = lab.nats
    everyone = {f"node-{h}" for h in HOSTS}
    async with (
        connect_retrying(nats_cluster.urls) as everywhere,
        connect_retrying([nats_cluster.url("h1")]) as minority,
        connect_retrying([nats_cluster.url("h2")]) as majority,
    ):
        st = await _placed(everywhere, everyone)
        # The first write after the cut may be in flight as the lease ends (it is fenced and its
        # activation stops): it goes to a probe agent of its own; the others stay in memory.
        probe, *agents = _agents_by_owner(st, "deg_counter", 4)["node-h1"]
        for a in agents:  # written and active on node-h1 before the cut
            assert await everywhere.ask(a, Add(5), timeout=10) == 5
            # Clients on the cut-off side were running before the cut (they know the agent
            # types: the type registry is not readable there afterwards).
            assert int(await minority.ask(a, Read(), timeout=10)) == 5

        lab.partition([{"h1"}, {"h2", "h3"}])
        cut_at = time.monotonic()
        seen: list[str] = []
        try:
            first = await eventually(lambda: _refused(minority, probe, seen), 60, "a refusal")
        except AssertionError:
            raise AssertionError(
                f"no Degraded refusal for {probe}; outcomes {seen[-5:]}; "
                f"node-h1 says {await _status(minority, 'node-h1')}"
            ) from None
        assert "cut off" in str(first)
        refused_after = time.monotonic() - cut_at

        # While cut off: every read is answered (from memory: the value before the cut) ...
        for a in agents:
            assert int(await minority.ask(a, Read(), timeout=5)) == 5
        # ... and every write is refused, not applied.
        for i in range(REFUSED_WRITES):
            agent = agents[i % len(agents)]
            with pytest.raises(Degraded):
                await minority.ask(agent, Add(100), timeout=5, delivery="at_most_once")
        for a in agents:
            assert int(await minority.ask(a, Read(), timeout=5)) == 5

        # The majority owns the shards now and takes writes (from the stored state, 5).
        async def majority_write(agent: str) -> int | None:
            try:
                return int(await majority.ask(agent, Add(1), timeout=3))
            except accord.AccordError:
                return None

        for a in agents:
            assert await eventually(lambda a=a: majority_write(a), 60, f"{a} on the majority") == 6
        # The cut-off side still answers reads, with what it had.
        assert int(await minority.ask(agents[0], Read(), timeout=5)) == 5

        lab.heal()
        await _placed(everywhere, everyone, timeout=90)

        sides = {"minority": minority, "majority": majority}

        async def converged() -> dict[str, int] | None:
            try:
                seen = {
                    f"{a}@{side}": await _read(m, a) for a in agents for side, m in sides.items()
                }
            except accord.AccordError:
                return None
            return seen if set(seen.values()) == {6} else None

        await eventually(converged, 60, "one value (6) on both sides after the heal", 0.5)
    print(f"degraded: first refusal {refused_after:.1f}s after the cut")
