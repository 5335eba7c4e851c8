"""Shard ownership on the node side (the `ShardOwner` that `cluster/_shards.py` drives): subscribe
to a shard's subject and consume its mailbox when the shard is gained; drain, stop or keep serving
(cut off) its activations when it is given up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from .._background import Background
from .._retry import Backoff
from .._spec import AgentSpec
from ..cluster._config import Names
from ..cluster._membership import MemberInfo
from ..cluster._shards import ShardManager
from ..delivery._mailbox import ShardMailbox
from ..engine._api import Engine, Message, Subscription
from ._activation import Activation
from ._bulkhead import Bulkhead
from ._cutoff import CutOff
from ._inbound import Inbound
from ._table import ActivationTable

log = logging.getLogger("accord.node")


class ShardHost:
    """Subscriptions and mailbox consumers per held shard epoch. The `ShardManager` that drives
    it, and the inbound dispatch and cut-off serving that need that manager, are attached once
    they exist (`attach`, before the manager starts)."""

    shards: ShardManager
    _inbound: Inbound
    _cutoff: CutOff

    def __init__(
        self,
        names: Names,
        specs: Iterable[AgentSpec],
        transport: Engine,
        table: ActivationTable,
        bulkhead: Bulkhead,
        me: MemberInfo,
        needs_mailbox: bool,
        drain_timeout: float,
        sends: Background,
        running: Callable[[], bool],
    ) -> None:
        self._names = names
        self._specs = list(specs)
        self._transport = transport
        self._table = table
        self._bulkhead = bulkhead
        self._me = me
        self._needs_mailbox = needs_mailbox
        self._drain_timeout = drain_timeout
        self._sends = sends
        self._running = running
        self._subs: dict[int, Subscription] = {}
        self._epochs: dict[int, int] = {}
        self._mailboxes: dict[int, ShardMailbox] = {}

    def attach(self, shards: ShardManager, inbound: Inbound, cutoff: CutOff) -> None:
        self.shards = shards
        self._inbound = inbound
        self._cutoff = cutoff

    async def shard_acquired(self, shard: int, epoch: int) -> None:
        inbound = self._inbound

        def on_msg(msg: Message) -> None:
            inbound.on_request(shard, msg)

        await self._cutoff.acquired(shard)
        subject = self._names.shard_subject(shard)
        sub = await self._transport.subscribe_direct(subject, on_msg)
        # The lease may have been lost while this awaited: its release found no subscription
        # to end, so this one must not stay (a later epoch's would overwrite and leak it, and
        # the shard's messages would then reach this node twice).
        stale = self._subs.pop(shard, None)
        if stale is not None:
            await stale.unsubscribe()
        if self.shards.held().get(shard) != epoch:  # (whatever its validity by the clock)
            await sub.unsubscribe()
            return
        self._subs[shard] = sub
        self._epochs[shard] = epoch
        self._me.shards = len(self._subs)
        if not self._needs_mailbox:
            return
        if not await self._start_mailbox(shard, epoch):
            # JetStream trouble (an election, a busy server): core messaging works meanwhile;
            # durable messages and split-brain merges wait in the stream until it starts.
            self._sends.spawn(self._retry_mailbox(shard, epoch), name=f"accord-mbox-{shard}")

    async def _start_mailbox(self, shard: int, epoch: int) -> bool:
        """Consume `shard`'s mailbox for `epoch`; False if JetStream refused (try again)."""
        shards = self.shards
        mailbox = ShardMailbox(
            self._transport,
            self._names,
            shard,
            epoch,
            self._inbound.on_mailbox,
            self._bulkhead.wait_capacity,
            lambda: shards.valid(shard, epoch),
        )
        try:
            await mailbox.start(shards.previous_epoch.get(shard))
        except Exception as exc:
            log.warning("mailbox of shard %d not started: %s", shard, exc)
            return False
        if self._epochs.get(shard) != epoch or shard in self._mailboxes:
            await mailbox.stop()  # the shard was released (or re-acquired) meanwhile
        else:
            self._mailboxes[shard] = mailbox
        return True

    async def _retry_mailbox(self, shard: int, epoch: int) -> None:
        backoff = Backoff(0.5, 4.0)
        while self._running() and self._epochs.get(shard) == epoch:
            await asyncio.sleep(backoff.next())
            if self._epochs.get(shard) != epoch or shard in self._mailboxes:
                return
            if await self._start_mailbox(shard, epoch):
                return

    async def shard_released(self, shard: int, graceful: bool, orphan: bool = False) -> None:
        sub = self._subs.pop(shard, None)
        epoch = self._epochs.pop(shard, None)
        self._me.shards = len(self._subs)
        mailbox = self._mailboxes.pop(shard, None)
        if mailbox is not None:
            await mailbox.stop()  # stop pulling; what was fetched is drained below
        tolerant = [s.type_name for s in self._specs if s.options.failover != "absolute"]
        if orphan and tolerant and sub is not None and epoch is not None:
            # Cut off (renewals failed): keep answering for split-brain/degraded agent types from
            # memory; absolute ones stop below. Ends when the partition heals.
            self._cutoff.begin_orphan(shard, sub, epoch, tolerant)
            sub = None
        if sub is not None:
            with contextlib.suppress(Exception):
                if graceful:
                    await sub.drain()
                else:
                    await sub.unsubscribe()
        # Agents of this shard placed here by override are not the shard's: they stay.
        acts = self._table.in_shard(
            shard, lambda a: not a.orphan and (epoch is None or a.epoch == epoch)
        )
        if not graceful:
            # A CRDT turn in flight may still finish and persist: its write merges, it never
            # overwrites, and it will not reply. Everything else stops at once.
            merging = [a for a in acts if a.spec.options.consistency == "crdt"]
            for act in merging:
                act.close()
            if merging:
                self._sends.spawn(_bounded(merging, self._drain_timeout))
            acts = [a for a in acts if a.spec.options.consistency != "crdt"]
        if graceful:
            for act in acts:
                act.close()
            if acts:
                await asyncio.wait([a.task for a in acts], timeout=self._drain_timeout)
            acts = [a for a in acts if not a.task.done()]
        for act in acts:
            act.task.cancel()
        for act in acts:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await act.task


async def _bounded(acts: list[Activation], timeout: float) -> None:
    """Let `acts` finish within `timeout`, then cancel what is left."""
    await asyncio.wait([a.task for a in acts], timeout=timeout)
    for act in acts:
        act.task.cancel()
