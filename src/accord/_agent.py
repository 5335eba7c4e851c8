"""The programming model: `Agent` subclasses with `@handler` methods dispatched by message type.

A class becomes an `AgentSpec` when it is defined (type name, handlers by wire name, options);
the node runtime (`_node.py`) only ever talks to specs, never to class internals.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from ._codec import message_type_name
from ._errors import ConfigurationError
from ._ids import AgentId, snake_case, validate_agent_type

if TYPE_CHECKING:
    from ._mesh import Mesh

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_HANDLER_MARK = "__accord_handler__"

#: Default idle time after which an activation is deactivated.
DEFAULT_IDLE_TIMEOUT = 300.0


def handler(fn: F) -> F:
    """Mark an async method as a message handler.

    The handler's message parameter must be annotated with a `msgspec.Struct` type; messages of that
    type are dispatched to it. Its return value is the reply to an `ask` (ignored for a `tell`).
    """
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"@handler {fn.__qualname__} must be an async def method")
    setattr(fn, _HANDLER_MARK, True)
    return typing.cast(F, fn)


class HandlerSpec(msgspec.Struct, frozen=True):
    name: str
    fn: Callable[[Any, Any], Awaitable[Any]]
    msg_type: type
    returns: Any


class AgentSpec(msgspec.Struct, frozen=True):
    """Everything the runtime needs to know about an agent type."""

    type_name: str
    cls: type[Agent]
    handlers: dict[str, HandlerSpec]
    by_class: dict[type, HandlerSpec]
    idle_timeout: float
    topics: tuple[str, ...]

    def handler_for_name(self, wire_name: str) -> HandlerSpec | None:
        return self.handlers.get(wire_name)


#: Specs of every agent class defined in this process, by type name. Only used to decode replies
#: into the handler's return type when the caller did not say; the runtime never depends on it.
_known_specs: dict[str, AgentSpec] = {}


def known_spec(type_name: str) -> AgentSpec | None:
    return _known_specs.get(type_name)


class Agent:
    """Base class of agents. Subclass with `class Counter(accord.Agent, type="counter")`.

    Class keywords: `type` (default: the snake_case class name), `idle_timeout` (seconds of no
    messages before deactivation, default 300), `topics` (topic types this agent subscribes to;
    a topic's source becomes the agent key).

    Inside handlers the agent has `self.id` (its `AgentId`) and `self.mesh` (to tell/ask/publish).
    An instance serves one message at a time.
    """

    __accord_spec__: ClassVar[AgentSpec]
    id: AgentId
    mesh: Mesh

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        idle_timeout: float | None = None,
        topics: tuple[str, ...] | list[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        parent: AgentSpec | None = getattr(cls, "__accord_spec__", None)
        type_name = validate_agent_type(type or snake_case(cls.__name__))
        handlers = dict(parent.handlers) if parent else {}
        for attr, fn in vars(cls).items():
            if callable(fn) and getattr(fn, _HANDLER_MARK, False):
                spec = _handler_spec(cls, attr, fn)
                handlers[message_type_name(spec.msg_type)] = spec
        if idle_timeout is None:
            idle_timeout = parent.idle_timeout if parent else DEFAULT_IDLE_TIMEOUT
        if idle_timeout <= 0:
            raise ConfigurationError(f"{cls.__name__}: idle_timeout must be > 0")
        cls.__accord_spec__ = AgentSpec(
            type_name=type_name,
            cls=cls,
            handlers=handlers,
            by_class={h.msg_type: h for h in handlers.values()},
            idle_timeout=float(idle_timeout),
            topics=tuple(topics) or (parent.topics if parent else ()),
        )
        _known_specs[type_name] = cls.__accord_spec__

    async def on_activate(self) -> None:
        """Called once before the first message of an activation is handled."""

    async def on_deactivate(self) -> None:
        """Called once when the activation ends (idle, shard handoff, node shutdown)."""


def _handler_spec(cls: type, attr: str, fn: Callable[..., Any]) -> HandlerSpec:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 2:
        raise ConfigurationError(
            f"{cls.__name__}.{attr}: a handler takes exactly one message parameter after self"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a forward reference that cannot be resolved at class creation
        raise ConfigurationError(
            f"{cls.__name__}.{attr}: cannot resolve annotations ({exc}); define message types "
            "at module level"
        ) from None
    msg_type = hints.get(params[1].name)
    if not (isinstance(msg_type, type) and issubclass(msg_type, msgspec.Struct)):
        raise ConfigurationError(
            f"{cls.__name__}.{attr}: the message parameter must be annotated with a msgspec.Struct"
            f" type, got {msg_type!r}"
        )
    return HandlerSpec(name=attr, fn=fn, msg_type=msg_type, returns=hints.get("return", Any))


def spec_of(cls: type[Agent]) -> AgentSpec:
    spec: AgentSpec | None = getattr(cls, "__accord_spec__", None)
    if spec is None or spec.cls is not cls:
        raise ConfigurationError(f"{cls!r} is not an accord.Agent subclass")
    return spec
