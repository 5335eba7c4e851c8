"""Worker pools, node side: every hosted `stateless` agent type is served here by competing
consumers, not by the owner of a shard (no activation, no state, no per-key order).

Per type and node: a queue-group subscription for asks (beyond `max_concurrency` taken, an ask
is answered `overloaded` and its sender tries again, landing on another node), one for
at-most-once tells (beyond the bound the subscription stops reading: NATS buffers, and drops
what overflows, as at-most-once allows) and a puller of the type's shared durable consumer
(beyond the bound no more is pulled; a message is acked once its handler returned). Subjects
and the work queue are `delivery/_pools.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from .. import _codec as codec
from .. import _trace
from .._background import Background, cancel_and_wait
from .._context import current_deadline, current_sender
from .._errors import (
    AccordError,
    AgentTypeNotFound,
    BadRequest,
    NotConnected,
    Overloaded,
    RemoteError,
    TurnTimeout,
    UnknownMessageType,
)
from .._ids import AgentId, as_agent_id
from .._mesh import Mesh
from .._observe import Kind, Outcome, kind_of
from .._spec import AgentSpec, HandlerSpec
from ..cluster._config import OPEN_RETRY_FOR, replicas_for
from ..delivery._dlq import dead_letter
from ..delivery._mailbox import backoff_delay
from ..delivery._pools import (
    POOL_ACK_WAIT,
    POOL_QUEUE,
    pool_ask_subject,
    pool_consumer_spec,
    pool_stream,
    pool_stream_spec,
    pool_tell_subject,
)
from ..engine._api import (
    Consumer,
    Delivery,
    Engine,
    Message,
    Refused,
    RequestTimeout,
    Subscription,
)
from ._settings import NodeSettings

log = logging.getLogger("accord.pool")

_DRAIN_SUBSCRIPTION = 5.0  # seconds a stopping node waits for a pool subscription to drain
_MAX_ACK_PENDING = 4096  # per type, over all nodes (each node holds at most 2·max_concurrency)


async def serve_pools(
    mesh: Mesh,
    specs: Iterable[AgentSpec],
    settings: NodeSettings,
    stack: contextlib.AsyncExitStack,
    engine: Engine,
) -> Pools:
    """Serve the `stateless` types among `specs` (nothing if there are none) until `stack`
    closes; then stop taking work and let the handlers under way finish (up to the node's
    `drain_timeout`)."""
    pools = Pools(mesh, [s for s in specs if s.stateless], engine, settings.drain_timeout)
    stack.push_async_callback(pools.stop)
    await pools.start()
    return pools


class Pools:
    """The worker pools of one node."""

    def __init__(
        self, mesh: Mesh, specs: list[AgentSpec], engine: Engine, drain_timeout: float
    ) -> None:
        self._mesh = mesh
        self._engine = engine
        self._drain_timeout = drain_timeout
        self.pools = {s.type_name: TypePool(s, mesh, engine) for s in specs}

    async def start(self) -> None:
        if not self.pools:
            return
        mesh = self._mesh
        replicas = mesh.config.replicas or replicas_for(self._engine.cluster_size())
        spec = pool_stream_spec(mesh.names, replicas, mesh.config)
        await _retrying(lambda: self._engine.ensure_stream(spec), "the pool stream")
        for pool in self.pools.values():
            await pool.start()

    async def stop(self) -> None:
        for pool in self.pools.values():
            await pool.close_intake()
        for pool in self.pools.values():
            await pool.finish(self._drain_timeout)

    def status(self) -> dict[str, dict[str, int]]:
        """Per pool type: `max_concurrency`, `inflight` now, and counts since the start."""
        return {name: pool.status() for name, pool in sorted(self.pools.items())}


class TypePool:
    """One stateless type on one node: at most `max_concurrency` handlers run at once."""

    def __init__(self, spec: AgentSpec, mesh: Mesh, engine: Engine) -> None:
        self.spec = spec
        self.max = spec.options.max_concurrency
        self._mesh = mesh
        self._observe = mesh._observe
        self._engine = engine
        self._node = mesh.name
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max)
        self.taken = 0  # accepted and not finished: running, or waiting for a slot
        self.running = 0
        self.handled = self.failed = self.overloaded = self.redelivered = 0
        self._freed = asyncio.Event()
        self._open = False
        self._subs: list[Subscription] = []
        self._consumer: Consumer | None = None
        self._held: dict[Delivery, float] = {}  # durable messages taken: when taken
        self._work = Background(expected=(AccordError, OSError))
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        names, engine, t = self._mesh.names, self._engine, self.spec.type_name
        self._open = True
        self._subs.append(await engine.subscribe(pool_ask_subject(names, t), self._on_ask,
                                                 queue=POOL_QUEUE))  # fmt: skip
        self._subs.append(await engine.subscribe(pool_tell_subject(names, t), self._on_tell,
                                                 queue=POOL_QUEUE))  # fmt: skip
        stream = pool_stream(names)
        consumer = pool_consumer_spec(names, t, _MAX_ACK_PENDING)
        await _retrying(lambda: engine.ensure_consumer(stream, consumer), f"pool consumer {t}")
        self._consumer = await engine.consume(
            stream, consumer.name, self._on_job, has_capacity=self._capacity,
            still_going=lambda: self._open, batch=self.max,
        )  # fmt: skip
        self._ticker = self._loop.create_task(self._keep_held(), name=f"accord-pool-{t}")

    def status(self) -> dict[str, int]:
        return {"max_concurrency": self.max, "inflight": self.taken, "running": self.running,
                "handled": self.handled, "failed": self.failed, "overloaded": self.overloaded,
                "redelivered": self.redelivered}  # fmt: skip

    # -- intake -----------------------------------------------------------------------------

    async def _on_ask(self, msg: Message) -> None:
        enc = codec.sniff(msg.data)
        try:
            if not self._open:
                raise Overloaded(f"node {self._node} is stopping")
            if self.taken >= self.max:
                self.overloaded += 1
                raise Overloaded(f"pool {self.spec.type_name!r} on {self._node} runs "
                                 f"{self.max} handlers (max_concurrency)")  # fmt: skip
            req, enc, agent_id, h, body = self._parse(msg.data)
        except AccordError as exc:
            if isinstance(exc, Overloaded) and self._observe.active:
                self._observe.message_rejected(self.spec.type_name, "ask")
                self._observe.bulkhead_rejected(self.spec.type_name)
            if msg.reply:
                await self._publish(msg.reply, codec.error_reply(exc.code, str(exc), enc))
            return
        deadline = self._deadline(req)
        self._take()
        self._work.spawn(self._serve_ask(agent_id, h, body, deadline, msg.reply or None, enc,
                                         req.headers))  # fmt: skip

    async def _on_tell(self, msg: Message) -> None:
        await self._capacity()  # backpressure: NATS buffers what arrives meanwhile
        try:
            req, _, agent_id, h, body = self._parse(msg.data)
        except AccordError as exc:
            log.debug("pool %s: tell dropped: %s", self.spec.type_name, exc)
            return
        self._take()
        self._work.spawn(self._serve_ask(agent_id, h, body, None, None, "msgpack", req.headers))

    def _on_job(self, delivery: Delivery) -> bool:
        """A durable message (from the engine's read loop: must not block)."""
        if not self._open:
            return False  # not acked: delivered again, to another node
        self._take()
        self._held[delivery] = self._loop.time()
        if delivery.num_delivered > 1:
            self.redelivered += 1
        self._work.spawn(self._serve_job(delivery))
        return True

    async def _capacity(self) -> None:
        while self.taken >= self.max:
            self._freed.clear()
            await self._freed.wait()

    def _take(self) -> None:
        self.taken += 1

    def _release(self) -> None:
        self.taken -= 1
        if self.taken < self.max:
            self._freed.set()

    def _parse(self, data: bytes) -> tuple[codec.Request, codec.Encoding, AgentId, HandlerSpec,
                                          Any]:  # fmt: skip
        req, enc = codec.decode_request(data)
        try:
            agent_id = as_agent_id(req.target)
        except AccordError as exc:
            raise BadRequest(f"bad target: {exc}") from None
        if agent_id.type != self.spec.type_name:
            raise AgentTypeNotFound(f"{agent_id} is not of the pool type {self.spec.type_name!r}")
        h = self.spec.handler_for_name(req.type)
        if h is None:
            raise UnknownMessageType(
                f"agent type {agent_id.type!r} has no handler for {req.type!r}"
            )
        return req, enc, agent_id, h, codec.decode_as(req.body, h.msg_type, enc)

    def _deadline(self, req: codec.Request) -> float | None:
        if req.timeout_ms is None or not 0 <= req.timeout_ms < 2**40:
            return None
        return self._loop.time() + req.timeout_ms / 1000

    # -- running ----------------------------------------------------------------------------

    async def _run(
        self,
        agent_id: AgentId,
        h: HandlerSpec,
        body: Any,
        deadline: float | None,
        kind: Kind = "ask",
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, AccordError | None] | None:
        """One handler call on a fresh instance (on_activate, handler, on_deactivate), within
        a slot; an exception becomes `RemoteError`, a run past `turn_timeout` `TurnTimeout`.
        None: not run, its caller's deadline passed while it waited for a slot. Traced as
        `process {type}`, a child of the sender's span in `headers`, when tracing is on."""
        tracing = _trace.active
        if tracing is None:
            return await self._run_in_slot(agent_id, h, body, deadline, kind)
        with tracing.process(self.spec.type_name, kind, str(agent_id), headers) as failed:
            outcome = await self._run_in_slot(agent_id, h, body, deadline, kind)
            if outcome is not None and outcome[1] is not None:
                failed(outcome[1])
            return outcome

    async def _run_in_slot(
        self, agent_id: AgentId, h: HandlerSpec, body: Any, deadline: float | None, kind: Kind
    ) -> tuple[Any, AccordError | None] | None:
        async with self._slots:
            if deadline is not None and self._loop.time() >= deadline:
                return None  # the caller has given up: running it would be unseen
            self.running += 1
            started = self._loop.time()
            outcome: Outcome = "error"  # what the node's observers are told
            agent = self.spec.cls()
            agent.id = agent_id
            agent.mesh = self._mesh
            agent.replica_id = f"{self._node}:pool"
            current_deadline.set(deadline)  # this task's own context
            current_sender.set(str(agent_id))
            try:
                await agent.on_activate()
                async with asyncio.timeout(self.spec.options.turn_timeout):
                    result = await h.fn(agent, body)
                self.handled += 1
                outcome = "ok"
                return result, None
            except TimeoutError:
                self.failed += 1
                outcome = "timeout"
                return None, TurnTimeout(f"{agent_id}: handler {h.name} ran past turn_timeout "
                                         f"({self.spec.options.turn_timeout}s)")  # fmt: skip
            except Exception as exc:
                self.failed += 1
                log.debug("pool handler %s of %s raised", h.name, agent_id, exc_info=True)
                err = exc if isinstance(exc, RemoteError) else None
                return None, err or RemoteError(type(exc).__name__, str(exc))
            finally:
                self.running -= 1
                if self._observe.active:
                    self._observe.turn_ended(self.spec.type_name, kind, outcome,
                                             self._loop.time() - started)  # fmt: skip
                try:
                    await agent.on_deactivate()
                except Exception:
                    log.exception("on_deactivate of pool worker %s failed", agent_id)

    async def _serve_ask(self, agent_id: AgentId, h: HandlerSpec, body: Any,
                         deadline: float | None, reply: str | None, enc: codec.Encoding,
                         headers: dict[str, str] | None) -> None:  # fmt: skip
        try:
            outcome = await self._run(agent_id, h, body, deadline,
                                      kind_of(reply is not None, headers), headers)  # fmt: skip
        finally:
            self._release()
        if reply is not None and outcome is not None:
            await self._publish(reply, self._reply_data(*outcome, enc))

    async def _serve_job(self, d: Delivery) -> None:
        try:
            try:
                req, enc, agent_id, h, body = self._parse(d.data)
            except AccordError as exc:
                await self._dead_letter(d, exc, 1)  # it can never be handled
                return
            outcome = await self._run(
                agent_id, h, body, None, kind_of(req.kind != "tell", req.headers), req.headers
            )
            assert outcome is not None  # no deadline: always run
            result, error = outcome
            if error is not None and d.num_delivered < self.spec.options.max_deliver:
                # Not acked: delivered again after the delay, to whichever node pulls first.
                with contextlib.suppress(NotConnected):
                    await d.nak(backoff_delay(d.num_delivered, self.spec.options.retry_backoff))
                return
            if error is not None:
                await self._dead_letter(d, error, d.num_delivered)
            else:
                with contextlib.suppress(NotConnected):
                    await d.ack()
            if req.kind == "ask" and req.reply_to:
                await self._publish(req.reply_to, self._reply_data(result, error, enc))
        finally:
            self._held.pop(d, None)
            self._release()

    async def _keep_held(self) -> None:
        """Tell JetStream the durable messages held here are still being worked on, so only
        a node gone silent has them delivered elsewhere (after `POOL_ACK_WAIT`)."""
        every = POOL_ACK_WAIT / 3
        while True:
            await asyncio.sleep(every)
            now = self._loop.time()
            for d, since in list(self._held.items()):
                if now - since >= every:
                    with contextlib.suppress(NotConnected):
                        await d.in_progress()

    # -- replies and dead letters -------------------------------------------------------------

    def _reply_data(self, result: Any, error: AccordError | None, enc: codec.Encoding) -> bytes:
        if error is not None:
            rtype = getattr(error, "remote_type", type(error).__name__)
            message = getattr(error, "remote_message", str(error))
            return codec.error_reply(error.code, message, enc, rtype)
        try:
            data = codec.ok_reply(codec.encode(result, enc), enc, None, self._node)
        except (TypeError, ValueError, OverflowError) as exc:
            return codec.error_reply("remote_error", f"reply not encodable: {exc}", enc,
                                     "TypeError")  # fmt: skip
        if len(data) > self._engine.max_payload:
            return codec.error_reply("remote_error", f"reply of {len(data)} bytes exceeds the "
                                     "server's max_payload", enc, "MaxPayloadError")  # fmt: skip
        return data

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self._engine.publish(subject, data)
        except AccordError as exc:  # the asker times out; the pool goes on
            log.warning("pool %s: reply not sent: %s", self.spec.type_name, exc)

    async def _dead_letter(self, d: Delivery, error: AccordError, deliveries: int) -> None:
        target = msg_type = ""
        with contextlib.suppress(AccordError):
            req, _ = codec.decode_request(d.data)
            target, msg_type = req.target, req.type
        reason = f"{getattr(error, 'remote_type', error.code)}: " + getattr(
            error, "remote_message", str(error)
        )
        try:
            await dead_letter(self._engine, self._mesh.names, d.data, target=target,
                              msg_type=msg_type, msg_id=f"pool:{d.seq}", reason=reason,
                              deliveries=deliveries)  # fmt: skip
        except AccordError as exc:
            log.warning("pool %s: not dead-lettered (delivered again): %s", target, exc)
            return
        log.warning("dead-lettered %s %s after %d attempts: %s", target, msg_type, deliveries,
                    reason)  # fmt: skip
        with contextlib.suppress(NotConnected):
            await d.ack()

    # -- stopping ---------------------------------------------------------------------------

    async def close_intake(self) -> None:
        """Take nothing more: asks already received are still served."""
        self._open = False
        self._freed.set()
        for sub in self._subs:
            try:  # bounded: a tell waiting for a slot that never frees must not hold the stop
                await asyncio.wait_for(sub.drain(), _DRAIN_SUBSCRIPTION)
            except Exception:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def finish(self, timeout: float) -> None:
        """Wait up to `timeout` for the handlers under way; durable messages not finished by
        then are handed back at once (not acked: another node takes them)."""
        await self._work.drain(timeout)
        for d in list(self._held):
            with contextlib.suppress(NotConnected):
                await d.nak()
        await self._work.close()
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])


async def _retrying(call: Any, what: str) -> None:
    """Run `call()` until JetStream answers (a stream or consumer creation), for up to
    `OPEN_RETRY_FOR` seconds; then `NotConnected`."""
    deadline = time.monotonic() + OPEN_RETRY_FOR
    while True:
        try:
            await call()
            return
        except (NotConnected, RequestTimeout, Refused) as exc:
            if time.monotonic() > deadline:
                raise NotConnected(f"cannot create {what}: {exc or 'no answer in time'}") from None
        await asyncio.sleep(0.5)
