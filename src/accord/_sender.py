"""One call on the wire: an ask retried while its shard has no owner (with the standby subject
for split-brain agents of a vanished owner), a durable send through the mailbox, a tell, and the
reply turned back into a value or the error it carries. Calls to a worker pool (a `stateless`
type) go to the pool's subjects and work queue instead (`delivery/_pools.py`)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from . import _codec as codec
from . import _trace
from ._context import current_sender, publishing
from ._directory import Directory
from ._errors import (
    WIRE_ERRORS,
    AccordError,
    DeliveryTimeout,
    MessageTooLarge,
    NotConnected,
    RemoteError,
)
from ._ids import AgentId
from ._observe import KIND_HEADER, PUBLISHED, Kind, Observers, Outcome
from ._retry import Backoff
from ._spec import known_spec
from .cluster._config import Names
from .delivery._client import DurableSender
from .delivery._mailbox import mailbox_subject
from .delivery._pools import pool_ask, pool_job_subject, pool_tell_subject
from .engine._api import Engine, NoResponders, RequestTimeout

_BACKOFF_START = 0.005
_BACKOFF_CAP = 0.1
STANDBY_AFTER = 0.25  # seconds of 'no responders' before a split-brain agent is served anywhere

#: Deliver in-process if this process serves the shard: (agent, shard, msg, deadline, ask=).
RouteLocal = Callable[..., "asyncio.Future[Any] | None"]


class Sender:
    def __init__(
        self,
        transport: Engine,
        names: Names,
        directory: Directory,
        route_local: RouteLocal,
        loop: asyncio.AbstractEventLoop,
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        _trace.configure()  # each mesh: on when OTEL_TRACES_EXPORTER says so (`_trace.py`)
        self._transport = transport
        self._names = names
        self._directory = directory
        self._route_local = route_local
        self._loop = loop
        self._durable: DurableSender | None = None
        self._rng = random.Random()
        self._reply_types: dict[tuple[str, str], Any] = {}
        # The subject of the node an agent is placed on by override, if known (a node's
        # placement table, runtime/_placement.py); else the shard's subject.
        self.place: Callable[[AgentId, int], str | None] = _unplaced

    async def request(
        self,
        agent_id: AgentId,
        shard: int,
        type_name: str,
        body: bytes,
        enc: codec.Encoding,
        deadline: float,
        msg: Any,
        target: str | None = None,
    ) -> bytes | LocalResult:
        """Send one ask, retrying while the shard has no owner, until `deadline`."""
        tracing = _trace.active
        if await self._pool(agent_id.type):
            if tracing is None:
                return await pool_ask(self._transport, self._names, agent_id, type_name, body,
                                      enc, deadline, self._rng)  # fmt: skip
            with tracing.send(agent_id.type, "ask", str(agent_id)) as headers:
                return await pool_ask(self._transport, self._names, agent_id, type_name, body,
                                      enc, deadline, self._rng, headers)  # fmt: skip
        if tracing is None:
            return await self._request(agent_id, shard, type_name, body, enc, deadline, msg,
                                       target, None)  # fmt: skip
        with tracing.send(agent_id.type, "ask", str(agent_id)) as headers:
            return await self._request(agent_id, shard, type_name, body, enc, deadline, msg,
                                       target, headers)  # fmt: skip

    async def _request(
        self,
        agent_id: AgentId,
        shard: int,
        type_name: str,
        body: bytes,
        enc: codec.Encoding,
        deadline: float,
        msg: Any,
        target: str | None,
        headers: _trace.Headers | None,
    ) -> bytes | LocalResult:
        shard_subject = self._names.shard_subject(shard)
        target = target or str(agent_id)
        backoff = Backoff(_BACKOFF_START, _BACKOFF_CAP, rng=self._rng)
        first = True
        placed = True  # try the node of an override first; its shard's owner after a miss
        unowned_since: float | None = None
        while True:
            if msg is not None and not first:  # the shard may have moved here meanwhile
                local = self._route_local(agent_id, shard, msg, deadline, ask=True)
                if local is not None:
                    return LocalResult(local)
            first = False
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                self._sent(agent_id.type, "ask", "timeout")
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
                headers=headers,
            )
            data = codec.encode(req, enc)
            _fits(data, self._transport.max_payload, agent_id, type_name)
            subject = (self.place(agent_id, shard) if placed else None) or shard_subject
            try:
                try:
                    return await self._transport.request(subject, data, remaining)
                except NoResponders:
                    if subject is not shard_subject:  # its node just went: its owner knows
                        placed = False
                        raise
                    now = self._loop.time()
                    unowned_since = now if unowned_since is None else unowned_since
                    if now - unowned_since < STANDBY_AFTER or not await self._split_brain(
                        agent_id, deadline - now
                    ):
                        raise
                    # The owner's process is gone (its subscription with it) and the lease has
                    # not expired yet: a split-brain-tolerant agent is served by any node now.
                    return await self._transport.request(
                        self._names.standby_subject(shard), data, deadline - now
                    )
            except NoResponders:
                await asyncio.sleep(min(backoff.next(), remaining))
            except RequestTimeout:
                self._sent(agent_id.type, "ask", "timeout")
                raise DeliveryTimeout(
                    f"ask {agent_id} {type_name}: no reply within the deadline",
                    maybe_delivered=True,
                ) from None

    async def send_durable(
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
        """Store a tell or an ask in its shard's mailbox (a tell to a worker pool: in the pool's
        work queue; an ask to one is an at-most-once ask whatever `mode` says, see
        `pool_ask`: a stateless handler has no state to apply a message to exactly once)."""
        pool = await self._pool(agent_id.type)
        if pool and kind == "ask":
            return await pool_ask(self._transport, self._names, agent_id, type_name, body, enc,
                                  deadline, self._rng, _tell_headers(agent_id, "ask"))  # fmt: skip
        if self._durable is None:
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
            headers=_tell_headers(agent_id, kind),
        )
        data = await self._durable.send(
            pool_job_subject(self._names, agent_id.type)
            if pool
            else mailbox_subject(self._names, shard),
            req,
            enc,
            deadline,
            self._names.shard_subject(shard),
        )
        return data or b""

    async def publish_tell(
        self, agent_id: AgentId, shard: int, type_name: str, body: bytes, enc: codec.Encoding
    ) -> None:
        req = codec.Request(
            v=codec.PROTOCOL_VERSION,
            kind="tell",
            target=str(agent_id),
            type=type_name,
            body=msgspec.Raw(body),
            sender=current_sender.get(),
            headers=_tell_headers(agent_id, "tell"),
        )
        pool = await self._pool(agent_id.type)
        subject = (
            pool_tell_subject(self._names, agent_id.type)
            if pool
            else self.place(agent_id, shard) or self._names.shard_subject(shard)
        )
        data = codec.encode(req, enc)
        _fits(data, self._transport.max_payload, agent_id, type_name)
        await self._transport.publish(subject, data)
        published = req.headers is not None and KIND_HEADER in req.headers
        self._sent(agent_id.type, "publish" if published else "tell", "ok")

    @property
    def observed(self) -> bool:
        """Some observer counts sent messages (else awaiting an in-process reply is all)."""
        return self._observe.sends

    async def await_local(self, fut: asyncio.Future[Any], agent_type: str) -> Any:
        """The reply of an in-process ask, reported to the observers of sent messages. The
        in-process route answers `fut` with `DeliveryTimeout` at its deadline."""
        if not self._observe.sends:
            return await fut
        try:
            result = await fut
        except AccordError as exc:
            self._sent(agent_type, "ask", _outcome(exc.code))
            raise
        self._sent(agent_type, "ask", "ok")
        return result

    def unwrap(self, agent_id: AgentId, type_name: str, data: bytes, returns: Any) -> Any:
        reply, enc = codec.decode_reply(data)
        if self._observe.sends:
            outcome = "ok" if reply.ok else _outcome(reply.error.code if reply.error else "")
            self._sent(agent_id.type, "ask", outcome)
        if reply.ok:
            if returns is None:
                returns = self._reply_type(agent_id.type, type_name)
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

    async def transport_request(self, subject: str, data: bytes, timeout: float) -> bytes:
        try:
            return await self._transport.request(subject, data, timeout)
        except (NoResponders, RequestTimeout):
            raise NotConnected(f"no accord node answered on {subject}") from None

    def _sent(self, agent_type: str, kind: Kind, outcome: Outcome) -> None:
        if self._observe.sends:
            self._observe.message_sent(agent_type, kind, outcome)

    async def _split_brain(self, agent_id: AgentId, timeout: float) -> bool:
        """Is the agent's type `split_brain_allowed`? False while the registry cannot tell."""
        try:
            return await self._directory.split_brain(agent_id, timeout)
        except NotConnected:
            return False

    async def _pool(self, agent_type: str) -> bool:
        """Is `agent_type` a worker pool? Until the registry has loaded (this starts loading
        it), only a class defined here can say so: an ask with an explicit `delivery` never
        waited on JetStream, and must not start to (a cut-off client keeps asking over core
        NATS)."""
        known = self._directory.known_pool(agent_type)
        if known is not None:
            return known
        try:
            return await self._directory.pool(agent_type, 0.0)
        except NotConnected:
            spec = known_spec(agent_type)
            return spec is not None and spec.stateless

    def _reply_type(self, agent_type: str, type_name: str) -> Any:
        """The declared return type of the handler of `type_name` (Any if this process lacks
        its class)."""
        cached = self._reply_types.get((agent_type, type_name))
        if cached is not None:
            return cached
        spec = known_spec(agent_type)
        h = spec.handler_for_name(type_name) if spec else None
        if h is None:
            return Any  # not cached: the class may still be defined later
        self._reply_types[(agent_type, type_name)] = h.returns
        return h.returns


