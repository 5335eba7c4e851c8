"""Durable workflows on a real nats-server and real `accord node` processes (examples/workflow_app).

Proves: runs complete with the right result and each journaled step once, `ctx.ask` is applied
exactly once per step; a failing step compensates the completed steps in reverse order and ends
`compensated`; start is idempotent; cancel ends a waiting run, after compensating its completed
steps in reverse order when they have compensations; a signal sent before the run waits
for it is kept; an agent's reminder re-activates it after it was deactivated; a `ctx.ask` of an
agent served in the run's process skips the mailbox and is still applied once per message id.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import accord
from accord.testing import Cluster, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "workflow_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from workflow_app import AGENTS, Add, Approve, Job, Read, StartPing, Total  # noqa: E402


def _steps(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def _eventually_value(probe, timeout: float, what: str):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value is not None:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("wf")
    env = {"ACCORD_STEP_LOG": str(tmp / "steps.jsonl"), "ACCORD_FIXED": str(tmp / "fixed")}
    with Cluster(APP, 3, env=env, log_dir=tmp / "logs") as c:
        c.tmp = tmp  # type: ignore[attr-defined]

        async def placed() -> None:  # every test starts on a settled placement: no handoffs
            async with c.connect() as mesh:
                await wait_for_placement(mesh, set(c.nodes))

        asyncio.run(placed())
        yield c


async def test_runs_complete_once_each_with_exactly_once_asks(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await wait_for_placement(mesh, set(cluster.nodes))
        handles = await asyncio.gather(
            *(mesh.start_workflow("chain", f"r{i}", Job(i)) for i in range(50))
        )
        assert [h.id for h in handles] == [f"chain/r{i}" for i in range(50)]
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        assert results == [2 * i + 1 + 10 for i in range(50)]
        for h in handles:
            st = await h.status()
            assert (st.state, st.steps_done, st.attempts) == ("completed", 4, 0)
            journal = await h.journal()
            steps = Counter(e.n for e in journal.entries if isinstance(e, accord_step()))
            assert steps == {1: 1, 2: 1, 3: 1, 4: 1}, (h.id, journal.entries)
        applied = 0
        for k in range(5):
            total = await mesh.ask(f"wf_counter/{k}", Read(), returns=Total)
            applied += total.applied
        assert applied == 2 * 50  # two ctx.ask steps per run, each applied exactly once


def accord_step() -> type:
    from accord.workflows._model import WfStep

    return WfStep


async def test_failing_step_compensates_in_reverse_order(cluster: Cluster) -> None:
    log = cluster.tmp / "steps.jsonl"  # type: ignore[attr-defined]
    async with cluster.connect() as mesh:
        h = await mesh.start_workflow("saga", "order-1", Job(1))
        with pytest.raises(accord.WorkflowFailed) as failed:
            await h.result(timeout=60)
        assert failed.value.state == "compensated" and failed.value.compensated
        assert "no courier available" in failed.value.cause
        st = await h.status()
        assert st.state == "compensated" and st.attempts == 3
        mine = [e["step"] for e in _steps(log) if e["run"] == "saga/order-1"]
        assert mine == ["reserve", "charge", "ship", "ship", "ship", "refund", "release"]


async def test_start_is_idempotent(cluster: Cluster) -> None:
    log = cluster.tmp / "steps.jsonl"  # type: ignore[attr-defined]
    async with cluster.connect() as mesh:
        first = await mesh.start_workflow("chain", "same", Job(7))
        again = await mesh.start_workflow("chain", "same", Job(100))
        assert again.id == first.id == "chain/same"
        assert await again.result(timeout=60) == 2 * 7 + 1 + 10
        assert await (await mesh.workflow("chain/same")).result(timeout=5) == 25
        # One run: its journal holds each step once (a second run of Job(100) would have
        # returned 211). A step's code may run again when its record did not land (the run
        # moved under load: at-least-once), so the log is checked for kinds, not counts.
        journal = await first.journal()
        done = [e for e in journal.entries if isinstance(e, accord_step())]
        assert [e.n for e in done] == [1, 2, 3, 4], journal.entries
        assert [e.name for e in done if e.kind == "step"] == ["double", "plus_one"], done
        ran = [e["step"] for e in _steps(log) if e["run"] == "chain/same"]
        assert set(ran) == {"double", "plus_one"} and ran[-1] == "plus_one", ran
        with pytest.raises(accord.WorkflowNotFound):
            await mesh.workflow("chain/never-started")


async def test_cancel_ends_a_waiting_run(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        h = await mesh.start_workflow("approval", "to-cancel", Job(3600))
        await _eventually_value(
            lambda: _state_is(h, "waiting"), 30, "the run to wait for its signal"
        )
        st = await h.cancel()
        assert st.state == "cancelled"
        with pytest.raises(accord.WorkflowFailed) as failed:
            await h.result(timeout=10)
        assert failed.value.state == "cancelled"
        await h.signal(Approve("late"))  # ignored by an ended run
        assert (await h.status()).state == "cancelled"


async def test_cancel_compensates_completed_steps_in_reverse(cluster: Cluster) -> None:
    log = cluster.tmp / "steps.jsonl"  # type: ignore[attr-defined]
    async with cluster.connect() as mesh:
        h = await mesh.start_workflow("booking", "to-cancel", Job(3600))
        await _eventually_value(
            lambda: _state_is(h, "waiting"), 30, "the run to wait for its approval"
        )
        st = await h.cancel(timeout=30)  # waits for the compensations, then the end
        assert st.state == "cancelled", st
        with pytest.raises(accord.WorkflowFailed) as failed:
            await h.result(timeout=10)
        assert failed.value.state == "cancelled" and not failed.value.compensated
        mine = [e["step"] for e in _steps(log) if e["run"] == "booking/to-cancel"]
        # A step is at-least-once: one that was running when its shard moved (the module's
        # nodes still balancing) runs again on the new owner, right after itself.
        once = [step for i, step in enumerate(mine) if i == 0 or mine[i - 1] != step]
        assert once == ["reserve", "charge", "refund", "release"], mine  # ship never ran
        journal = await h.journal()
        undone = [(e.n, e.ok) for e in journal.entries if type(e).__name__ == "WfCompensation"]
        assert undone == [(2, True), (1, True)]  # journaled, newest first
        assert (await h.cancel()).state == "cancelled"  # again: nothing happens
        assert [e["step"] for e in _steps(log) if e["run"] == "booking/to-cancel"] == mine


async def _state_is(h: accord.WorkflowHandle, state: str) -> bool | None:
    return True if (await h.status()).state == state else None


async def test_signal_sent_before_the_wait_is_kept(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        h = await mesh.start_workflow("approval", "early", Job(3600, pause=2.0))
        await h.signal(Approve("early bird"))  # the run is still in its 2 s sleep
        assert (await h.status()).state in ("running", "waiting")
        assert await h.result(timeout=60) == "approved by early bird"
        timed_out = await mesh.start_workflow("approval", "nobody", Job(1))
        assert await timed_out.result(timeout=60) == "timeout"


async def test_a_sleeping_run_idles_out_and_its_timer_brings_it_back(cluster: Cluster) -> None:
    log = cluster.tmp / "steps.jsonl"  # type: ignore[attr-defined]
    async with cluster.connect() as mesh:
        began = time.time()
        h = await mesh.start_workflow("sleeper", "idle-nap", Job(4))

        async def woke() -> list[str] | None:  # the log only: asking the run would activate it
            mine = [str(e["step"]) for e in _steps(log) if e["run"] == "sleeper/idle-nap"]
            return mine if "woke" in mine else None

        # activated at start, deactivated after 1 s idle (no watchdog while it waits), and
        # activated again by its timer alone
        assert await _eventually_value(woke, 60, "the sleeper to wake") == [
            "activate",
            "activate",
            "woke",
        ]
        assert await h.result(timeout=60) >= began + 4.0


async def test_reminder_reactivates_a_deactivated_agent(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        await mesh.ask("pinger/p1", StartPing(delay=2.0))
        assert await mesh.ask("pinger/p1", Read()) == 0

        async def pinged() -> int | None:
            n = await mesh.ask("pinger/p1", Read())
            return n if n else None

        # pinger idles out after 0.5 s; only the durable reminder brings the Ping.
        assert await _eventually_value(pinged, 30, "the reminder's Ping") == 1


async def test_input_of_the_wrong_type_starts_nothing(cluster: Cluster) -> None:
    async with cluster.connect() as mesh:
        with pytest.raises(accord.BadRequest, match="does not decode"):
            await mesh.start_workflow("chain", "wrong-input", {"n": "not a number"})
        with pytest.raises(accord.WorkflowNotFound):
            await mesh.workflow("chain/wrong-input")
        with pytest.raises(accord.AgentTypeNotFound):
            await mesh.start_workflow("no_such_workflow", "k", Job(1))


async def test_a_local_ask_skips_the_mailbox_and_is_applied_once_per_id(nats_url: str) -> None:
    settings = accord.NodeSettings(cluster="wfhere")
    async with accord.Node(AGENTS, nats=nats_url, name="here", settings=settings) as node:
        await wait_for_placement(node, {"here"})
        appended: list[str] = []  # every mailbox append is also a core message on its subject

        async def seen(msg: object) -> None:
            appended.append(getattr(msg, "subject", ""))

        sub = await node._transport.subscribe(f"{node.names.prefix}.mbox.>", seen)
        try:
            h = await node.start_workflow("noop5", "k", Job(7))
            assert await h.result(timeout=30) == 5  # five asks of wf_counter/b7, each applied
            await node._transport.flush(5.0)
            assert appended == []  # the counter is served here: no ask went through the mailbox
            # The same ids again, in process and through the mailbox: the recorded replies.
            again = node._ask_here_once("wf_counter/b7", Add(1), "noop5/k#5", None)
            assert again is not None and await again == 5
            mailed = await node.ask("wf_counter/b7", Add(1), delivery="exactly_once",
                                    msg_id="noop5/k#2")  # fmt: skip
            assert mailed == 2
            assert len(appended) == 1
            assert (await node.ask("wf_counter/b7", Read(), returns=Total)).applied == 5
        finally:
            await sub.unsubscribe()


async def test_a_started_handle_learns_the_end_from_the_announcement_alone(
    cluster: Cluster,
) -> None:
    """`start_workflow` listens for the end before it sends the start: the handle's `result()`
    takes the end from the announcement (received even before `result()` was called), without
    reading the run index or asking the run."""
    async with cluster.connect() as mesh:
        h = await mesh.start_workflow("local5", "announced", Job(3))
        other = mesh.workflow(h.id)  # a handle without the listener: asks as before

        async def ended() -> bool | None:
            return True if (await other.status()).state == "completed" else None

        await _eventually_value(ended, 60, "the run's end")

        async def refused(*args: object, **kwargs: object) -> None:
            raise AssertionError("result() asked the run or read the index")

        h._ask = refused  # type: ignore[method-assign]
        h._under_way = refused  # type: ignore[method-assign]
        assert await h.result(timeout=30) == 3
        assert await other.result(timeout=30) == 3
