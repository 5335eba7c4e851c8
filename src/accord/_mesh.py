"""The client side of the mesh: ask / tell / publish to agents by name.

A message goes to the subject of its agent's shard. While a shard has no owner (NATS answers
"no responders"), the sender retries with capped exponential backoff until its deadline; nothing was
delivered on such an attempt, so retrying keeps at-most-once. A `Node` subclasses `Mesh` and
short-circuits messages for shards it owns (`_route_local`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from types import TracebackType
from typing import Any

import msgspec
from nats.js.kv import KeyValue

from . import _codec as codec
from ._agent import known_spec
from ._background import Background
from ._context import current_deadline, current_sender
from ._errors import (
    WIRE_ERRORS,
    AccordError,
    ConfigurationError,
    DeliveryTimeout,
    NotConnected,
    RemoteError,
)
from ._ids import AgentId, shard_of, validate_agent_type
from ._transport import NoResponders, RequestTimeout, Transport
from .cluster._config import ClusterConfig, Names

log = logging.getLogger("accord.mesh")

DEFAULT_TIMEOUT = 10.0
_BACKOFF_START = 0.005
_BACKOFF_CAP = 0.1


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
        subs_kv: KeyValue | None = None,
    ) -> None:
        self._transport = transport
        self.names = names
        self.config = config
        self._subs_kv = subs_kv
        self._subs: dict[str, set[str]] | None = None  # topic type -> agent types
        self._subs_ready = asyncio.Event()
        self._bg = Background()
        self._loop = asyncio.get_running_loop()

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
    ) -> Any:
        """Send `msg` to `target` and return its handler's reply.

        Ends with exactly one outcome: the reply; `RemoteError` (the handler raised; processed up to
        the failure); `AgentTypeNotFound` / `UnknownMessageType` / `BadRequest` (not processed);
        or `DeliveryTimeout` when the deadline passes — `maybe_delivered` says whether any owner
        may have received it. The deadline is `timeout` (default 10 s), capped by the deadline of
        the handler this call is made from. On cancellation the request may or may not have been
        delivered; no reply will be surfaced.
        """
        agent_id = as_agent_id(target)
        deadline = self._deadline(timeout)
        shard = shard_of(agent_id, self.config.num_shards)
        type_name = codec.message_type_name(type(msg))
        local = self._route_local(agent_id, shard, msg, deadline, ask=True)
        if local is not None:
            return await self._await_local(local, deadline, agent_id, type_name)
        body = codec.encode(msg)
        data = await self._request(agent_id, shard, type_name, body, "msgpack", deadline, msg)
        if isinstance(data, _LocalResult):
            return await self._await_local(data.fut, deadline, agent_id, type_name)
        return self._unwrap(agent_id, type_name, data, returns)

    async def ask_json(
        self, target: AgentId | str, type_name: str, body: bytes, *, timeout: float | None = None
    ) -> Any:
        """Ask with a JSON-encoded message named by its wire type (for the CLI and tools).

        Same outcomes as `ask`; the reply body is returned as plain JSON data.
        """
        agent_id = as_agent_id(target)
        deadline = self._deadline(timeout)
        shard = shard_of(agent_id, self.config.num_shards)
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
    ) -> bytes | _LocalResult:
        """Send one ask, retrying while the shard has no owner, until `deadline`."""
        subject = self.names.shard_subject(shard)
        backoff = _BACKOFF_START
        first = True
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
                target=str(agent_id),
                type=type_name,
                body=msgspec.Raw(body),
                timeout_ms=max(1, int(remaining * 1000)),
                sender=current_sender.get(),
            )
            try:
                return await self._transport.request(subject, codec.encode(req, enc), remaining)
            except NoResponders:
                await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
                backoff = min(backoff * 2, _BACKOFF_CAP)
            except RequestTimeout:
                raise DeliveryTimeout(
                    f"ask {agent_id} {type_name}: no reply within the deadline",
                    maybe_delivered=True,
                ) from None

    async def tell(self, target: AgentId | str, msg: msgspec.Struct) -> None:
        """Send `msg` to `target` without waiting for it to be handled (at-most-once).

        Returns once the message is handed to the local node's mailbox or to the NATS connection;
        it may or may not be delivered (e.g. while its shard changes owner it is dropped).
        """
        agent_id = as_agent_id(target)
        shard = shard_of(agent_id, self.config.num_shards)
        if self._route_local(agent_id, shard, msg, None, ask=False) is not None:
            return
        type_name = codec.message_type_name(type(msg))
        await self._publish_tell(agent_id, shard, type_name, codec.encode(msg), "msgpack")

    async def tell_json(self, target: AgentId | str, type_name: str, body: bytes) -> None:
        """`tell` with a JSON-encoded message named by its wire type (for the CLI and tools)."""
        agent_id = as_agent_id(target)
        shard = shard_of(agent_id, self.config.num_shards)
        await self._publish_tell(agent_id, shard, type_name, body, "json")

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
        subs = await self._subscriptions()
        return sorted(subs.get(topic_type, ()))

    async def subscribe(self, topic_type: str, agent_type: str) -> None:
        """Record that messages published on `topic_type` go to agents of `agent_type`."""
        validate_agent_type(topic_type)
        validate_agent_type(agent_type)
        if self._subs_kv is None:
            raise ConfigurationError("this mesh has no subscription registry")
        await self._subs_kv.put(f"{topic_type}.{agent_type}", b"1")
        if self._subs is not None:
            self._subs.setdefault(topic_type, set()).add(agent_type)

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

    async def _subscriptions(self) -> dict[str, set[str]]:
        if self._subs is None:
            self._subs = {}
            if self._subs_kv is not None:
                self._bg.spawn(self._watch_subs(), name="accord-subs-watch")
                await asyncio.wait_for(self._subs_ready.wait(), 5.0)
        return self._subs

    async def _watch_subs(self) -> None:
        assert self._subs_kv is not None and self._subs is not None
        watcher = await self._subs_kv.watchall()
        async for entry in watcher:
            if entry is None:
                self._subs_ready.set()
                continue
            topic, _, agent_type = entry.key.partition(".")
            if entry.operation in ("DEL", "PURGE"):
                self._subs.get(topic, set()).discard(agent_type)
            else:
                self._subs.setdefault(topic, set()).add(agent_type)

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


def _reply_type(agent_type: str, type_name: str) -> Any:
    spec = known_spec(agent_type)
    h = spec.handler_for_name(type_name) if spec else None
    return h.returns if h is not None else Any
