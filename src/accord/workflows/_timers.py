"""Durable timers — workflow sleeps, signal timeouts, the run watchdog and agent reminders — as
keys of one KV bucket (`accord_<cluster>_timers`), one key per (agent, timer name); a run's
watchdog is its run index entry (`watch > 0`, see `_monitor.py`).

One node at a time (elected with a lease, `accord-timers`) serves them: watches of both buckets
feed a heap, a single loop sleeps until the earliest due time and delivers the timer as an ask
to its agent. Delivery is at-least-once: a one-shot key is deleted only after the agent's turn
answered, a failed delivery is retried with backoff, a new leader re-reads every key. Nothing
polls per timer or per run; a restart of the whole cluster loses nothing (the keys are in the
bucket). Times are wall-clock seconds: skew between nodes shows as lateness.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import logging
import time
import weakref
from typing import Any

import msgspec

from .._codec import message_type_name
from .._errors import AccordError, RemoteError
from .._ids import AgentId
from ..engine._api import KV, BucketSpec, Entry, NotFound, RequestTimeout, WrongRevision
from ._mesh_api import MeshLike
from ._model import WorkflowWake
from ._monitor import RunEntry, run_index

log = logging.getLogger("accord.timers")

FIRE_TIMEOUT = 10.0
"""Seconds one delivery may take (the agent may have to be activated, its shard failed over)."""
MAX_IN_FLIGHT = 64
RETRYABLE = frozenset({"NotConnected"})
"""Handler errors that mean "could not be done now" (a workflow's watchdog not stored): the
turn failed and was rolled back, so the timer is delivered again."""
RETRY_CAP = 10.0
WAKE = "accord-wf-wake"
"""The name of a run's watchdog timer (an index entry with `watch > 0`, or, for runs started
by an older version, a key of the timer bucket)."""
_WAKE_TYPE = message_type_name(WorkflowWake)


class TimerRecord(msgspec.Struct):
    agent: str
    name: str
    due: float
    """Wall-clock time of the first firing."""
    every: float = 0.0
    """> 0: fire again every `every` seconds until forgotten."""
    msg_type: str = ""
    body: bytes = b""
    """The message, JSON-encoded (delivered with its wire type name)."""


def timer_key(agent: str, name: str) -> str:
    def b64(s: str) -> str:
        return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=") or "_"

    return f"{b64(agent)}.{b64(name)}"


_buckets: weakref.WeakKeyDictionary[Any, KV] = weakref.WeakKeyDictionary()


async def timer_bucket(mesh: MeshLike) -> KV:
    kv = _buckets.get(mesh)
    if kv is None:
        opened = await mesh._transport.bucket(
            BucketSpec(name=mesh.names.bucket("timers"), replicas=max(1, mesh.config.replicas))
        )
        _buckets[mesh] = kv = opened
    return kv


async def schedule(
    mesh: MeshLike, agent: AgentId | str, name: str, msg: msgspec.Struct, due: float,
    every: float = 0.0,
) -> None:  # fmt: skip
    """Store the timer `name` of `agent` (replacing one of that name): `msg` is delivered to the
    agent at wall-clock time `due`, then every `every` seconds if > 0. Returns once stored;
    raises `NotConnected` if that could not be confirmed (then it may or may not be stored)."""
    rec = TimerRecord(str(agent), name, due, every, message_type_name(type(msg)),
                      msgspec.json.encode(msg))  # fmt: skip
    kv = await timer_bucket(mesh)
    await kv.put(timer_key(rec.agent, name), msgspec.msgpack.encode(rec))


async def cancel(mesh: MeshLike, agent: AgentId | str, name: str) -> None:
    """Delete the timer `name` of `agent` (nothing if there is none). A delivery already under
    way may still arrive once."""
    kv = await timer_bucket(mesh)
    with contextlib.suppress(AccordError, LookupError):
        await kv.delete(timer_key(str(agent), name))


class _Timer:
    __slots__ = ("due", "inflight", "rec", "rev")

    def __init__(self, rec: TimerRecord, rev: int, due: float) -> None:
        self.rec, self.rev, self.due, self.inflight = rec, rev, due, False


class TimerService:
    """Runs on every node; serves the bucket while this node holds the `accord-timers` lease."""

    def __init__(self, mesh: MeshLike) -> None:
        self._mesh = mesh
        self.fired = 0

    async def run(self) -> None:
        while True:
            try:
                kv = await timer_bucket(self._mesh)
                runs = await run_index(self._mesh)
                ttl = max(1, int(self._mesh.config.lease_ttl))
                async for term in self._mesh.election("accord-timers", ttl=ttl):
                    log.info("%s serves the timers", self._mesh.name)
                    await _Term(self, kv, runs, term).serve()
            except asyncio.CancelledError:
                raise
            except (AccordError, OSError) as exc:
                log.warning("timer service: %s; again in 1 s", exc)
                await asyncio.sleep(1.0)


class _Term:
    """One leadership term: the heap, the watch feeding it, the deliveries."""

    def __init__(self, service: TimerService, kv: KV, runs: KV, term: Any) -> None:
        self._service = service
        self._mesh = service._mesh
        self._kv = kv
        self._runs = runs
        self._term = term
        self._timers: dict[str, _Timer] = {}
        self._heap: list[tuple[float, str]] = []
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        feeders = [
            asyncio.create_task(self._feed(self._kv, "", _timer_record), name="accord-timers"),
            asyncio.create_task(self._feed(self._runs, "run:", _watchdog), name="accord-wf-watch"),
        ]
        lost = asyncio.create_task(self._term.wait_lost(), name="accord-timers-lease")
        try:
            while not lost.done():
                self._fire_due(time.time())
                self._drop_stale()
                delay = self._heap[0][0] - time.time() if self._heap else 60.0
                self._changed.clear()
                waiter = asyncio.create_task(self._changed.wait())
                await asyncio.wait([waiter, lost, *feeders], timeout=max(0.0, min(delay, 60.0)),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                waiter.cancel()
                for feeder in feeders:
                    if feeder.done():
                        feeder.result()  # a watch failed: end the term (re-elected, re-read)
                        return
        finally:
            for t in (*feeders, lost, *self._tasks):
                t.cancel()
            await asyncio.gather(*feeders, lost, *self._tasks, return_exceptions=True)

    async def _feed(self, kv: KV, prefix: str, decode: Any) -> None:
        """Follow `kv`: each entry that `decode` makes a `TimerRecord` of is a timer (keyed
        `prefix + key`); one it makes None of (or a deletion) removes that timer."""
        watch = await kv.watch(">")
        try:
            while True:
                try:
                    e = await watch.next(30.0)
                except RequestTimeout:
                    continue
                if e is None:
                    continue
                key = prefix + e.key
                rec = None if e.deleted else decode(e)
                if rec is None:
                    self._timers.pop(key, None)
                    continue
                due = rec.due
                if rec.every > 0 and due < time.time():  # periodic: the next due time from now
                    missed = int((time.time() - due) // rec.every)
                    due += missed * rec.every
                old = self._timers.get(key)
                t = self._timers[key] = _Timer(rec, e.revision, due)
                t.inflight = old.inflight if old is not None else False
                earlier = not self._heap or due < self._heap[0][0]
                heapq.heappush(self._heap, (due, key))
                if earlier:  # else the loop wakes before this one is due anyway
                    self._changed.set()
        finally:
            await watch.stop()

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            t = self._timers.get(key)
            if t is None or t.due != due or t.inflight:
                continue  # superseded, deleted, or being delivered
            t.inflight = True
            task = asyncio.create_task(self._deliver(key, t), name=f"accord-timer-{key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_stale(self) -> None:
        """Pop the earliest heap entries whose timer is gone or was replaced (a run that ended
        before its watchdog was due: most runs), so the loop does not wake up for them."""
        heap = self._heap
        while heap:
            due, key = heap[0]
            t = self._timers.get(key)
            if t is not None and t.due == due:
                return
            heapq.heappop(heap)

    async def _deliver(self, key: str, t: _Timer) -> None:
        rec, rev, attempt = t.rec, t.rev, 0
        async with self._slots:
            while True:
                attempt += 1
                try:
                    await self._mesh.ask_json(
                        rec.agent, rec.msg_type, rec.body, delivery="at_most_once",
                        timeout=FIRE_TIMEOUT,
                    )  # fmt: skip
                    break
                except RemoteError as exc:
                    if exc.remote_type not in RETRYABLE:  # the handler raised: delivered
                        log.warning("timer %s of %s: handler raised %s", rec.name, rec.agent, exc)
                        break
                    await asyncio.sleep(min(RETRY_CAP, 0.5 * 2 ** min(attempt, 5)))
                except AccordError as exc:
                    delay = min(RETRY_CAP, 0.5 * 2 ** min(attempt, 5))
                    log.info("timer %s of %s not delivered (%s); retry in %.1f s",
                             rec.name, rec.agent, exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)
        self._service.fired += 1
        current = self._timers.get(key)
        if current is not t:  # replaced (or deleted) while delivering: the newer one stands
            if current is not None:
                current.inflight = False
                self._changed.set()
            return
        t.inflight = False
        if rec.every > 0:
            nxt = t.due + rec.every
            while nxt <= time.time():
                nxt += rec.every
            t.due = nxt
            heapq.heappush(self._heap, (nxt, key))
            self._changed.set()
            return
        try:
            await self._kv.delete(key, last=rev)
        except (WrongRevision, NotFound):
            return  # set again meanwhile: the watch brings the new one
        except AccordError as exc:
            log.warning("timer %s delivered but not deleted (%s): may fire again", key, exc)
        if self._timers.get(key) is t:
            del self._timers[key]


def _timer_record(e: Entry) -> TimerRecord | None:
    try:
        return msgspec.msgpack.decode(e.value, type=TimerRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("timer %s does not decode: skipped", e.key)
        return None


def _watchdog(e: Entry) -> TimerRecord | None:
    """A run index entry with its watchdog on: a periodic `WorkflowWake` to the run."""
    try:
        run = msgspec.json.decode(e.value, type=RunEntry)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if run.watch <= 0:
        return None
    return TimerRecord(run.id, WAKE, run.updated + run.watch, run.watch, _WAKE_TYPE, b"{}")
