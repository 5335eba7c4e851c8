"""The client side of the mesh: ask / tell / publish to agents by name.

A message goes to the subject of its agent's shard. While a shard has no owner (NATS answers
"no responders"), the sender retries with capped exponential backoff until its deadline; nothing was
delivered on such an attempt, so retrying keeps at-most-once. A `Node` subclasses `Mesh` and
short-circuits messages for shards it owns (`_route_local`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Any, Literal

import msgspec

from . import _codec as codec
from ._background import Background
from ._context import current_deadline, current_sender
from ._errors import (
    WIRE_ERRORS,
    AccordError,
    ConfigurationError,
    DeliveryTimeout,
    NotConnected,
    OutcomeUnknown,
    Overloaded,
    RemoteError,
)
from ._ids import AgentId, shard_of, validate_agent_type
from ._spec import DELIVERY_MODES, AgentSpec, known_spec
from .cluster._config import Buckets, ClusterConfig, Names
from .cluster._watched import WatchedKV
from .coord._groups import barrier, counter_add, counter_value
from .coord._leases import Lease, LeaseKeeper, elect, fenced_read, fenced_write, hold
from .coord._quorum import Ballots, Decision, ProposalRecord, VoteRequest, encode_proposal
from .delivery._breaker import BreakerSettings, CircuitBreakers
from .delivery._client import DurableSender
from .delivery._mailbox import mailbox_subject
from .engine._api import KV, NoResponders, RequestTimeout, Transport
from .engine._nats import NatsTransport

log = logging.getLogger("accord.mesh")

DEFAULT_TIMEOUT = 10.0
_BACKOFF_START = 0.005
_BACKOFF_CAP = 0.1
STANDBY_AFTER = 0.25  # seconds of 'no responders' before a split-brain agent is served anywhere


def as_agent_id(target: AgentId | str) -> AgentId:
    if isinstance(target, AgentId):
        return target
    if isinstance(target, str):
        return AgentId.parse(target)
    raise ConfigurationError(f"target must be an AgentId or 'type/key', got {target!r}")


class Mesh:
    """A client of the mesh. Create with `accord.connect()`; a `Node` is also a `Mesh`."""

    def __init__(
        self,
        transport: Transport,
        names: Names,
        config: ClusterConfig,
        buckets: Buckets | None = None,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self._buckets = buckets
        self._transport = transport
        self.names = names
        self.config = config
        self._bg = Background()
        self._loop = asyncio.get_running_loop()
        subs, meta = (buckets.subs, buckets.meta) if buckets is not None else (None, None)
        self._subs = WatchedKV(subs, self._bg)  # "<topic>.<agent type>" -> b"1"
        self._types = WatchedKV(meta, self._bg, prefix="type.")  # type -> options
        self._breakers = CircuitBreakers(breaker) if breaker is not None else None
        self._durable: DurableSender | None = None
        self._mode_cache: dict[bytes, str] = {}
        self._local_tells = 0
        self._targets: dict[str, tuple[AgentId, int]] = {}

    @property
    def name(self) -> str:
        return self._transport.name

    def _resolve(self, target: AgentId | str) -> tuple[AgentId, int]:
        """The agent id and its shard; parsed target strings are cached (hot path)."""
        if isinstance(target, str):
            hit = self._targets.get(target)
            if hit is None:
                agent_id = as_agent_id(target)
                if len(self._targets) > 50_000:
                    self._targets.clear()
                hit = self._targets[target] = (agent_id, shard_of(agent_id, self.config.num_shards))
            return hit
        agent_id = as_agent_id(target)
        return agent_id, shard_of(agent_id, self.config.num_shards)

    # -- messaging --------------------------------------------------------------------------

    async def ask(
        self,
        target: AgentId | str,
        msg: msgspec.Struct,
        *,
        timeout: float | None = None,
        returns: Any = None,
        delivery: str | None = None,
        msg_id: str | None = None,
    ) -> Any:
        """Send `msg` to `target` and return its handler's reply.

        Ends with exactly one outcome: the reply; `RemoteError` (the handler raised; processed up to
        the failure); `AgentTypeNotFound` / `UnknownMessageType` / `BadRequest` / `Overloaded`
        (not processed); `CircuitOpen` (not sent); or `DeliveryTimeout` when the deadline passes —
        `maybe_delivered` says whether any owner may have received it. The deadline is `timeout`
        (default 10 s), capped by the deadline of the handler this call is made from.

        `delivery` overrides the agent type's mode. For `at_least_once` / `exactly_once` the
        message is first stored in the shard's mailbox (`OutcomeUnknown` if that cannot be
        confirmed); retrying with the same `msg_id` is safe, and for `exactly_once` a retried ask
        returns the recorded reply. On cancellation the request may or may not have been
        delivered; no reply will be surfaced.
        """
        agent_id, shard = self._resolve(target)
        deadline = self._deadline(timeout)
        mode = self._known_mode(agent_id, delivery) or await self._mode(agent_id, delivery)
        with self._breaker(agent_id):
            type_name = codec.message_type_name(type(msg))
            if mode != "at_most_once":
                stored = await self._send_durable(
                    "ask", agent_id, shard, type_name, codec.encode(msg), "msgpack", deadline,
                    mode, msg_id,
                )  # fmt: skip
                return self._unwrap(agent_id, type_name, stored, returns)
            local = self._route_local(agent_id, shard, msg, deadline, ask=True)
            if local is not None:
                return await self._await_local(local, deadline, agent_id, type_name)
            body = codec.encode(msg)
            data = await self._request(agent_id, shard, type_name, body, "msgpack", deadline, msg,
                                       target if type(target) is str else None)  # fmt: skip
            if isinstance(data, _LocalResult):
                return await self._await_local(data.fut, deadline, agent_id, type_name)
            return self._unwrap(agent_id, type_name, data, returns)

    async def ask_json(
        self,
        target: AgentId | str,
        type_name: str,
        body: bytes,
        *,
        timeout: float | None = None,
        delivery: str | None = None,
        msg_id: str | None = None,
    ) -> Any:
        """Ask with a JSON-encoded message named by its wire type (for the CLI and tools).

        Same outcomes as `ask`; the reply body is returned as plain JSON data.
        """
        agent_id, shard = self._resolve(target)
        deadline = self._deadline(timeout)
        mode = await self._mode(agent_id, delivery)
        if mode != "at_most_once":
            stored = await self._send_durable(
                "ask", agent_id, shard, type_name, body, "json", deadline, mode, msg_id
            )
            return self._unwrap(agent_id, type_name, stored, Any)
        data = await self._request(agent_id, shard, type_name, body, "json", deadline, None)
        assert not isinstance(data, _LocalResult)
        return self._unwrap(agent_id, type_name, data, Any)

    async def _request(
        self,
        agent_id: AgentId,
        shard: int,
        type_name: str,
        body: bytes,
        enc: codec.Encoding,
        deadline: float,
        msg: Any,
        target: str | None = None,
    ) -> bytes | _LocalResult:
        """Send one ask, retrying while the shard has no owner, until `deadline`."""
        subject = self.names.shard_subject(shard)
        target = target or str(agent_id)
        backoff = _BACKOFF_START
        first = True
        unowned_since: float | None = None
        while True:
            if msg is not None and not first:  # the shard may have moved here meanwhile
                local = self._route_local(agent_id, shard, msg, deadline, ask=True)
                if local is not None:
                    return _LocalResult(local)
            first = False
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise DeliveryTimeout(
                    f"ask {agent_id} {type_name}: deadline passed with no owner for its shard",
                    maybe_delivered=False,
                )
            req = codec.Request(
                v=codec.PROTOCOL_VERSION,
                kind="ask",
                target=target,
                type=type_name,
                body=msgspec.Raw(body),
                timeout_ms=max(1, int(remaining * 1000)),
                sender=current_sender.get(),
            )
            data = codec.encode(req, enc)
            try:
                try:
                    return await self._transport.request(subject, data, remaining)
                except NoResponders:
                    now = self._loop.time()
                    unowned_since = now if unowned_since is None else unowned_since
                    if now - unowned_since < STANDBY_AFTER or not await self._split_brain(agent_id):
                        raise
                    # The owner's process is gone (its subscription with it) and the lease has
                    # not expired yet: a split-brain-tolerant agent is served by any node now.
                    return await self._transport.request(
                        self.names.standby_subject(shard), data, deadline - now
                    )
            except NoResponders:
                await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
                backoff = min(backoff * 2, _BACKOFF_CAP)
            except RequestTimeout:
                raise DeliveryTimeout(
                    f"ask {agent_id} {type_name}: no reply within the deadline",
                    maybe_delivered=True,
                ) from None

    async def tell(
        self,
        target: AgentId | str,
        msg: msgspec.Struct,
        *,
        delivery: str | None = None,
        msg_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send `msg` to `target` without waiting for it to be handled.

        `at_most_once` (the default mode): returns once the message is handed to the local node's
        mailbox or to the NATS connection; it may or may not be delivered (while its shard changes
        owner it is dropped). `at_least_once` / `exactly_once`: returns only once the message is
        stored in the shard's JetStream mailbox; raises `OutcomeUnknown` (with the `msg_id`) if
        that was not confirmed within `timeout` — retrying with the same `msg_id` is then safe.
        """
        agent_id, shard = self._resolve(target)
        if delivery is None and self._tell_local(agent_id, shard, msg):
            self._local_tells += 1
            if self._local_tells % 256 == 0:
                await asyncio.sleep(0)  # a tight loop of local tells must let the loop breathe
            return
        mode = self._known_mode(agent_id, delivery) or await self._mode(agent_id, delivery)
        if mode != "at_most_once":
            type_name = codec.message_type_name(type(msg))
            await self._send_durable("tell", agent_id, shard, type_name, codec.encode(msg),
                                     "msgpack", self._deadline(timeout), mode, msg_id)  # fmt: skip
            return
        while True:
            try:
                routed = self._route_local(agent_id, shard, msg, None, ask=False)
                break
            except Overloaded:  # a full bulkhead: a local tell waits (backpressure), never drops
                await asyncio.sleep(0.001)
        if routed is not None:
            self._local_tells += 1
            if self._local_tells % 256 == 0:
                await asyncio.sleep(0)  # a tight loop of local tells must let the loop breathe
            return
        type_name = codec.message_type_name(type(msg))
        await self._publish_tell(agent_id, shard, type_name, codec.encode(msg), "msgpack")

    async def tell_json(
        self,
        target: AgentId | str,
        type_name: str,
        body: bytes,
        *,
        delivery: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        """`tell` with a JSON-encoded message named by its wire type (for the CLI and tools)."""
        agent_id, shard = self._resolve(target)
        mode = await self._mode(agent_id, delivery)
        if mode != "at_most_once":
            await self._send_durable("tell", agent_id, shard, type_name, body, "json",
                                     self._deadline(None), mode, msg_id)  # fmt: skip
            return
        await self._publish_tell(agent_id, shard, type_name, body, "json")

    async def _send_durable(
        self,
        kind: Literal["ask", "tell"],
        agent_id: AgentId,
        shard: int,
        type_name: str,
        body: bytes,
        enc: codec.Encoding,
        deadline: float,
        mode: str,
        msg_id: str | None,
    ) -> bytes:
        if self._durable is None:
            if not isinstance(self._transport, NatsTransport):
                raise ConfigurationError("durable delivery needs a NATS JetStream transport")
            self._durable = DurableSender(self._transport)
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind=kind,
            target=str(agent_id),
            type=type_name,
            body=msgspec.Raw(body),
            id=msg_id or uuid.uuid4().hex,
            sender=current_sender.get(),
            delivery=mode,
        )
        data = await self._durable.send(
            mailbox_subject(self.names, shard), req, enc, deadline, self.names.shard_subject(shard)
        )
        return data or b""

    async def _publish_tell(
        self, agent_id: AgentId, shard: int, type_name: str, body: bytes, enc: codec.Encoding
    ) -> None:
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind="tell",
            target=str(agent_id),
            type=type_name,
            body=msgspec.Raw(body),
            sender=current_sender.get(),
        )
        await self._transport.publish(self.names.shard_subject(shard), codec.encode(req, enc))

    def _known_mode(self, agent_id: AgentId, delivery: str | None) -> str | None:
        """The delivery mode without waiting, or None if that needs the type registry first."""
        if delivery is not None:
            if delivery not in DELIVERY_MODES:
                raise ConfigurationError(f"delivery must be one of {DELIVERY_MODES}")
            return delivery
        spec = self._local_spec(agent_id.type)
        if spec is not None:
            return spec.options.delivery
        types = self._types.loaded()
        return None if types is None else self._mode_from(types.get(agent_id.type))

    async def _mode(self, agent_id: AgentId, delivery: str | None) -> str:
        known = self._known_mode(agent_id, delivery)
        if known is not None:
            return known
        types = await self._types.get_all()
        return self._mode_from(types.get(agent_id.type))

    def _mode_from(self, raw: bytes | None) -> str:
        if raw is None:
            return "at_most_once"
        cached = self._mode_cache.get(raw)
        if cached is None:
            try:
                cached = str(msgspec.json.decode(raw).get("delivery", "at_most_once"))
            except (msgspec.DecodeError, AttributeError):
                cached = "at_most_once"
            self._mode_cache[raw] = cached
        return cached

    def _local_spec(self, agent_type: str) -> AgentSpec | None:
        """Overridden by `Node`: the spec of an agent type this process hosts."""
        return None

    async def _split_brain(self, agent_id: AgentId) -> bool:
        """Is `agent_id`'s type `split_brain_allowed` (hosted here, or as registered)?"""
        spec = self._local_spec(agent_id.type)
        if spec is not None:
            return spec.options.failover == "split_brain_allowed"
        raw = (await self._types.get_all()).get(agent_id.type)
        try:
            return raw is not None and msgspec.json.decode(raw).get("failover") == (
                "split_brain_allowed"
            )
        except (msgspec.DecodeError, AttributeError):
            return False

    async def register_types(self, specs: Iterable[AgentSpec]) -> None:
        """Publish agent types' delivery modes so clients without the classes use them."""
        if self._types.kv is None:
            return
        for spec in specs:
            value = msgspec.json.encode(
                {"delivery": spec.options.delivery, "failover": spec.options.failover}
            )
            await self._types.kv.put(f"type.{spec.type_name}", value)
            self._types.set_local(spec.type_name, value)

    def _breaker(self, agent_id: AgentId) -> contextlib.AbstractContextManager[None]:
        return _NO_BREAKER if self._breakers is None else self._breaking(agent_id)

    @contextlib.contextmanager
    def _breaking(self, agent_id: AgentId) -> Iterator[None]:
        breakers = self._breakers
        assert breakers is not None
        key = str(agent_id)
        breakers.before(key)
        try:
            yield
        except (DeliveryTimeout, NotConnected, Overloaded, OutcomeUnknown, RemoteError):
            breakers.failure(key)
            raise
        breakers.success(key)

    async def publish(self, topic_type: str, source: str, msg: msgspec.Struct) -> int:
        """Tell `msg` to every agent type subscribed to `topic_type`, keyed by `source`.

        Returns how many agent types it was sent to. Delivery per agent is as for `tell`.
        """
        agent_types = await self._subscribers(topic_type)
        for agent_type in agent_types:
            await self.tell(AgentId(agent_type, source), msg)
        return len(agent_types)

    async def publish_json(self, topic_type: str, source: str, type_name: str, body: bytes) -> int:
        """`publish` with a JSON-encoded message named by its wire type."""
        agent_types = await self._subscribers(topic_type)
        for agent_type in agent_types:
            await self.tell_json(AgentId(agent_type, source), type_name, body)
        return len(agent_types)

    async def _subscribers(self, topic_type: str) -> list[str]:
        validate_agent_type(topic_type)
        subs = await self._subs.get_all()
        prefix = f"{topic_type}."
        return sorted(k.removeprefix(prefix) for k in subs if k.startswith(prefix))

    async def subscribe(self, topic_type: str, agent_type: str) -> None:
        """Record that messages published on `topic_type` go to agents of `agent_type`."""
        validate_agent_type(topic_type)
        validate_agent_type(agent_type)
        if self._subs.kv is None:
            raise ConfigurationError("this mesh has no subscription registry")
        await self._subs.kv.put(f"{topic_type}.{agent_type}", b"1")
        self._subs.set_local(f"{topic_type}.{agent_type}", b"1")

    # -- coordination -------------------------------------------------------------------------

    def _coord_kv(self, name: Literal["locks", "coord"]) -> KV:
        if self._buckets is None:
            raise ConfigurationError("this mesh has no coordination buckets")
        return self._buckets.locks if name == "locks" else self._buckets.coord

    def _keeper(self) -> LeaseKeeper:
        if not isinstance(self._transport, NatsTransport):
            raise ConfigurationError("leases need a NATS JetStream transport")
        return LeaseKeeper(self._coord_kv("locks"), self.name)

    def lease(
        self, name: str, ttl: int = 5, *, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Hold the named lease: `async with mesh.lease("jobs", ttl=5) as lease: ...`.

        Waits until the lease is free (or raises `LeaseLost` after `timeout`). `lease.token` is a
        fencing token that grows with every new holder; `lease.lost` is set (and `lease.valid`
        turns False) as soon as the holder can no longer be sure it holds it — before the server
        could give it to anyone else. Released on exit.
        """
        return hold(self._keeper(), name, ttl, timeout)

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Lease]:
        """Leadership terms: `async for term in mesh.election("scheduler"): ...`.

        Each yielded `Lease` is one term; it ends when `term.lost` is set or when the loop moves on
        (resigning). Then the iterator campaigns again. At most one valid leader at any time.
        """
        return elect(self._keeper(), name, ttl)

    async def fenced_write(self, key: str, data: bytes, token: int) -> int:
        """Write `data` under `key` unless a newer fencing token already wrote it (`Fenced`)."""
        return await fenced_write(self._coord_kv("coord"), f"f.{key}", data, token)

    async def fenced_read(self, key: str) -> tuple[int, bytes] | None:
        """The (token, data) last written by `fenced_write`, or None."""
        return await fenced_read(self._coord_kv("coord"), f"f.{key}")

    async def propose(
        self,
        topic: str,
        proposal: Any,
        *,
        voters: Iterable[AgentId | str],
        quorum: float = 0.6,
        deadline: float = 10.0,
    ) -> Decision:
        """Put `proposal` to a vote of `voters` (agents handling `accord.VoteRequest` → bool).

        Returns the decision: `accepted` once ceil(quorum·n) voters said yes, `rejected` once that
        cannot happen any more, `expired` if neither by `deadline` seconds. The vote requests are
        delivered at least once; votes and the decision are recorded (create-once, never decided
        twice) by whichever node sees the outcome settled, so the proposer's death loses nothing.
        """
        voter_ids = [str(as_agent_id(v)) for v in voters]
        if len(set(voter_ids)) != len(voter_ids):
            raise ConfigurationError("voters must be distinct")
        if deadline <= 0:
            raise ConfigurationError("deadline must be > 0")
        ballots = self._ballots()
        record = ProposalRecord(
            id=uuid.uuid4().hex, topic=topic, voters=voter_ids, quorum=quorum,
            proposer=self.name, created_at=time.time(),
        )  # fmt: skip
        await ballots.open(record)
        until = time.monotonic() + deadline
        request = VoteRequest(record.id, topic, encode_proposal(proposal))
        await asyncio.gather(
            *(
                self.tell(v, request, delivery="at_least_once", msg_id=f"vote:{record.id}:{v}")
                for v in voter_ids
            )
        )
        decision = await ballots.wait(record.id, until)
        if decision is None:
            decision = await ballots.decide(
                record, "expired", await ballots.votes(record), self.name
            )
        return decision

    async def decision(self, proposal_id: str) -> Decision | None:
        """The recorded decision of a proposal, if any."""
        return await self._ballots().decision(proposal_id)

    def _ballots(self) -> Ballots:
        if not isinstance(self._transport, NatsTransport):
            raise ConfigurationError("proposals need a NATS JetStream transport")
        return Ballots(
            self._transport, self._coord_kv("coord"), self.names.events_subject("decision")
        )

    async def barrier(
        self, name: str, parties: int, *, member: str | None = None, timeout: float = 30.0
    ) -> int:
        """Wait until `parties` members arrived at barrier `name` (raises `DeliveryTimeout`)."""
        me = member or current_sender.get() or self.name
        return await barrier(self._coord_kv("coord"), name, me, parties, timeout)

    async def counter_add(self, name: str, delta: int = 1) -> int:
        """Add `delta` to the cluster-wide counter `name`; return its new value."""
        return await counter_add(self._coord_kv("coord"), name, delta)

    async def counter(self, name: str) -> int:
        return await counter_value(self._coord_kv("coord"), name)

    # -- internals --------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0, got {timeout}")
        deadline = self._loop.time() + (DEFAULT_TIMEOUT if timeout is None else timeout)
        inherited = current_deadline.get()
        return deadline if inherited is None else min(deadline, inherited)

    def _route_local(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float | None, *, ask: bool
    ) -> asyncio.Future[Any] | None:
        """Overridden by `Node`: deliver in-process when this node owns `shard`."""
        return None

    def _tell_local(self, agent_id: AgentId, shard: int, msg: Any) -> bool:
        """Overridden by `Node`: the local tell hot path; False means "take the general path"."""
        return False

    async def _await_local(
        self, fut: asyncio.Future[Any], deadline: float, agent_id: AgentId, type_name: str
    ) -> Any:
        def expire() -> None:
            if not fut.done():
                fut.set_exception(
                    DeliveryTimeout(
                        f"ask {agent_id} {type_name}: no reply within the deadline",
                        maybe_delivered=True,
                    )
                )

        timer = self._loop.call_at(deadline, expire)
        try:
            return await fut
        finally:
            timer.cancel()

    def _unwrap(self, agent_id: AgentId, type_name: str, data: bytes, returns: Any) -> Any:
        reply, enc = codec.decode_reply(data)
        if reply.ok:
            if returns is None:
                returns = _reply_type(agent_id.type, type_name)
            return codec.decode_as(reply.body, returns, enc)
        err = reply.error or codec.ErrorInfo(code="error", message="error reply without details")
        if err.code == RemoteError.code:
            raise RemoteError(err.type or "Exception", err.message)
        cls = WIRE_ERRORS.get(err.code)
        if cls is DeliveryTimeout:
            raise DeliveryTimeout(err.message, maybe_delivered=True)
        if cls is not None:
            raise cls(err.message)
        raise AccordError(f"{err.code}: {err.message}")

    async def _transport_request(self, subject: str, data: bytes, timeout: float) -> bytes:
        try:
            return await self._transport.request(subject, data, timeout)
        except (NoResponders, RequestTimeout):
            raise NotConnected(f"no accord node answered on {subject}") from None

    async def close(self) -> None:
        await self._bg.close()
        await self._transport.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _LocalResult:
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self.fut = fut


_NO_BREAKER = contextlib.nullcontext()
_reply_types: dict[tuple[str, str], Any] = {}


def _reply_type(agent_type: str, type_name: str) -> Any:
    """The declared return type of the handler of `type_name` (Any if this process lacks it)."""
    cached = _reply_types.get((agent_type, type_name))
    if cached is not None:
        return cached
    spec = known_spec(agent_type)
    h = spec.handler_for_name(type_name) if spec else None
    if h is None:
        return Any  # not cached: the class may still be defined later
    _reply_types[(agent_type, type_name)] = h.returns
    return h.returns
