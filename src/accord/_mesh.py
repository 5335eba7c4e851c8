"""The client side of the mesh: ask / tell / publish to agents by name.

A message goes to the subject of its agent's shard. While a shard has no owner (NATS answers
"no responders"), the sender retries with capped exponential backoff until its deadline; nothing was
delivered on such an attempt, so retrying keeps at-most-once. A `Node` subclasses `Mesh` and
short-circuits messages for shards it owns (`_route_local`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Literal, Protocol

import msgspec

from . import _codec as codec
from ._background import Background
from ._context import current_sender, deadline_after, publishes
from ._directory import Directory
from ._errors import (
    ConfigurationError,
    Overloaded,
)
from ._ids import AgentId, Targets, as_agent_id
from ._migration import Migrating
from ._observe import Observers
from ._sender import LocalResult, Sender
from ._spec import AgentSpec
from .cluster._config import Buckets, ClusterConfig, Names
from .cluster._watched import WatchedKV
from .coord._groups import barrier, counter_add, counter_value
from .coord._leases import Lease, LeaseKeeper, elect, fenced_read, fenced_write, hold
from .coord._quorum import Ballots, Decision, ProposalRecord, VoteRequest, encode_proposal
from .delivery._breaker import BreakerSettings, CircuitBreakers
from .engine._api import KV, Engine
from .state._delete import delete_state as _delete_state
from .workflows import _client as _workflows

log = logging.getLogger("accord.mesh")


class Mesh(Migrating):
    """A client of the mesh. Create with `accord.connect()`; a `Node` is also a `Mesh`."""

    def __init__(
        self,
        transport: Engine,
        names: Names,
        config: ClusterConfig,
        buckets: Buckets | None = None,
        breaker: BreakerSettings | None = None,
        local: LocalRouteLike | None = None,
    ) -> None:
        self._observe = Observers()
        self._bind(transport, names, config, buckets, breaker, local)

    def _bind(
        self,
        transport: Engine,
        names: Names,
        config: ClusterConfig,
        buckets: Buckets | None,
        breaker: BreakerSettings | None,
        local: LocalRouteLike | None,
    ) -> None:
        """Wire the client to its engine (a `Node` does it once started: it owns `local`)."""
        self._local = local
        self._buckets = buckets
        self._transport = transport
        self.names = names
        self.config = config
        self._bg = Background()
        self._loop = asyncio.get_running_loop()
        self._directory = Directory(
            WatchedKV(buckets.meta if buckets else None, self._bg, prefix="type."),
            WatchedKV(buckets.subs if buckets else None, self._bg),
            local.spec if local is not None else _no_spec,
        )
        # Deliver in-process when this process serves the shard (see `LocalRouteLike.route`).
        self._route_local = local.route if local is not None else _no_route
        # A workflow's `ctx.ask` of an agent served here, without the mailbox (`_here_once`).
        self._ask_here_once: HereOnce = functools.partial(_here_once, self) if local else _not_here
        self._sender = Sender(transport, names, self._directory, self._route_local, self._loop,
                              self._observe)  # fmt: skip
        self._breakers = CircuitBreakers(breaker, observe=self._observe) if breaker else None
        self._local_tells = 0
        self._resolve = Targets(config.num_shards).resolve  # target -> (agent id, shard)

    @property
    def name(self) -> str:
        return self._transport.name

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
        the failure); `TurnTimeout` (the handler ran past its type's `turn_timeout`: processed in
        part, rolled back); `AgentTypeNotFound` / `UnknownMessageType` / `BadRequest` / `Overloaded`
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
        route = self._local
        if route is not None and delivery is None and self._breakers is None:
            local = route.ask(agent_id, shard, msg, deadline)  # the common in-process ask
            if local is not None:
                s = self._sender
                return await (s.await_local(local, agent_id.type) if s.observed else local)
        mode = self._directory.known_mode(agent_id, delivery) or await self._directory.mode(
            agent_id, delivery, deadline - self._loop.time()
        )
        with self._breaker(agent_id):
            type_name = codec.message_type_name(type(msg))
            if mode != "at_most_once":
                stored = await self._sender.send_durable(
                    "ask", agent_id, shard, type_name, codec.encode(msg), "msgpack", deadline,
                    mode, msg_id,
                )  # fmt: skip
                return self._sender.unwrap(agent_id, type_name, stored, returns)
            local = None if route is None else route.route(agent_id, shard, msg, deadline, ask=True)
            if local is not None:
                return await self._sender.await_local(local, agent_id.type)
            data = await self._sender.request(
                agent_id, shard, type_name, codec.encode(msg), "msgpack", deadline, msg,
                target if type(target) is str else None,
            )  # fmt: skip
            if isinstance(data, LocalResult):
                return await self._sender.await_local(data.fut, agent_id.type)
            return self._sender.unwrap(agent_id, type_name, data, returns)

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
        mode = await self._directory.mode(agent_id, delivery, deadline - self._loop.time())
        if mode != "at_most_once":
            stored = await self._sender.send_durable(
                "ask", agent_id, shard, type_name, body, "json", deadline, mode, msg_id
            )
            return self._sender.unwrap(agent_id, type_name, stored, Any)
        data = await self._sender.request(agent_id, shard, type_name, body, "json", deadline, None)
        assert not isinstance(data, LocalResult)
        return self._sender.unwrap(agent_id, type_name, data, Any)

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
        Raises `AgentTypeNotFound`/`UnknownMessageType` only for a local target (a remote one
        drops what it cannot handle: a tell has no reply). On cancellation the message may or
        may not have been sent (durable: may or may not be stored).
        """
        agent_id, shard = self._resolve(target)
        local = self._local
        if delivery is None and local is not None and local.tell(agent_id, shard, msg):
            self._local_tells += 1
            if self._local_tells % 256 == 0:
                await asyncio.sleep(0)  # a tight loop of local tells must let the loop breathe
            return
        mode = self._directory.known_mode(agent_id, delivery) or await self._directory.mode(
            agent_id, delivery
        )
        if mode != "at_most_once":
            type_name = codec.message_type_name(type(msg))
            await self._sender.send_durable("tell", agent_id, shard, type_name, codec.encode(msg),
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
        await self._sender.publish_tell(agent_id, shard, type_name, codec.encode(msg), "msgpack")

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
        mode = await self._directory.mode(agent_id, delivery)
        if mode != "at_most_once":
            await self._sender.send_durable("tell", agent_id, shard, type_name, body, "json",
                                     self._deadline(None), mode, msg_id)  # fmt: skip
            return
        await self._sender.publish_tell(agent_id, shard, type_name, body, "json")

    async def register_types(self, specs: Iterable[AgentSpec]) -> None:
        """Publish agent types' delivery modes so clients without the classes use them."""
        await self._directory.register(specs)

    def _breaker(self, agent_id: AgentId) -> contextlib.AbstractContextManager[None]:
        return _NO_BREAKER if self._breakers is None else self._breakers.guard(str(agent_id))

    async def publish(self, topic_type: str, source: str, msg: msgspec.Struct) -> int:
        """Tell `msg` to every agent type subscribed to `topic_type`, keyed by `source`.

        Returns how many agent types it was sent to. Delivery per agent is as for `tell`, one
        after the other in type-name order: when one tell raises, the ones before it were sent
        and the ones after it were not (nothing is rolled back); retrying may deliver twice to
        the first ones (use durable agents with `exactly_once` where that matters).
        """
        agent_types = await self._directory.subscribers(topic_type)
        return await _tell_each(agent_types, source, lambda aid: self.tell(aid, msg))

    async def publish_json(self, topic_type: str, source: str, type_name: str, body: bytes) -> int:
        """`publish` with a JSON-encoded message named by its wire type."""
        agent_types = await self._directory.subscribers(topic_type)
        return await _tell_each(agent_types, source,
                                lambda aid: self.tell_json(aid, type_name, body))  # fmt: skip

    async def subscribe(self, topic_type: str, agent_type: str) -> None:
        """Record that messages published on `topic_type` go to agents of `agent_type`."""
        await self._directory.subscribe(topic_type, agent_type)

    # -- state --------------------------------------------------------------------------------

    async def delete_state(self, agent_id: AgentId | str) -> None:
        """Delete the stored state of `agent_id`: its record (with the exactly-once dedup
        memory in it) and, for an event-sourced agent, its events. The space is freed at once.

        On success the agent's next activation starts from its initial state. An activation
        alive at that moment never writes its state back: its next write finds the record gone,
        it ends without writing, and the messages it had queued go to a fresh activation
        (durable ones are delivered again; at-most-once ones, not run, get
        `DeliveryTimeout(maybe_delivered=False)`). Deleting absent state succeeds. Raises
        `NotConnected` when the engine did not answer (deleted or not: calling again is safe) and
        `ConfigurationError` for a mesh without the cluster's buckets.
        """
        if self._buckets is None:
            raise ConfigurationError("this mesh has no state bucket")
        aid = as_agent_id(agent_id)
        await _delete_state(self._transport, self.names, self._buckets.state, aid)

    # -- coordination -------------------------------------------------------------------------

    def _coord_kv(self, name: Literal["locks", "coord"]) -> KV:
        if self._buckets is None:
            raise ConfigurationError("this mesh has no coordination buckets")
        return self._buckets.locks if name == "locks" else self._buckets.coord

    def _keeper(self) -> LeaseKeeper:
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

        On cancellation (or the proposer's death) the proposal stays open: voters still vote and
        the decision is still recorded by whoever settles its votes (if nobody does, no
        `expired` is written); `decision(id)` reads it. Raises
        `NotConnected` if the proposal could not be recorded (then nobody was asked to vote).
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
        return Ballots(
            self._transport, self._coord_kv("coord"), self.names.events_subject("decision")
        )

    async def barrier(
        self, name: str, parties: int, *, member: str | None = None, timeout: float = 30.0
    ) -> int:
        """Arrive at barrier `name` as `member` (default: the calling agent, else this client)
        and wait until `parties` distinct members arrived; return how many have.

        Arriving is recorded before waiting and is never undone: after `DeliveryTimeout`
        (`parties` not reached within `timeout`) or a cancellation the arrival still counts, and
        arriving again as the same member counts once. `NotConnected` if the coordination
        bucket does not answer (the arrival may or may not have been recorded).
        """
        me = member or current_sender.get() or self.name
        return await barrier(self._coord_kv("coord"), name, me, parties, timeout)

    async def counter_add(self, name: str, delta: int = 1) -> int:
        """Add `delta` to the cluster-wide counter `name` (compare-and-set, linearizable);
        return its new value.

        A `NotConnected` or a cancellation after the write was sent leaves the add applied or
        not — the caller cannot tell which; re-adding may count twice. Use an `exactly_once`
        agent when every increment must count exactly once.
        """
        return await counter_add(self._coord_kv("coord"), name, delta)

    async def counter(self, name: str) -> int:
        """The current value of counter `name` (0 if it was never added to)."""
        return await counter_value(self._coord_kv("coord"), name)

    # -- internals --------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return deadline_after(self._loop.time(), timeout)

    # -- workflows (workflows/_client.py) ----------------------------------------------------

    async def start_workflow(
        self, workflow: type | str, key: str, input: Any, *, timeout: float | None = None
    ) -> _workflows.WorkflowHandle:
        """Start the workflow run `<type>/<key>`; idempotent (see `workflows._client`)."""
        return await _workflows.start_workflow(self, workflow, key, input, timeout=timeout)

    def workflow(self, run_id: str) -> _workflows.WorkflowHandle:
        """The handle of run `run_id`; `await mesh.workflow(id)` also checks that it exists."""
        return _workflows.WorkflowHandle(self, run_id)

    async def close(self) -> None:
        await self._bg.close()
        await self._transport.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class LocalRouteLike(Protocol):
    """The in-process route of a node (`runtime/_local.py`); a plain client has none."""

    def spec(self, agent_type: str) -> AgentSpec | None: ...
    def tell(self, agent_id: AgentId, shard: int, msg: Any) -> bool: ...
    def ask(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float
    ) -> asyncio.Future[Any] | None: ...
    def route(
        self, agent_id: AgentId, shard: int, msg: Any, deadline: float | None, *, ask: bool
    ) -> asyncio.Future[Any] | None: ...
    def route_once(
        self, agent_id: AgentId, shard: int, msg: Any, msg_id: str, deadline: float
    ) -> asyncio.Future[Any] | None: ...


_NO_BREAKER = contextlib.nullcontext()
#: `Mesh._ask_here_once(target, msg, msg_id, timeout)`, see `_here_once`.
HereOnce = Callable[[str, msgspec.Struct, str, "float | None"], "Awaitable[Any] | None"]


def _here_once(
    mesh: Mesh, target: str, msg: msgspec.Struct, msg_id: str, timeout: float | None
) -> Awaitable[Any] | None:
    """An `exactly_once` ask of `target` with `msg_id` handed straight to its activation in
    `mesh`'s process, skipping the mailbox (`LocalRouteLike.route_once`): for a caller that asks
    again with the same `msg_id` until it is answered (a workflow's `ctx.ask`). None when the
    target is not served here: then `Mesh.ask`."""
    assert mesh._local is not None
    agent_id, shard = mesh._resolve(target)
    deadline = mesh._deadline(timeout)
    fut = mesh._local.route_once(agent_id, shard, msg, msg_id, deadline)
    if fut is None:
        return None
    return mesh._sender.await_local(fut, agent_id.type)


def _not_here(
    target: str, msg: msgspec.Struct, msg_id: str, timeout: float | None
) -> Awaitable[Any] | None:
    return None


def _no_spec(agent_type: str) -> AgentSpec | None:
    return None


def _no_route(
    agent_id: AgentId, shard: int, msg: Any, deadline: float | None, *, ask: bool
) -> asyncio.Future[Any] | None:
    return None


async def _tell_each(
    agent_types: list[str], source: str, tell: Callable[[AgentId], Awaitable[None]]
) -> int:
    """A publish: `tell` to each subscribed type in turn, as tells of kind `publish` (metrics,
    traces: `_observe.py`)."""
    with publishes():
        for agent_type in agent_types:
            await tell(AgentId(agent_type, source))
    return len(agent_types)
