"""The observation seam: the runtime reports what happens (messages, turns, activations, shards,
leases, back-pressure, dead letters, loop lag) to `Observer`s registered on one `Observers`
fan-out per node or client, so metrics, the status rates and placement sampling attach here.

Call sites guard every report with `if observers.active:`, so a process with no observer pays one
attribute test per event. Observers run on the event loop, inline: they must be quick and must
not raise (an exception is logged once per observer and that observer is dropped).
"""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger("accord.observe")

Kind = Literal["ask", "tell", "publish"]
Outcome = Literal["ok", "error", "timeout", "rejected"]

KIND_HEADER = "accord-kind"
"""Envelope header naming a tell sent by `Mesh.publish` (value `publish`, docs/protocol.md), so
the node handling it counts it as kind `publish`; any other tell carries no such header."""
PUBLISHED: dict[str, str] = {KIND_HEADER: "publish"}  # the headers of an untraced publish


def kind_of(asked: bool, headers: dict[str, str] | None) -> Kind:
    """The kind of a received message: an ask, a tell, or a tell sent by `Mesh.publish`."""
    if asked:
        return "ask"
    if headers is not None and headers.get(KIND_HEADER) == "publish":
        return "publish"
    return "tell"


class Observer:
    """What the runtime reports; every method is a no-op here, override the ones you need.

    `agent_type` is always a hosted or addressed agent type name, never a key or message id.
    """

    def message_sent(self, agent_type: str, kind: Kind, outcome: Outcome) -> None:
        """This process sent a message (an ask's outcome is known when its reply came back)."""

    def message_rejected(self, agent_type: str, kind: Kind) -> None:
        """A message for a hosted type arriving from the wire was refused `Overloaded` before
        its turn (the node's bulkhead full, a worker pool at `max_concurrency`, stopping)."""

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        """A handler ran for one message received by this node: `kind` ask or tell, `outcome`
        ok, error (the handler raised) or timeout (turn_timeout, or the caller's deadline)."""

    def activations_changed(self, agent_type: str, delta: int) -> None:
        """An activation of `agent_type` started (+1) or ended (-1) on this node."""

    def shard_acquired(self, shard: int, epoch: int, failover: float | None) -> None:
        """This node took `shard`'s lease; `failover` is the seconds since the previous owner,
        now dead, was last seen renewing it (None when it was free or handed off)."""

    def shard_released(self, shard: int, graceful: bool) -> None:
        """This node gave `shard` up: handed off (`graceful`) or lost its lease."""

    def bulkhead_rejected(self, agent_type: str) -> None:
        """A message was refused `Overloaded` by this node's bulkhead."""

    def breaker_changed(self, target_type: str, open: bool) -> None:
        """A circuit breaker of this process for an agent of `target_type` opened or closed."""

    def dead_lettered(self, agent_type: str) -> None:
        """A mailbox message for `agent_type` went to the dead letters."""

    def loop_lag(self, seconds: float) -> None:
        """The loop monitor's periodic tick fired `seconds` late."""


class Observers(Observer):
    """The fan-out: reports every event to the registered observers, in registration order."""

    __slots__ = ("_all", "active", "sends")

    def __init__(self) -> None:
        self._all: tuple[Observer, ...] = ()
        self.active = False  # tested by call sites before building a report
        # Some observer counts sent messages (`message_sent` overridden): tested by the senders,
        # so a node whose observers only count turns (its status rates) pays nothing per send.
        self.sends = False

    def add(self, observer: Observer) -> None:
        self._all = (*self._all, observer)
        self._changed()

    def remove(self, observer: Observer) -> None:
        self._all = tuple(o for o in self._all if o is not observer)
        self._changed()

    def _changed(self) -> None:
        self.active = bool(self._all)
        self.sends = any(type(o).message_sent is not Observer.message_sent for o in self._all)

    def _failed(self, observer: Observer) -> None:
        log.exception("observer %r failed and was removed", observer)
        self.remove(observer)

    def message_sent(self, agent_type: str, kind: Kind, outcome: Outcome) -> None:
        for o in self._all:
            try:
                o.message_sent(agent_type, kind, outcome)
            except Exception:
                self._failed(o)

    def message_rejected(self, agent_type: str, kind: Kind) -> None:
        for o in self._all:
            try:
                o.message_rejected(agent_type, kind)
            except Exception:
                self._failed(o)

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        for o in self._all:
            try:
                o.turn_ended(agent_type, kind, outcome, seconds)
            except Exception:
                self._failed(o)

    def activations_changed(self, agent_type: str, delta: int) -> None:
        for o in self._all:
            try:
                o.activations_changed(agent_type, delta)
            except Exception:
                self._failed(o)

    def shard_acquired(self, shard: int, epoch: int, failover: float | None) -> None:
        for o in self._all:
            try:
                o.shard_acquired(shard, epoch, failover)
            except Exception:
                self._failed(o)

    def shard_released(self, shard: int, graceful: bool) -> None:
        for o in self._all:
            try:
                o.shard_released(shard, graceful)
            except Exception:
                self._failed(o)

    def bulkhead_rejected(self, agent_type: str) -> None:
        for o in self._all:
            try:
                o.bulkhead_rejected(agent_type)
            except Exception:
                self._failed(o)

    def breaker_changed(self, target_type: str, open: bool) -> None:
        for o in self._all:
            try:
                o.breaker_changed(target_type, open)
            except Exception:
                self._failed(o)

    def dead_lettered(self, agent_type: str) -> None:
        for o in self._all:
            try:
                o.dead_lettered(agent_type)
            except Exception:
                self._failed(o)

    def loop_lag(self, seconds: float) -> None:
        for o in self._all:
            try:
                o.loop_lag(seconds)
            except Exception:
                self._failed(o)
