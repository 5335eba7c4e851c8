"""Shard ownership through leases in a KV bucket, with fencing epochs.

A lease is the key `shard.<n>`, taken with `create` and a per-message TTL, renewed by
compare-and-set on its last revision. The create revision is the shard's fencing epoch. The owner
measures validity on its own monotonic clock from the *send* time of its last successful renewal
and stops serving `margin` seconds before the server can expire the key: never two owners at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import msgspec

from .._background import Background, cancel_and_wait
from .._clock import Clock, LoopClock, TimerHandle
from .._observe import Observers
from ..engine._api import KV, Entry, WrongRevision
from ._config import ENGINE_FAILURES, ClusterConfig
from ._detector import State
from ._losslog import LossLog
from ._membership import MemberInfo
from ._placement import assign, rank
from ._watch import follow

log = logging.getLogger("accord.shards")


class LeaseValue(msgspec.Struct):
    node: str
    epoch: int = 0  # 0 in the creating write: the epoch is that entry's own revision
    incarnation: str = ""


class ShardOwner(Protocol):
    """The node side: what to do when a shard is gained or given up."""

    async def shard_acquired(self, shard: int, epoch: int) -> None: ...
    async def shard_released(self, shard: int, graceful: bool, orphan: bool = False) -> None: ...


class Members(Protocol):
    """What shard ownership reads of membership (`Membership` is one)."""

    me: MemberInfo

    def live(self) -> list[str]: ...
    def state(self, node: str) -> State | None: ...


class Held:
    __slots__ = ("epoch", "releasing", "renewing", "revision", "shard", "timer", "valid_until")

    def __init__(self, shard: int, epoch: int, valid_until: float) -> None:
        self.shard = shard
        self.epoch = epoch
        self.revision = epoch
        self.valid_until = valid_until
        self.releasing = False
        self.renewing = False  # one renewal at a time: two would race on the same revision
        self.timer: TimerHandle | None = None


class LeaseView(msgspec.Struct, frozen=True):
    node: str
    epoch: int
    revision: int = 0
    seen_at: float = 0.0  # local monotonic time this write was observed


_lease_dec = msgspec.msgpack.Decoder(LeaseValue)
_lease_enc = msgspec.msgpack.Encoder()


class ShardManager:
    """Takes, renews, hands off and loses this node's shard leases in the leases bucket `kv`.

    Every timer and loop pause runs on `clock` (a `VirtualClock` drives it in unit tests).
    """

    def __init__(
        self,
        kv: KV,
        config: ClusterConfig,
        membership: Members,
        owner: ShardOwner,
        *,
        margin: float | None = None,
        clock: Clock | None = None,
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        self._kv = kv
        self._n = config.num_shards
        self._ttl = config.lease_ttl
        self._margin = margin if margin is not None else max(0.25, 0.15 * config.lease_ttl)
        self._members = membership
        self._me = membership.me.name
        self._owner = owner
        self._clock = clock = clock or LoopClock()
        # A lease write unanswered for half a TTL cannot help any more (validity runs out).
        self._io_timeout = max(0.5, config.lease_ttl / 2)
        self._held: dict[int, Held] = {}
        self._busy: set[int] = set()  # shards with an acquire or release under way
        self.table: dict[int, LeaseView] = {}
        self.previous_epoch: dict[int, int] = {}  # last known epoch of a now-free shard
        self._last_lease: dict[int, LeaseView] = {}  # of a now-free shard (failover seconds)
        self._free_since: dict[int, float] = dict.fromkeys(range(self._n), clock.now())
        self._wake = asyncio.Event()
        self._leaving = False
        self._tasks: list[asyncio.Task[None]] = []
        self._bg = Background()
        self._synced = asyncio.Event()
        self._losses = LossLog(clock, log)

    # -- queries used on the hot path -------------------------------------------------------

    def serving(self, shard: int) -> int | None:
        """The epoch if this node may take new messages for `shard` now, else None."""
        h = self._held.get(shard)
        if h is None or h.releasing or self._clock.now() >= h.valid_until:
            return None
        return h.epoch

    def held_epoch(self, shard: int) -> int | None:
        """The epoch if this node validly holds `shard` now, even while handing it off."""
        h = self._held.get(shard)
        if h is None or self._clock.now() >= h.valid_until:
            return None
        return h.epoch

    def valid(self, shard: int, epoch: int) -> bool:
        """May a turn of an activation born in `epoch` run (or reply) now? True while draining."""
        h = self._held.get(shard)
        return h is not None and h.epoch == epoch and self._clock.now() < h.valid_until

    def held(self) -> dict[int, int]:
        return {s: h.epoch for s, h in self._held.items()}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(), name="accord-leases-watch"),
            asyncio.create_task(self._renew_loop(), name="accord-lease-renew"),
            asyncio.create_task(self._reconcile_loop(), name="accord-reconcile"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), 5.0)

    def resync(self) -> None:
        """Restart the leases watch (its consumer may sit on a server we can no longer reach)."""
        if self._tasks and not self._tasks[0].done():
            self._tasks[0].cancel()
            self._tasks[0] = asyncio.create_task(self._watch(), name="accord-leases-watch")

    def wake(self) -> None:
        self._wake.set()

    async def leave(self, timeout: float) -> None:
        """Hand every held shard off gracefully (drain, deactivate, release)."""
        self._leaving = True
        deadline = self._clock.now() + timeout
        while self._held and self._clock.now() < deadline:
            mine = [s for s in self._held if s not in self._busy]
            self._busy.update(mine)  # claimed now, so the reconcile loop cannot release them too
            await asyncio.gather(*(self._release(s) for s in mine), return_exceptions=True)
            if self._held:  # acquisitions or releases still under way
                await self._clock.sleep(0.02)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        await self._bg.close()
        for shard in list(self._held):
            await self._lose(shard, "node stopping")
        self._losses.flush()

    # -- loops ------------------------------------------------------------------------------

    async def _watch(self) -> None:
        # Every held lease is renewed each TTL/4, so a live cluster writes here several times a
        # second; silence for 2 TTLs means the watch's consumer sits on a server we cannot reach
        # (or died): start a new one. A restart only replays the current keys.
        await follow(
            self._kv,
            self._apply,
            stall=max(3.0, 2.0 * self._ttl),
            synced=self._on_synced,
            clock=self._clock,
            what="leases",
        )

    def _on_synced(self) -> None:
        self._synced.set()
        self.wake()

    def _apply(self, entry: Entry) -> None:
        try:
            shard = int(entry.key.removeprefix("shard."))
        except ValueError:
            return
        if entry.deleted or not entry.value:
            self._forget(shard)
            self.wake()
            return
        try:
            lease = _lease_dec.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("ignoring malformed lease entry %r", entry.key)
            return
        revision = entry.revision
        self.table[shard] = LeaseView(
            lease.node, lease.epoch or revision, revision, self._clock.now()
        )
        self._free_since.pop(shard, None)

    async def _renew_loop(self) -> None:
        # Each renewal runs on its own: one that is slow (a JetStream request lost in a leader
        # election, or losing a shard whose activations take long to stop) must not hold up the
        # renewals of every other shard until their leases run out too.
        interval = self._ttl / 4
        while True:
            await self._clock.sleep(interval)
            for shard in list(self._held):
                self._bg.spawn(self._renew(shard), name=f"accord-renew-{shard}")

    async def _renew(self, shard: int) -> None:
        h = self._held.get(shard)
        if h is None or h.renewing:
            return
        h.renewing = True
        try:
            await self._renew_held(h)
        finally:
            h.renewing = False

    async def _renew_held(self, h: Held) -> None:
        shard = h.shard
        key = f"shard.{shard}"
        sent = self._clock.now()
        value = _lease_enc.encode(LeaseValue(self._me, h.epoch, self._members.me.incarnation))
        try:
            try:
                revision = await self._write(key, value, h.revision)
            except WrongRevision:
                # Refused: another node took the key, or it expired, or an earlier renewal of
                # ours was applied with its reply lost — or is still pending on a stream leader
                # cut off from its quorum, which checks against what it proposed, not what was
                # committed. Only the first is a reason to stop at once (and not serve from
                # memory: that node is reachable); otherwise our validity simply runs out.
                adopted = await self._own_revision(shard)
                if adopted is None:
                    return
                h.revision = adopted
                revision = await self._write(key, value, adopted)
        except WrongRevision:
            return
        except ENGINE_FAILURES as exc:  # not confirmed: the lease may be ours, validity decides
            log.debug("renewal of shard %d failed: %s", shard, exc)
            return
        if self._held.get(shard) is h:
            h.revision = revision
            self._set_valid(h, sent + self._ttl - self._margin)

    async def _own_revision(self, shard: int) -> int | None:
        """The stored revision of our lease on `shard`; None if absent or unreadable. Stops
        serving `shard` at once if the stored lease is another node's."""
        last = await self._kv.get(f"shard.{shard}", leader=True, timeout=self._io_timeout)
        if last is None:
            return None
        try:
            lease = _lease_dec.decode(last.value)
        except msgspec.DecodeError:
            return None
        if lease.node != self._me or lease.incarnation != self._members.me.incarnation:
            await self._lose(shard, f"lease taken by {lease.node}")
            return None
        return last.revision

    async def _write(self, key: str, value: bytes, last: int) -> int:
        """Renew (or take over) the lease `key` by compare-and-set on revision `last`, with a
        fresh TTL; `WrongRevision` if the key moved on."""
        return await self._kv.update(key, value, last, ttl=self._ttl, timeout=self._io_timeout)

    def _set_valid(self, h: Held, until: float) -> None:
        h.valid_until = until
        if h.timer:
            h.timer.cancel()
        h.timer = self._clock.call_at(until, lambda: self._check_valid(h))

    def _check_valid(self, h: Held) -> None:
        if self._held.get(h.shard) is h and self._clock.now() >= h.valid_until:
            # Renewals stopped getting through (partition, overload): agent types that tolerate it
            # may keep serving from memory (see Node.shard_released).
            self._bg.spawn(self._lose(h.shard, "lease not renewed in time", orphan=True))

    async def _reconcile_loop(self) -> None:
        while True:
            await self._woken(0.25)
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:
                log.exception("reconcile failed")

    async def _woken(self, seconds: float) -> None:
        """Return once `wake()` was called, or after `seconds` on the clock."""
        if self._wake.is_set():
            return
        timer = self._clock.call_at(self._clock.now() + seconds, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    def _reconcile(self) -> None:
        live = self._members.live()
        desired = assign(self._n, live)
        now = self._clock.now()
        for shard in range(self._n):
            if shard in self._busy:
                continue
            want = desired.get(shard) == self._me and not self._leaving
            h = self._held.get(shard)
            if h is not None:
                target = desired.get(shard)
                handoff = target is not None and (
                    self._leaving or self._members.state(target) is State.ALIVE
                )
                if not want and not h.releasing and handoff:
                    self._busy.add(shard)
                    self._bg.spawn(self._release(shard))
                continue
            if self._leaving:
                continue
            current = self.table.get(shard)
            if current is not None:
                # The server expires an unrenewed lease by TTL, but a stream leader elected after
                # a partition may not (yet) do so. A holder stops serving before TTL after its last
                # renewal was sent; we saw that renewal after it was sent: so once TTL + grace has
                # passed since we saw it, the desired owner may take the key over by CAS on that
                # very revision (any renewal in between makes the CAS fail). Our own lease that
                # we no longer hold too: a re-created lease bucket (memory storage lost with a
                # server restart) left no deletion marker to clear it from the table.
                stale = now - current.seen_at > self._ttl + 1.0
                if want and stale:
                    self._busy.add(shard)
                    self._bg.spawn(self._acquire(shard, over=current.revision))
                continue
            if not want:
                # Fallback when the desired owner never comes (views differ, or it died):
                # after a grace period the next nodes in rank order take it, staggered.
                order = [n for n in rank(shard, live)]
                pos = order.index(self._me) if self._me in order else len(order)
                free_for = now - self._free_since.get(shard, now)
                if free_for < self._ttl + 0.25 * pos:
                    continue
            self._busy.add(shard)
            log.debug("acquiring shard %d (desired %s)", shard, desired.get(shard))
            self._bg.spawn(self._acquire(shard))

    async def _acquire(self, shard: int, over: int = 0) -> None:
        try:
            sent = self._clock.now()
            before = self.table.get(shard) or self._last_lease.get(shard)
            value = _lease_enc.encode(LeaseValue(self._me, 0, self._members.me.incarnation))
            try:
                if over:
                    rev = await self._take_over(shard, value, over)
                    if rev is None:
                        return
                else:
                    rev = await self._create(f"shard.{shard}", value)
            except WrongRevision:
                log.debug("shard %d not acquired: it is held", shard)
                return  # somebody else holds it
            except ENGINE_FAILURES as exc:
                log.debug("acquire of shard %d failed: %s", shard, exc)
                return
            h = Held(shard, rev, sent + self._ttl - self._margin)
            self._held[shard] = h
            self._set_valid(h, h.valid_until)
            self.table[shard] = LeaseView(self._me, rev, rev, self._clock.now())
            self._free_since.pop(shard, None)
            log.info("acquired shard %d epoch %d", shard, rev)
            if self._observe.active:
                self._observe.shard_acquired(shard, rev, self._failover(before))
            await self._owner.shard_acquired(shard, rev)
            await self._renew(shard)  # records the epoch in the lease value
        finally:
            self._busy.discard(shard)

    def _failover(self, before: LeaseView | None) -> float | None:
        """Seconds since a dead previous owner was last seen renewing (None: not a failover)."""
        if before is None or before.node == self._me:
            return None
        if self._members.state(before.node) not in (State.DEAD, State.SUSPECT, None):
            return None
        return max(0.0, self._clock.now() - before.seen_at)

    async def _take_over(self, shard: int, value: bytes, over: int) -> int | None:
        """Take `shard` from a lease seen unrenewed at revision `over`: by CAS on that revision.
        When the CAS fails our view is stale — the key was renewed, or it expired without a
        deletion marker reaching our watch (a stream leader elected during a partition expires
        keys silently) — so read the key itself: absent, take it by create; held, record the
        holder as seen now, so it gets a full TTL before the next attempt."""
        key = f"shard.{shard}"
        try:
            rev = await self._write(key, value, over)
        except WrongRevision:
            last = await self._kv.get(key, leader=True, timeout=self._io_timeout)
            if last is not None:
                try:
                    lease = _lease_dec.decode(last.value)
                except msgspec.DecodeError:
                    return None
                self.table[shard] = LeaseView(
                    lease.node, lease.epoch or last.revision, last.revision, self._clock.now()
                )
                return None
            self._forget(shard)
            rev = await self._create(key, value)
            log.warning("took over shard %d: its expired lease had left no marker", shard)
            return rev
        log.warning("took over shard %d from a lease not renewed for %.1fs", shard,
                    self._ttl + 1.0)  # fmt: skip
        return rev

    async def _create(self, key: str, value: bytes) -> int:
        """Take the free lease `key` (absent, deleted or expired); `WrongRevision` if held. The
        returned revision is the shard's new fencing epoch."""
        return await self._kv.create(key, value, ttl=self._ttl, timeout=self._io_timeout)

    def _forget(self, shard: int) -> None:
        gone = self.table.pop(shard, None)
        if gone is not None:
            self.previous_epoch[shard] = gone.epoch
            self._last_lease[shard] = gone
        self._free_since[shard] = self._clock.now()

    async def _release(self, shard: int) -> None:
        self._busy.add(shard)
        try:
            h = self._held.get(shard)
            if h is None or h.releasing:
                return  # gone, or another release of it is under way
            h.releasing = True
            log.info("handing off shard %d epoch %d", shard, h.epoch)
            await self._owner.shard_released(shard, True)
            if self._held.get(shard) is not h:
                return  # lost while draining
            del self._held[shard]
            if h.timer:
                h.timer.cancel()
            if self._observe.active:
                self._observe.shard_released(shard, True)
            # Best effort: if it fails, the key expires by its TTL.
            with contextlib.suppress(WrongRevision, *ENGINE_FAILURES):
                await self._kv.delete(f"shard.{shard}", last=h.revision, timeout=self._io_timeout)
        finally:
            self._busy.discard(shard)
            self.wake()

    async def _lose(self, shard: int, why: str, orphan: bool = False) -> None:
        h = self._held.pop(shard, None)
        if h is None:
            return
        if h.timer:
            h.timer.cancel()
        self._losses.add(shard, h.epoch, why)
        if self._observe.active:
            self._observe.shard_released(shard, False)
        await self._owner.shard_released(shard, False, orphan)
        self.wake()
