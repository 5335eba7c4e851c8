"""What operators see of workflow runs: the run index (a KV bucket, one key per run, written at
start, end, cancel, retry and when a run parks or wakes — not per step) that `accord workflows`
lists, and the lifecycle events appended to the cluster's events stream
(`<prefix>.events.workflow`).

An index entry with `watch > 0` is also the run's watchdog: the timer service wakes the run every
`watch` seconds until an entry without it replaces it (one key per run for both, so starting and
ending a run cost one write each). Both are written by the run's agent in the turn that makes the
transition — the event before the turn's commit, the entry with it (sent with the journal append):
an entry or event of a turn that was then fenced may show (and be corrected by the next owner's
write); the journal is the truth.
"""

from __future__ import annotations

import base64
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .._errors import AccordError
from ..engine._api import KV, BucketSpec
from ..state._commit import with_commit
from ._mesh_api import MeshLike

log = logging.getLogger("accord.workflows")


class RunEntry(msgspec.Struct, kw_only=True):
    """One run in the index."""

    id: str
    type: str
    state: str
    steps_done: int = 0
    attempts: int = 0
    error: str = ""
    started: float = 0.0
    updated: float = 0.0
    watch: float = 0.0
    """> 0: the run's watchdog is on — the timer service delivers `WorkflowWake` to it every
    `watch` seconds from `updated` (it is running; 0 once it ended or parked in a wait)."""


class RunEvent(msgspec.Struct, kw_only=True):
    """One lifecycle transition: `started`, `step_completed`, `step_retried`, `step_failed`,
    `compensating`, `compensation_failed`, `completed`, `failed`, `compensated`, `cancelled`,
    `retried`."""

    run: str
    event: str
    step: str = ""
    attempt: int = 0
    error: str = ""
    at: float = 0.0
    node: str = ""


_buckets: weakref.WeakKeyDictionary[Any, KV] = weakref.WeakKeyDictionary()


async def run_index(mesh: MeshLike) -> KV:
    kv = _buckets.get(mesh)
    if kv is None:
        opened = await mesh._transport.bucket(
            BucketSpec(name=mesh.names.bucket("workflows"), replicas=max(1, mesh.config.replicas))
        )
        _buckets[mesh] = kv = opened
    return kv


def index_key(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=") or "_"


async def index(mesh: MeshLike, entry: RunEntry, *, required: bool = False) -> None:
    """Write the run's index entry. A failure is logged (the index is a view, not the truth),
    or raised (`NotConnected`) when `required`: an entry that arms the watchdog must be stored."""
    try:
        kv = await run_index(mesh)
        await kv.put(index_key(entry.id), msgspec.json.encode(entry))
    except AccordError as exc:
        if required:
            raise
        log.warning("run index of %s not written: %s", entry.id, exc)


_INDEX_SEQ = "_accord_wf_index_seq"


def index_with_commit(agent: Any, entry: RunEntry) -> None:
    """In a turn of the run's agent: write its index entry with the turn's commit, concurrently
    with the turn's journal append (`state.with_commit`: one flush, one round trip less) — the
    turn answers once both are stored. The last entry a turn gives is the one written. An entry
    with the watchdog on (`watch` > 0) must be stored (the commit fails otherwise, and the
    activation ends), else a failure is only logged."""
    seq = agent.__dict__[_INDEX_SEQ] = agent.__dict__.get(_INDEX_SEQ, 0) + 1

    async def write() -> None:
        if agent.__dict__.get(_INDEX_SEQ) == seq:  # not replaced by a later entry of the turn
            await index(agent.mesh, entry, required=entry.watch > 0)

    with_commit(agent, write)


async def unindex(mesh: MeshLike, run_id: str) -> None:
    """Remove the index entry of a run that never started (a start whose turn then failed)."""
    try:
        kv = await run_index(mesh)
        await kv.delete(index_key(run_id))
    except (AccordError, LookupError) as exc:
        log.info("run index of %s not removed: %s", run_id, exc)


async def list_runs(mesh: MeshLike) -> list[RunEntry]:
    """Every indexed run, by id."""
    kv = await run_index(mesh)
    runs = []
    for key in await kv.keys():
        e = await kv.get(key)
        if e is not None:
            try:
                runs.append(msgspec.json.decode(e.value, type=RunEntry))
            except msgspec.DecodeError:
                continue
    return sorted(runs, key=lambda r: r.id)


def done_subject(mesh: MeshLike, run_id: str) -> str:
    """Where a run's end is announced (a core publish: `result()` waits for it, and still asks
    the run's status every few seconds in case the announcement was lost)."""
    return f"{mesh.names.prefix}.wf.done.{index_key(run_id)}"


async def announce_end(mesh: MeshLike, run_id: str, report: bytes = b"") -> None:
    """Announce the run's end; `report` (its msgpack `WorkflowReport`, once the end is
    journaled) lets a waiting `result()` return without asking the run again."""
    try:
        await mesh._transport.publish(done_subject(mesh, run_id), report)
    except AccordError as exc:
        log.debug("end of %s not announced: %s", run_id, exc)


async def event(mesh: MeshLike, run: str, name: str, *, step: str = "", attempt: int = 0,
                error: str = "") -> None:  # fmt: skip
    """Append a lifecycle event to the events stream (buffered publish: may be lost with the
    connection; monitoring, not the journal)."""
    ev = RunEvent(run=run, event=name, step=step, attempt=attempt, error=error, at=time.time(),
                  node=mesh.name)  # fmt: skip
    try:
        await mesh._transport.publish(
            mesh.names.events_subject("workflow"), msgspec.json.encode(ev)
        )
    except AccordError as exc:
        log.debug("workflow event not published: %s", exc)
    for publish in _lifecycle_publishers.get(mesh, ()):
        try:
            await publish(ev)
        except Exception as exc:  # a monitoring sink must never fail the run's turn
            log.warning("workflow event not handed to %r: %s", publish, exc)


# -- the hook for other sinks of lifecycle events (the event bus: accord.bus.workflow_events) --

#: Awaited with each lifecycle event after the events-stream publish, inside the run's turn.
LifecyclePublisher = Callable[[RunEvent], Awaitable[None]]
_lifecycle_publishers: weakref.WeakKeyDictionary[Any, list[LifecyclePublisher]] = (
    weakref.WeakKeyDictionary()
)


def add_lifecycle_publisher(mesh: Any, publish: LifecyclePublisher) -> Callable[[], None]:
    """Also hand the lifecycle events of runs hosted through `mesh` (a node's) to `publish`;
    returns the function that removes it again."""
    publishers = _lifecycle_publishers.setdefault(mesh, [])
    publishers.append(publish)
    return lambda: publishers.remove(publish) if publish in publishers else None
