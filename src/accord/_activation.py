"""One activation of one virtual agent: a mailbox and a task that runs one turn at a time.

An activation belongs to a shard epoch. Before each turn, and again before replying, it checks that
its node still validly holds that epoch; once not, it stops without running or answering anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._agent import Agent, AgentSpec, HandlerSpec
from ._context import current_deadline, current_sender
from ._errors import AccordError, RemoteError
from ._ids import AgentId

if TYPE_CHECKING:
    from ._node import Node

log = logging.getLogger("accord.activation")

ReplyFn = Callable[[Any, BaseException | None], None]


class Work:
    """A message accepted for an agent. `reply` is None for a tell."""

    __slots__ = ("deadline", "handler", "msg", "reply")

    def __init__(
        self, handler: HandlerSpec, msg: Any, deadline: float | None, reply: ReplyFn | None
    ) -> None:
        self.handler = handler
        self.msg = msg
        self.deadline = deadline
        self.reply = reply


class Activation:
    def __init__(
        self,
        node: Node,
        agent_id: AgentId,
        spec: AgentSpec,
        shard: int,
        epoch: int,
        previous: asyncio.Task[None] | None,
    ) -> None:
        self.node = node
        self.id = agent_id
        self.spec = spec
        self.shard = shard
        self.epoch = epoch
        self.queue: deque[Work] = deque()
        self.last_active = node.loop.time()
        self.closing = False  # drain what is queued, then deactivate
        self.busy = False
        self._waiter: asyncio.Future[None] | None = None
        self._previous = previous
        self.task = node.loop.create_task(self._run(), name=f"accord-agent-{agent_id}")

    def put(self, work: Work) -> None:
        self.queue.append(work)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        """Deactivate once the mailbox is empty (idle timeout, graceful handoff, node stop)."""
        self.closing = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _run(self) -> None:
        node = self.node
        if self._previous is not None:  # the last activation of this id is still deactivating
            await asyncio.shield(self._previous)
            self._previous = None
        agent = self.spec.cls()
        agent.id = self.id
        agent.mesh = node
        activated = False
        try:
            await agent.on_activate()
            activated = True
            node.stats.activations += 1
            await self._turns(agent)
        except asyncio.CancelledError:
            pass  # lease lost: stop at once
        except Exception as exc:
            log.exception("activation of %s failed", self.id)
            self._fail_queued(RemoteError(type(exc).__name__, f"activation failed: {exc}"))
        finally:
            node.activation_ended(self)
            if activated:
                await self._deactivate(agent)

    async def _turns(self, agent: Agent) -> None:
        node = self.node
        loop = node.loop
        queue = self.queue
        while True:
            if not queue:
                if self.closing:
                    return
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            work = queue.popleft()
            if not node.shards_valid(self.shard, self.epoch):
                return  # the lease moved on: nothing more runs or replies here
            if work.deadline is not None and loop.time() >= work.deadline:
                node.stats.expired += 1
                continue  # the caller has given up; running it would be wasted and unseen
            self.busy = True
            dl_token = current_deadline.set(work.deadline)
            sender_token = current_sender.set(str(self.id))
            try:
                result = await work.handler.fn(agent, work.msg)
                error: BaseException | None = None
            except Exception as exc:
                result, error = None, _as_remote(exc)
                node.stats.handler_errors += 1
                log.debug("handler %s of %s raised", work.handler.name, self.id, exc_info=True)
            finally:
                current_deadline.reset(dl_token)
                current_sender.reset(sender_token)
                self.busy = False
                self.last_active = loop.time()
            node.stats.turns += 1
            if work.reply is not None and node.shards_valid(self.shard, self.epoch):
                work.reply(result, error)

    def _fail_queued(self, error: AccordError) -> None:
        while self.queue:
            work = self.queue.popleft()
            if work.reply is not None:
                work.reply(None, error)

    async def _deactivate(self, agent: Agent) -> None:
        try:
            await asyncio.wait_for(agent.on_deactivate(), self.node.settings.deactivate_timeout)
        except Exception:
            log.exception("on_deactivate of %s failed", self.id)


def _as_remote(exc: Exception) -> AccordError:
    if isinstance(exc, AccordError):
        return exc if isinstance(exc, RemoteError) else RemoteError(type(exc).__name__, str(exc))
    return RemoteError(type(exc).__name__, str(exc))
