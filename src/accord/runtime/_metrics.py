"""Prometheus metrics of one node, in a registry of its own (never the process-global one): an
observer on the node's seam (`_observe.py`) for counters and histograms, plus gauges read from
the node's parts when scraped. Served by `_http.py`; names and meanings in docs/operations.md."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._observe import Kind, Observer, Outcome

TURN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)  # fmt: skip
FAILOVER_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)

#: Gauges read at scrape time: name -> (help, labels, reader returning {label values: value}).
Readers = Mapping[str, tuple[str, tuple[str, ...], Callable[[], Mapping[tuple[str, ...], float]]]]


class NodeMetrics(Observer):
    """The metrics of one node. Label values are agent types, target types, service and promise
    names and outcomes: never an agent key or a message id (their number is unbounded)."""

    def __init__(self, agent_types: Iterable[str], readers: Readers) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._messages = Counter(
            "accord_messages_total",
            "Messages handled by this node (one per handler run), by kind and outcome",
            ("agent_type", "kind", "outcome"), registry=r,
        )  # fmt: skip
        self._sent = Counter(
            "accord_messages_sent_total",
            "Messages this node sent, by kind and outcome (an ask's outcome is its reply's)",
            ("agent_type", "kind", "outcome"), registry=r,
        )  # fmt: skip
        self._turns = Histogram(
            "accord_turn_duration_seconds", "Handler run time per message",
            ("agent_type",), buckets=TURN_BUCKETS, registry=r,
        )  # fmt: skip
        self._activations = Gauge(
            "accord_activations", "Live activations on this node", ("agent_type",), registry=r
        )
        self._acquired = Counter(
            "accord_shard_acquired", "Shard leases this node took", registry=r
        )  # exposed as accord_shard_acquired_total
        self._lost = Counter(
            "accord_lease_lost", "Shard leases this node lost (not handed off)", registry=r
        )
        self._failover = Histogram(
            "accord_failover_seconds",
            "From a dead owner's last seen lease renewal to this node taking its shard",
            buckets=FAILOVER_BUCKETS, registry=r,
        )  # fmt: skip
        self._dlq = Counter(
            "accord_dlq_messages", "Messages this node moved to the dead letters",
            ("agent_type",), registry=r,
        )  # fmt: skip
        self._rejected = Counter(
            "accord_bulkhead_rejected", "Messages refused Overloaded by this node's bulkhead",
            ("agent_type",), registry=r,
        )  # fmt: skip
        self._breakers = Gauge(
            "accord_breaker_open", "Open circuit breakers of this node, by target agent type",
            ("target_type",), registry=r,
        )  # fmt: skip
        self._lag = Gauge(
            "accord_loop_lag_seconds", "How late the event loop monitor's last tick fired",
            registry=r,
        )  # fmt: skip
        r.register(_ScrapeGauges(readers))
        # Children by label values, so a turn costs a dict lookup, not `labels()`' validation.
        self._msg_child: dict[tuple[str, str, str], Any] = {}
        self._sent_child: dict[tuple[str, str, str], Any] = {}
        self._turn_child: dict[str, Any] = {}
        for t in agent_types:  # every hosted type shows, even before its first message
            self._activations.labels(t)
            self._turn_child[t] = self._turns.labels(t)

    def render(self) -> bytes:
        """The text exposition format of every metric now."""
        return generate_latest(self.registry)

    # -- the seam ------------------------------------------------------------------------------

    def turn_ended(self, agent_type: str, kind: Kind, outcome: Outcome, seconds: float) -> None:
        key = (agent_type, kind, outcome)
        child = self._msg_child.get(key)
        if child is None:
            child = self._msg_child[key] = self._messages.labels(*key)
        child.inc()
        hist = self._turn_child.get(agent_type)
        if hist is None:
            hist = self._turn_child[agent_type] = self._turns.labels(agent_type)
        hist.observe(seconds)

    def message_sent(self, agent_type: str, kind: Kind, outcome: Outcome) -> None:
        key = (agent_type, kind, outcome)
        child = self._sent_child.get(key)
        if child is None:
            child = self._sent_child[key] = self._sent.labels(*key)
        child.inc()

    def activations_changed(self, agent_type: str, delta: int) -> None:
        self._activations.labels(agent_type).inc(delta)

    def shard_acquired(self, shard: int, epoch: int, failover: float | None) -> None:
        self._acquired.inc()
        if failover is not None:
            self._failover.observe(failover)

    def shard_released(self, shard: int, graceful: bool) -> None:
        if not graceful:
            self._lost.inc()

    def bulkhead_rejected(self, agent_type: str) -> None:
        self._rejected.labels(agent_type).inc()

    def breaker_changed(self, target_type: str, open: bool) -> None:
        self._breakers.labels(target_type).inc(1 if open else -1)

    def dead_lettered(self, agent_type: str) -> None:
        self._dlq.labels(agent_type).inc()

    def loop_lag(self, seconds: float) -> None:
        self._lag.set(seconds)


class _ScrapeGauges(Collector):
    """Gauges whose value is state the node keeps anyway, read when scraped."""

    def __init__(self, readers: Readers) -> None:
        self._readers = readers

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, labels, _read) in self._readers.items():
            yield GaugeMetricFamily(name, doc, labels=labels)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, labels, read) in self._readers.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            try:
                values = read()
            except Exception:  # a part not started yet (or stopped): no samples this scrape
                values = {}
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family