def _tell_headers(agent_id: AgentId, kind: Kind) -> _trace.Headers | None:
    """A message's envelope headers when it waits for nothing: its trace context, and the
    `publish` kind for a tell sent by `Mesh.publish` (docs/protocol.md)."""
    if kind == "tell" and publishing.get():
        headers = _trace.sent(agent_id.type, "publish", str(agent_id))
        return PUBLISHED if headers is None else {**headers, **PUBLISHED}
    return None if _trace.active is None else _trace.sent(agent_id.type, kind, str(agent_id))


_REJECTED = frozenset({"overloaded", "agent_type_not_found", "unknown_message_type",
                       "bad_request", "circuit_open"})  # fmt: skip
_TIMEOUT = frozenset({"timeout", "turn_timeout"})


def _outcome(code: str) -> Outcome:
    """An error reply's code as a message outcome."""
    return "rejected" if code in _REJECTED else "timeout" if code in _TIMEOUT else "error"


def _unplaced(agent_id: AgentId, shard: int) -> str | None:
    return None


class LocalResult:
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self.fut = fut


def _fits(data: bytes, limit: int, agent_id: AgentId, type_name: str) -> None:
    """Refuse a message the server would drop (and nats-py close the connection over)."""
    if len(data) > limit:
        raise MessageTooLarge(
            f"{type_name} to {agent_id}: {len(data)} bytes exceed the server's max_payload "
            f"of {limit}"
        )
