"""Membership: each node heartbeats its entry in the members bucket; every node watches the bucket,
feeds its failure detector and records each transition in the cluster's events stream.

Heartbeats carry a per-message TTL so a dead node's entry disappears from the bucket on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec

from .._background import Background, cancel_and_wait
from ..engine._api import KV, Entry, JetStream
from ._config import ENGINE_FAILURES, Names
from ._detector import FailureDetector, State, Transition
from ._watch import follow

log = logging.getLogger("accord.membership")

MEMBER_TTL = 30  # seconds a heartbeat keeps a member entry alive


class MemberInfo(msgspec.Struct):
    """A node's self-description, rewritten with every heartbeat."""

    name: str
    incarnation: str
    pid: int
    host: str
    started_at: float
    status: str = "up"  # "up" | "leaving"
    shards: int = 0
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    ts: float = 0.0
    metrics_url: str = ""  # the node's /metrics ("" when off); /healthz, /readyz beside it
    types: list[str] = msgspec.field(default_factory=list)  # the agent types hosted there


_info_dec = msgspec.json.Decoder(MemberInfo)
_trans_enc = msgspec.json.Encoder()


class Membership:
    def __init__(
        self,
        js: JetStream,
        kv: KV,
        names: Names,
        me: MemberInfo,
        *,
        heartbeat_interval: float,
        suspect_after: float,
        dead_after: float,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self._kv = kv
        self._names = names
        self.me = me
        self._interval = heartbeat_interval
        self._on_change = on_change
        self.detector = FailureDetector(
            me.name,
            suspect_after=suspect_after,
            dead_after=dead_after,
            clock=clock,
            wall=time.time,
        )
        self.infos: dict[str, MemberInfo] = {}
        self.history: deque[Transition] = deque(maxlen=200)
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()
        self.on_stall: Callable[[], None] = lambda: None
        self.confirmed = 0.0  # monotonic send time of the last heartbeat the engine confirmed
        self._bg = Background()
        self._clock = clock
        self.last_beat = clock()  # when a heartbeat was last confirmed (health checks)

    async def start(self) -> None:
        await self.beat()
        self._tasks = [
            asyncio.create_task(self._watch(), name="accord-members-watch"),
            asyncio.create_task(self._beat_loop(), name="accord-heartbeat"),
            asyncio.create_task(self._tick_loop(), name="accord-fd-tick"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), 5.0)

    def live(self) -> list[str]:
        return self.detector.live()

    def state(self, node: str) -> State | None:
        return self.detector.state(node)

    async def beat(self) -> None:
        """Write this node's entry now (raises `NotConnected` if it was not confirmed)."""
        self.me.ts = time.time()
        sent = time.monotonic()
        await self._kv.put(
            f"node.{self.me.name}", msgspec.json.encode(self.me), ttl=MEMBER_TTL, timeout=2.0
        )
        self.last_beat = self._clock()
        self.confirmed = sent

    async def leave(self) -> None:
        """Announce a clean departure: peers stop placing shards here."""
        self.me.status = "leaving"
        with contextlib.suppress(*ENGINE_FAILURES):
            await self.beat()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self._bg.close()
        with contextlib.suppress(*ENGINE_FAILURES):
            await self._kv.delete(f"node.{self.me.name}")

    async def _beat_loop(self) -> None:
        failing = False  # one WARNING per outage, not one per heartbeat
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.beat()
            except ENGINE_FAILURES as exc:  # NATS away: the detector on the other side judges us
                (log.debug if failing else log.warning)("heartbeat failed: %s", exc)
                failing = True
                continue
            if failing:
                log.info("heartbeats confirmed again")
                failing = False

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval / 2)
            self._record(self.detector.tick())

    async def _watch(self) -> None:
        # Our own heartbeats flow through this watch several times a second, so silence means
        # the watch's consumer is gone (its server cut off or dead): start a new one.
        await follow(
            self._kv,
            self._apply,
            stall=max(2.0, 8 * self._interval),
            synced=self._synced.set,
            restarted=lambda: self.on_stall(),
            what="members",
        )

    def _apply(self, entry: Entry) -> None:
        name = entry.key.removeprefix("node.")
        if entry.deleted or not entry.value:
            self.infos.pop(name, None)
            self._record(self.detector.departed(name, "member entry removed"))
            return
        try:
            info = _info_dec.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("ignoring malformed member entry %r", entry.key)
            return
        known = self.infos.get(name)
        if known is not None and known.incarnation == info.incarnation and info.ts <= known.ts:
            return  # a replayed old heartbeat (watch restart) is no sign of life
        self.infos[name] = info
        leaving = info.status == "leaving"
        was_leaving = self._was_leaving(name)
        self._record(self.detector.heartbeat(name, info.incarnation, leaving))
        if leaving != was_leaving:
            self._on_change()

    def _was_leaving(self, name: str) -> bool:
        return name not in self.detector.live() and self.detector.state(name) in (
            State.ALIVE,
            State.SUSPECT,
        )

    def _record(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        for t in transitions:
            self.history.append(t)
            log.info("member %s: %s -> %s (%s)", t.node, t.old, t.new, t.reason)
            self._bg.spawn(self._publish(t))
        self._on_change()

    async def _publish(self, t: Transition) -> None:
        # The bucket is the truth; the event is a copy for `accord events` and post-mortems.
        with contextlib.suppress(*ENGINE_FAILURES):
            await self._js.append(self._names.events_subject("fd"), _trans_enc.encode(t))
