"""Prometheus metrics of one node, in a registry of its own (never the process-global one): an
observer on the node's seam (`_observe.py`) that counts in plain dicts on the event loop, and a
collector that turns the counts — and gauges read from the node's parts — into metric families
when scraped. Served by `_http.py`; names and meanings in docs/operations.md.

prometheus-client's own Counter/Histogram take a lock per update (2.6 µs CPU a turn for the two,
against 0.8 µs here; see docs/benchmarks.md): updates and scrapes here all run on the node's
loop, so no lock is needed and a turn costs two dict updates and a bisect.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .._observe import Kind, Observer, Outcome

TURN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)  # fmt: skip
FAILOVER_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)

#: Gauges read at scrape time: name -> (help, labels, reader returning {label values: value}).
Readers = Mapping[str, tuple[str, tuple[str, ...], Callable[[], Mapping[tuple[str, ...], float]]]]

_MSG_LABELS = ["agent_type", "kind", "outcome"]


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: `le` semantics
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class NodeMetrics(Observer):
    """The metrics of one node. Label values are agent types, target types, service and promise
    names and outcomes: never an agent key or a message id (their number is unbounded)."""

    def __init__(self, agent_types: Iterable[str], readers: Readers) -> None:
        self._types = list(agent_types)
        self._readers = readers
        self._messages: dict[tuple[str, str, str], int] = {}
        self._sent: dict[tuple[str, str, str], int] = {}
        self._turns: dict[str, _Histogram] = {t: _Histogram(TURN_BUCKETS) for t in self._types}
        self._activations: dict[str, int] = dict.fromkeys(self._types, 0)
        self._acquired = 0
        self._lost = 0
        self._failover = _Histogram(FAILOVER_BUCKETS)
        self._dlq: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._breakers: dict[str, int] = {}
        self._lag = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The text exposition format of every metric now (call on the node's loop)."""
        return generate_latest(self.registry)

    # -- the seam (hot: plain dict updates) ------------------------------------------------------

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        key = (agent_type, kind, outcome)
        msgs = self._messages
        msgs[key] = msgs.get(key, 0) + 1
        hist = self._turns.get(agent_type)
        if hist is None:
            hist = self._turns[agent_type] = _Histogram(TURN_BUCKETS)
        hist.observe(seconds)

    def message_rejected(self, agent_type: str, kind: Kind) -> None:
        key = (agent_type, kind, "rejected")
        self._messages[key] = self._messages.get(key, 0) + 1

    def message_sent(self, agent_type: str, kind: Kind, outcome: Outcome) -> None:
        key = (agent_type, kind, outcome)
        self._sent[key] = self._sent.get(key, 0) + 1

    def activations_changed(self, agent_type: str, delta: int) -> None:
        self._activations[agent_type] = self._activations.get(agent_type, 0) + delta

    def shard_acquired(self, shard: int, epoch: int, failover: float | None) -> None:
        self._acquired += 1
        if failover is not None:
            self._failover.observe(failover)

    def shard_released(self, shard: int, graceful: bool) -> None:
        if not graceful:
            self._lost += 1

    def bulkhead_rejected(self, agent_type: str) -> None:
        self._rejected[agent_type] = self._rejected.get(agent_type, 0) + 1

    def breaker_changed(self, target_type: str, open: bool) -> None:
        self._breakers[target_type] = self._breakers.get(target_type, 0) + (1 if open else -1)

    def dead_lettered(self, agent_type: str) -> None:
        self._dlq[agent_type] = self._dlq.get(agent_type, 0) + 1

    def loop_lag(self, seconds: float) -> None:
        self._lag = seconds

    # -- the collector (scrape time) -------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield _counter("accord_messages", "Messages handled by this node (one per handler run, "
                       "or per refusal: outcome rejected)",
                       _MSG_LABELS, self._messages)  # fmt: skip
        yield _counter("accord_messages_sent", "Messages this node sent (an ask's outcome is its "
                       "reply's)", _MSG_LABELS, self._sent)  # fmt: skip
        turns = HistogramMetricFamily(
            "accord_turn_duration_seconds", "Handler run time per message", labels=["agent_type"]
        )
        for t, h in sorted(self._turns.items()):
            turns.add_metric([t], h.buckets(), h.sum)
        yield turns
        yield _gauge("accord_activations", "Live activations on this node", ["agent_type"],
                     {(t,): n for t, n in self._activations.items()})  # fmt: skip
        yield _counter("accord_shard_acquired", "Shard leases this node took", [],
                       {(): self._acquired})  # fmt: skip
        yield _counter("accord_lease_lost", "Shard leases this node lost (not handed off)", [],
                       {(): self._lost})  # fmt: skip
        failover = HistogramMetricFamily(
            "accord_failover_seconds",
            "From a dead owner's last seen lease renewal to this node taking its shard",
        )
        failover.add_metric([], self._failover.buckets(), self._failover.sum)
        yield failover
        yield _counter("accord_dlq_messages", "Messages this node moved to the dead letters",
                       ["agent_type"], {(t,): n for t, n in self._dlq.items()})  # fmt: skip
        yield _counter("accord_bulkhead_rejected", "Messages refused Overloaded by this node's "
                       "bulkheads", ["agent_type"],
                       {(t,): n for t, n in self._rejected.items()})  # fmt: skip
        yield _gauge("accord_breaker_open", "Open circuit breakers of this node, by target type",
                     ["target_type"], {(t,): n for t, n in self._breakers.items()})  # fmt: skip
        yield _gauge("accord_loop_lag_seconds", "How late the loop monitor's last tick fired", [],
                     {(): self._lag})  # fmt: skip
        for name, (doc, labels, read) in self._readers.items():
            try:
                values = read()
            except Exception:  # a part not started yet (or stopped): no samples this scrape
                values = {}
            yield _gauge(name, doc, list(labels), values)


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: Mapping[Any, float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family
