"""What the runtime knows of an agent type: its spec (type name, handlers, options, state type).

`_agent.py` turns an `Agent` subclass into an `AgentSpec` when the class is defined; everything
below the programming model (`Mesh`, the runtime, state) reads specs, never the class internals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, get_args

import msgspec

Executor = Literal["thread"]
EXECUTORS: tuple[Executor, ...] = get_args(Executor)


class HandlerSpec(msgspec.Struct, frozen=True):
    name: str
    fn: Callable[[Any, Any], Awaitable[Any]]
    msg_type: type
    returns: Any
    read_only: bool = False
    executor: Executor | None = None
    """Where the handler runs: None on the event loop (an `async def`), "thread" in a worker
    thread (a plain `def`; `fn` then wraps it in `asyncio.to_thread`)."""


Delivery = Literal["at_most_once", "at_least_once", "exactly_once"]
Consistency = Literal["strong", "eventual", "crdt", "event_sourced"]
Failover = Literal["absolute", "split_brain_allowed", "degraded"]
DELIVERY_MODES: tuple[Delivery, ...] = get_args(Delivery)
CONSISTENCY_LEVELS: tuple[Consistency, ...] = get_args(Consistency)
FAILOVER_STRATEGIES: tuple[Failover, ...] = get_args(Failover)


class AgentOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The class keywords of an agent type (see `Agent`), inherited by subclasses."""

    idle_timeout: float = 300.0
    topics: tuple[str, ...] = ()
    delivery: Delivery = "at_most_once"
    consistency: Consistency = "strong"
    state_version: int = 1
    max_deliver: int = 5
    retry_backoff: float = 0.05
    snapshot_every: int = 50
    dedup_window: int = 100
    flush_interval: float = 1.0
    events: tuple[type, ...] = ()
    failover: Failover = "absolute"
    turn_timeout: float | None = None
    state_ttl: int = 0  # seconds a state record lives after its last write; 0: forever
    stateless: bool = False  # a worker pool: served by every hosting node (runtime/_pool.py)
    max_concurrency: int = 64  # stateless types: handlers running at once per node
    movable: bool = True  # adaptive placement may move its agents (co-location, rebalancing)


class AgentSpec(msgspec.Struct, frozen=True):
    """Everything the runtime needs to know about an agent type."""

    type_name: str
    cls: type[Any]
    handlers: dict[str, HandlerSpec]
    by_class: dict[type, HandlerSpec]
    options: AgentOptions
    state_type: type | None
    event_types: dict[str, type]

    @property
    def idle_timeout(self) -> float:
        return self.options.idle_timeout

    @property
    def topics(self) -> tuple[str, ...]:
        return self.options.topics

    @property
    def durable(self) -> bool:
        """Has state kept in the state bucket (or an event stream)."""
        return self.state_type is not None or self.options.delivery == "exactly_once"

    @property
    def stateless(self) -> bool:
        """A worker pool type: every node hosting it serves it, no owner, no state."""
        return self.options.stateless

    def handler_for_name(self, wire_name: str) -> HandlerSpec | None:
        return self.handlers.get(wire_name)


#: Specs of every agent class defined in this process, by type name. Only used to decode replies
#: into the handler's return type when the caller did not say; the runtime never depends on it.
_known_specs: dict[str, AgentSpec] = {}


def known_spec(type_name: str) -> AgentSpec | None:
    return _known_specs.get(type_name)
