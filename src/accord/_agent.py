"""The programming model: `Agent` subclasses with `@handler` methods dispatched by message type.

A class becomes an `AgentSpec` (`_spec.py`) when it is defined (type name, handlers by wire name,
options); the runtime only ever talks to specs, never to class internals.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import time
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from ._codec import message_type_name
from ._errors import ConfigurationError
from ._ids import AgentId, snake_case, validate_agent_type
from ._spec import (
    CONSISTENCY_LEVELS,
    DELIVERY_MODES,
    EXECUTORS,
    FAILOVER_STRATEGIES,
    AgentOptions,
    AgentSpec,
    HandlerSpec,
    _known_specs,
)

if TYPE_CHECKING:
    from ._mesh import Mesh

F = TypeVar("F", bound=Callable[..., Any])

_HANDLER_MARK = "__accord_handler__"
_EXECUTOR_MARK = "__accord_executor__"


@typing.overload
def handler(fn: F, /) -> F: ...
@typing.overload
def handler(*, read_only: bool = False, executor: str | None = None) -> Callable[[F], F]: ...
def handler(
    fn: F | None = None, /, *, read_only: bool = False, executor: str | None = None
) -> F | Callable[[F], F]:
    """Mark a method as a message handler: `@accord.handler`, `@accord.handler(read_only=True)`
    or `@accord.handler(executor="thread")`.

    The handler's message parameter must be annotated with a `msgspec.Struct` type; messages of that
    type are dispatched to it. Its return value is the reply to an `ask` (ignored for a `tell`).
    `read_only` handlers promise not to change state: agents with `failover="degraded"` keep
    answering them while cut off from the cluster's majority.

    A handler is an `async def` run on the node's event loop, so it must never block it. A
    handler that has to make blocking calls is a plain `def` marked `executor="thread"`: each
    turn runs it in a worker thread (`asyncio.to_thread`), still one turn at a time per agent;
    it may read and change `self.state` but must not use `self.mesh` (which belongs to the
    loop). From an `async def`, run one blocking call with `await asyncio.to_thread(f, ...)`.
    """
    if executor is not None and executor not in EXECUTORS:
        raise ConfigurationError(
            f"@handler executor must be one of {EXECUTORS} (or None), got {executor!r}"
        )

    def mark(f: F) -> F:
        is_async = inspect.iscoroutinefunction(f)
        if executor is None and not is_async:
            raise ConfigurationError(
                f"@handler {f.__qualname__} must be an async def method, or a plain def marked "
                '@handler(executor="thread") to run in a worker thread'
            )
        if executor == "thread" and is_async:
            raise ConfigurationError(
                f'@handler(executor="thread") {f.__qualname__} must be a plain def: an async def '
                "runs on the event loop (call blocking code from it with asyncio.to_thread)"
            )
        setattr(f, _HANDLER_MARK, "read" if read_only else True)
        setattr(f, _EXECUTOR_MARK, executor)
        return f

    return mark(fn) if fn is not None else mark


class Agent:
    """Base class of agents. Subclass with `class Counter(accord.Agent, type="counter")`.

    Class keywords (all optional, inherited):

    - `type`: the agent type name (default: the snake_case class name);
    - `idle_timeout`: seconds without messages before deactivation (300);
    - `topics`: topic types this agent subscribes to (a topic's source becomes the agent key);
    - `delivery`: `"at_most_once"` (default), `"at_least_once"` or `"exactly_once"`;
    - `consistency` of the durable `state`: `"strong"` (default), `"eventual"`, `"crdt"`,
      `"event_sourced"`; `state_version` (1) and `flush_interval` (eventual, 1 s);
    - `max_deliver` (5) and `retry_backoff` (0.05 s base) for at-least-once redelivery;
    - `dedup_window` (100 message ids) for exactly-once; `snapshot_every` (50) and `events`
      (the event types) for event sourcing;
    - `turn_timeout`: seconds one turn (a handler call) may run (None: no limit, the default);
      past it the caller gets `TurnTimeout`, the turn's state changes are rolled back and the
      activation is abandoned and replaced by a fresh one;
    - `failover`: `"absolute"` (default: never two owners; a node cut off from the majority stops
      serving), `"split_brain_allowed"` (both sides keep serving; states merge on heal) or
      `"degraded"` (cut-off side answers `read_only` handlers, refuses writes);
    - `state_ttl`: whole seconds a state record is kept after its last write (0, the default:
      forever); an expired record is gone as if `Mesh.delete_state` removed it;
    - `stateless=True` makes the type a worker pool: every node hosting it serves it as a
      competing consumer (no owner, no per-key order, no `state`), each node running at most
      `max_concurrency` (64) handlers at once (docs/workflows.md, "Worker pools").

    Declare durable state with a class annotation `state: MyState` (a `msgspec.Struct` with
    defaults); it is loaded before the first turn and persisted as its consistency says.

    Inside handlers the agent has `self.id` (its `AgentId`), `self.mesh` (to tell/ask/publish) and
    `self.state`. An instance serves one message at a time.
    """

    __accord_spec__: ClassVar[AgentSpec]
    id: AgentId
    mesh: Mesh
    replica_id: str
    """Unique per activation (node name and shard epoch): the replica id for CRDT updates."""
    _pending_events: list[Any]

    def __init_subclass__(cls, *, type: str | None = None, **options: Any) -> None:
        parent: AgentSpec | None = getattr(cls, "__accord_spec__", None)
        type_name = validate_agent_type(snake_case(cls.__name__) if type is None else type)
        handlers = dict(parent.handlers) if parent else {}
        own: set[str] = set()
        for attr, fn in vars(cls).items():
            if callable(fn) and getattr(fn, _HANDLER_MARK, False):
                spec = _handler_spec(cls, attr, fn)
                wire = message_type_name(spec.msg_type)
                if wire in own:
                    raise ConfigurationError(
                        f"{cls.__name__}: two handlers for message type {wire!r}"
                    )
                own.add(wire)
                handlers[wire] = spec
        opts = _options(cls.__name__, parent.options if parent else AgentOptions(), options)
        state_type = _state_type(cls)
        if not isinstance(opts.stateless, bool):
            raise ConfigurationError(f"{cls.__name__}: stateless must be True or False")
        if opts.stateless:
            _check_stateless(cls.__name__, opts, state_type)
        elif "max_concurrency" in options:
            raise ConfigurationError(f"{cls.__name__}: max_concurrency needs stateless=True")
        if opts.consistency == "event_sourced" and not opts.events:
            raise ConfigurationError(f"{cls.__name__}: event_sourced agents must declare events=")
        cls.__accord_spec__ = AgentSpec(
            type_name=type_name,
            cls=cls,
            handlers=handlers,
            by_class={h.msg_type: h for h in handlers.values()},
            options=opts,
            state_type=state_type,
            event_types={message_type_name(t): t for t in opts.events},
        )
        _known_specs[type_name] = cls.__accord_spec__

    async def on_activate(self) -> None:
        """Called once before the first message of an activation is handled."""

    async def on_deactivate(self) -> None:
        """Called once when the activation ends (idle, shard handoff, node shutdown)."""

    async def remind(
        self, name: str, msg: Any, *, delay: float, every: float | None = None
    ) -> None:
        """Deliver `msg` to this agent in `delay` seconds (then every `every` seconds, if given)
        as a durable reminder: kept in the timer index, it survives deactivation, node death and
        a restart of the whole cluster, and re-activates the agent when due. At-least-once: a
        delivery whose turn did not answer is made again. Replaces a reminder of the same name.
        """
        from .workflows._timers import schedule

        if delay < 0 or (every is not None and every <= 0):
            raise ConfigurationError("remind: delay must be >= 0 and every > 0")
        await schedule(self.mesh, self.id, f"r:{name}", msg, time.time() + delay, every or 0.0)

    async def forget_reminder(self, name: str) -> None:
        """Cancel the reminder `name` (nothing if there is none); one already being delivered
        may still arrive once."""
        from .workflows._timers import cancel

        await cancel(self.mesh, self.id, f"r:{name}")

    def apply(self, event: Any) -> None:
        """Event-sourced agents: fold `event` into `self.state` (also used to replay the log)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(event)")

    def emit(self, event: Any) -> None:
        """Event-sourced agents: apply `event` now and append it to the log when the turn ends."""
        if type(event) not in self.__accord_spec__.options.events:
            raise ConfigurationError(f"{type(event).__name__} is not a declared event type")
        self.apply(event)
        self.__dict__.setdefault("_pending_events", []).append(event)


def _options(name: str, base: AgentOptions, given: dict[str, Any]) -> AgentOptions:
    unknown = set(given) - set(AgentOptions.__struct_fields__)
    if unknown:
        raise ConfigurationError(f"{name}: unknown agent option(s) {sorted(unknown)}")
    if "topics" in given:
        given["topics"] = tuple(given["topics"])
    if "events" in given:
        given["events"] = tuple(given["events"])
    try:
        opts = msgspec.structs.replace(base, **given)
    except TypeError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    if opts.idle_timeout <= 0:
        raise ConfigurationError(f"{name}: idle_timeout must be > 0")
    if opts.delivery not in DELIVERY_MODES:
        raise ConfigurationError(f"{name}: delivery must be one of {DELIVERY_MODES}")
    if opts.failover not in FAILOVER_STRATEGIES:
        raise ConfigurationError(f"{name}: failover must be one of {FAILOVER_STRATEGIES}")
    if opts.consistency not in CONSISTENCY_LEVELS:
        raise ConfigurationError(f"{name}: consistency must be one of {CONSISTENCY_LEVELS}")
    tt = opts.turn_timeout
    if tt is not None and (isinstance(tt, bool) or not isinstance(tt, int | float) or not tt > 0):
        raise ConfigurationError(f"{name}: turn_timeout must be > 0 seconds (or None: no limit)")
    if opts.max_deliver < 1 or opts.snapshot_every < 1 or opts.dedup_window < 1:
        raise ConfigurationError(f"{name}: max_deliver, snapshot_every, dedup_window must be >= 1")
    ttl = opts.state_ttl
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
        raise ConfigurationError(f"{name}: state_ttl must be whole seconds >= 0, got {ttl!r}")
    if ttl and opts.consistency == "event_sourced":
        raise ConfigurationError(
            f"{name}: state_ttl does not apply to event_sourced agents (their events would "
            "outlive the expired snapshot)"
        )
    for ev in opts.events:
        if not (isinstance(ev, type) and issubclass(ev, msgspec.Struct)):
            raise ConfigurationError(f"{name}: events must be msgspec.Struct types, got {ev!r}")
    return opts


def _check_stateless(name: str, opts: AgentOptions, state_type: type | None) -> None:
    """A worker pool has no owner and no state: refuse every option that presumes them."""
    mc = opts.max_concurrency
    if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
        raise ConfigurationError(f"{name}: max_concurrency must be an int >= 1, got {mc!r}")
    why = None
    if state_type is not None:
        why = "declares `state`"
    elif opts.consistency != "strong":
        why = f"declares consistency={opts.consistency!r}"
    elif opts.delivery == "exactly_once":
        why = "is exactly_once (dedup lives in an agent's state)"
    elif opts.failover != "absolute":
        why = f"declares failover={opts.failover!r} (a pool has no owner to fail over)"
    elif opts.state_ttl or opts.events:
        why = "declares state_ttl or events"
    if why is not None:
        raise ConfigurationError(
            f"{name}: a stateless type {why}; stateless types have no state and no per-key "
            "order (use an ordinary agent for that)"
        )


def _state_type(cls: type) -> type | None:
    """The `state: MyState` annotation, if the class (or a base) declares one."""
    for klass in cls.__mro__:
        if "state" in getattr(klass, "__annotations__", {}):
            hint = klass.__annotations__["state"]
            if isinstance(hint, str):  # `from __future__ import annotations`
                module = sys.modules.get(klass.__module__)
                try:
                    hint = eval(hint, vars(module) if module else {}, dict(vars(klass)))
                except Exception as exc:
                    msg = f"{cls.__name__}: cannot resolve `state` ({exc})"
                    raise ConfigurationError(msg) from None
            if not (isinstance(hint, type) and issubclass(hint, msgspec.Struct)):
                raise ConfigurationError(
                    f"{cls.__name__}: `state` must be annotated with a msgspec.Struct type"
                )
            try:
                hint()
            except TypeError:
                raise ConfigurationError(
                    f"{cls.__name__}: state type {hint.__name__} needs defaults for every field"
                ) from None
            return hint
    return None


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
    executor = getattr(fn, _EXECUTOR_MARK, None)
    return HandlerSpec(
        name=attr,
        fn=_in_thread(fn) if executor == "thread" else fn,
        msg_type=msg_type,
        returns=hints.get("return", Any),
        read_only=getattr(fn, _HANDLER_MARK, None) == "read",
        executor=executor,
    )


def _in_thread(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A blocking handler as the runtime calls it: awaited on the loop, run in a worker thread
    (with the turn's context: deadline, sender)."""

    @functools.wraps(fn)
    async def run(agent: Any, msg: Any) -> Any:
        return await asyncio.to_thread(fn, agent, msg)

    return run


def spec_of(cls: type[Agent]) -> AgentSpec:
    spec: AgentSpec | None = getattr(cls, "__accord_spec__", None)
    if spec is None or spec.cls is not cls:
        raise ConfigurationError(f"{cls!r} is not an accord.Agent subclass")
    return spec
