"""The communication graph a node learns from the agent->agent messages its agents send: edge
weights reinforced per message, decayed on a schedule, pruned below a threshold, with memory
bounded like a heavy-hitter sketch (Space-Saving: a new edge beyond capacity takes the place of
the weakest ones and inherits their weight as its error bound). Pure code: the clock is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec


class GraphSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Edge weights (the defaults of the design accord grew from) and the sketch's size."""

    initial: float = 0.5
    """Weight of an edge at its first message."""
    step: float = 0.1
    """Added per message, up to `cap`."""
    cap: float = 1.0
    decay: float = 0.02
    """Subtracted from every weight each `decay_every` seconds."""
    decay_every: float = 5.0
    prune: float = 0.1
    """Edges below this weight are forgotten."""
    capacity: int = 10_000
    """Edges kept per node (the heaviest; the weakest tenth is evicted when full)."""


class Edge:
    __slots__ = ("error", "local", "messages", "rate", "weight", "window")

    def __init__(self, weight: float, error: float) -> None:
        self.weight = weight
        self.error = error  # weight inherited from evicted edges (Space-Saving's bound)
        self.messages = 0  # since the edge was first kept
        self.window = 0  # messages since the last decay tick
        self.rate = 0.0  # messages/s over the last full decay period
        self.local = True  # the last message was delivered in-process


class CommGraph:
    """Edges `source agent -> destination agent` with their weights and rates.

    `record` is on the hot path of every agent->agent message: one dict lookup and a few
    attribute updates; decay runs from `tick()` (called by the node every `decay_every`).
    """

    def __init__(
        self, settings: GraphSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = s = settings or GraphSettings()
        self._clock = clock
        self.edges: dict[tuple[str, Any], Edge] = {}
        self._initial, self._step, self._cap = s.initial, s.step, s.cap
        self._last_tick = clock()
        self.evicted = 0

    def record(self, source: str, destination: Any, local: bool) -> None:
        """One message from agent `source` to `destination` (an `AgentId` or its string)."""
        key = (source, destination)
        e = self.edges.get(key)
        if e is None:
            if len(self.edges) >= self.settings.capacity:
                floor = self._evict()
                e = Edge(max(self._initial, min(self._cap, floor + self._step)), floor)
            else:
                e = Edge(self._initial, 0.0)
            self.edges[key] = e
        else:
            w = e.weight + self._step
            e.weight = w if w < self._cap else self._cap
        e.messages += 1
        e.window += 1
        e.local = local

    def _evict(self) -> float:
        """Drop the weakest tenth (at least one edge); return the heaviest weight dropped."""
        ranked = sorted(self.edges.items(), key=lambda kv: (kv[1].weight, kv[1].rate))
        cut = max(1, len(ranked) // 10)
        for key, _ in ranked[:cut]:
            del self.edges[key]
        self.evicted += cut
        return ranked[cut - 1][1].weight

    def tick(self) -> None:
        """Decay every weight once, update rates, prune edges below the threshold."""
        now = self._clock()
        period = max(1e-6, now - self._last_tick)
        self._last_tick = now
        s = self.settings
        dead = []
        for key, e in self.edges.items():
            e.rate = e.window / period
            e.window = 0
            e.weight -= s.decay
            if e.weight < s.prune:
                dead.append(key)
        for key in dead:
            del self.edges[key]

    def export(self, limit: int = 10_000) -> list[list[Any]]:
        """The heaviest edges as [source, destination, weight, rate, messages, local]."""
        elapsed = self._clock() - self._last_tick
        live = elapsed >= 1.0  # the current window is long enough to be a rate of its own

        def rate(e: Edge) -> float:
            return e.window / elapsed if live else e.rate

        ranked = sorted(self.edges.items(), key=lambda kv: (rate(kv[1]), kv[1].weight),
                        reverse=True)[:limit]  # fmt: skip
        return [[src, str(dst), round(e.weight, 3), round(rate(e), 3), e.messages, e.local]
                for (src, dst), e in ranked]  # fmt: skip


class AgentLoad:
    """Turns per agent (messages handled) and their handler time, over the current decay period
    and the last full one: what load-aware rebalancing reads. Handler time counts only for
    agents that sent no agent->agent message in the period: the turn time of an agent that
    asks others is mostly waiting for them, not work done here. Memory is bounded by the agents
    that ran a turn in those two periods (each of them is active on this node)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # agent -> [turns, seconds, messages sent] since the tick, and over the last period
        self._window: dict[str, list[float]] = {}
        self._last: dict[str, list[float]] = {}
        self._period = 0.0
        self._last_tick = clock()

    def record(self, agent: str, seconds: float) -> None:
        """One turn of `agent` that ran `seconds` (on the hot path: one dict lookup)."""
        w = self._window.get(agent)
        if w is None:
            self._window[agent] = [1.0, seconds, 0.0]
        else:
            w[0] += 1.0
            w[1] += seconds

    def sent(self, agent: str) -> None:
        """`agent` sent an agent->agent message from its turn."""
        w = self._window.get(agent)
        if w is None:
            self._window[agent] = [0.0, 0.0, 1.0]
        else:
            w[2] += 1.0

    def tick(self) -> None:
        now = self._clock()
        self._period = max(1e-6, now - self._last_tick)
        self._last_tick = now
        self._last, self._window = self._window, {}

    def export(self, limit: int = 2_000) -> tuple[list[list[Any]], float, float]:
        """([agent, turns/s, handler seconds/s] heaviest first, up to `limit`), and this node's
        totals over every agent (turns/s, handler seconds/s), over the last period and the
        current one together; handler time is 0 for an agent that sent messages."""
        span = self._period + max(0.0, self._clock() - self._last_tick)
        if span <= 0.0:
            return [], 0.0, 0.0
        sums: dict[str, list[float]] = {a: list(v) for a, v in self._last.items()}
        for agent, (n, secs, sent) in self._window.items():
            s = sums.setdefault(agent, [0.0, 0.0, 0.0])
            s[0] += n
            s[1] += secs
            s[2] += sent
        rows = [(a, n / span, 0.0 if sent else secs / span) for a, (n, secs, sent) in sums.items()]
        total_n = sum(r[1] for r in rows)
        total_s = sum(r[2] for r in rows)
        rows.sort(key=lambda r: (r[1], r[2]), reverse=True)
        out = [[a, round(n, 3), round(secs, 6)] for a, n, secs in rows[:limit] if n > 0]
        return out, round(total_n, 3), round(total_s, 6)
