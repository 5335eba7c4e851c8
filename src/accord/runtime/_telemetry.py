"""What a node tells about itself while it runs: the status rates (`_rates.py`, always on), and
with `NodeSettings.metrics_port` its Prometheus metrics (`_metrics.py`) and health checks served
over HTTP (`_http.py`). Everything attaches to the node's observation seam; the node's parts are
bound once they exist (`bind`: the HTTP server starts before membership, to publish its URL)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from .._background import Background
from .._observe import Observers
from ..cluster._membership import Membership
from ..cluster._placement import assign
from ..cluster._shards import ShardManager
from ..workflows._mesh_api import MeshLike
from ._bulkhead import Bulkhead
from ._rates import Rates
from ._runs import RunCounts
from ._settings import NodeSettings, Stats

log = logging.getLogger("accord.telemetry")


class _Unbound:
    """The node's parts before `Telemetry.bind`: not running, nothing held."""

    def held(self) -> dict[int, int]:
        return {}


class Telemetry:
    def __init__(
        self,
        node_name: str,
        settings: NodeSettings,
        agent_types: list[str],
        num_shards: int,
        bulkhead: Bulkhead,
        stats: Stats,
        observe: Observers,
    ) -> None:
        self._name = node_name
        self._membership: Membership | None = None
        self._shards: ShardManager | _Unbound = _Unbound()
        self._running: Callable[[], bool] = lambda: False
        self._services: Callable[[], Any] = lambda: None
        self._settings = settings
        self._types = agent_types
        self._num_shards = num_shards
        self._bulkhead = bulkhead
        self.rates = Rates(agent_types, bulkhead, stats)
        observe.add(self.rates)
        self._observe = observe
        self.url = ""  # the metrics base URL once served
        self._runs = RunCounts()
        self._bg = Background()

    async def start(self, stack: contextlib.AsyncExitStack) -> str:
        """Start serving metrics if configured; return the /metrics URL ("" when off).

        Raises `ConfigurationError` when the metrics address cannot be bound.
        """
        s = self._settings
        if s.metrics_port is None:
            return ""
        from ._http import MetricsServer
        from ._metrics import NodeMetrics

        metrics = NodeMetrics(self._types, self._readers())
        server = MetricsServer(s.metrics_host, s.metrics_port, metrics.render, self.healthz,
                               self.readyz)  # fmt: skip
        base = await server.start()
        stack.push_async_callback(server.stop)
        self._observe.add(metrics)
        stack.callback(self._observe.remove, metrics)
        stack.push_async_callback(self._bg.close)
        self.url = f"{base}/metrics"
        log.info("metrics on %s (health: %s/healthz, readiness: %s/readyz)", self.url, base, base)
        return self.url

    def bind(
        self,
        membership: Membership,
        shards: ShardManager,
        running: Callable[[], bool],
        services: Callable[[], Any],
        mesh: MeshLike,
    ) -> None:
        """The node's parts, once they exist; `services()` is the node agent or None."""
        self._membership = membership
        self._shards = shards
        self._running = running
        self._services = services
        if self.url:
            self._bg.spawn(self._runs.run(mesh), name="accord-workflow-runs")

    def stats(self) -> dict[str, Any]:
        return self.rates.snapshot()

    # -- checks --------------------------------------------------------------------------------

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while heartbeats (JetStream writes, like lease renewals) are confirmed:
        the last one less than max(1 s, 4 heartbeat intervals) ago."""
        m = self._membership
        if m is None or not self._running():
            return False, {"node": self._name, "reason": "not running"}
        age = time.monotonic() - m.last_beat
        limit = max(1.0, 4 * self._settings.heartbeat_interval)
        details = {"node": self._name, "last_heartbeat_s": round(age, 3)}
        if age >= limit:
            return False, {**details, "reason": "heartbeats not confirmed (NATS unreachable?)"}
        return True, details

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        """Ready once this node holds every shard placement gives it (its own membership view)."""
        m = self._membership
        if m is None or not self._running():
            return False, {"node": self._name, "reason": "not running"}
        me = self._name
        desired = {s for s, n in assign(self._num_shards, m.live()).items() if n == me}
        held = set(self._shards.held())
        missing = sorted(desired - held)
        details = {"node": me, "desired": len(desired), "held": len(held), "missing": missing}
        return not missing, details

    # -- gauges read when scraped ---------------------------------------------------------------

    def _readers(self) -> Mapping[str, Any]:
        bulkhead, types = self._bulkhead, self._types
        return {
            "accord_shards_owned": (
                "Shards this node holds now",
                (),
                lambda: {(): len(self._shards.held())},
            ),
            "accord_mailbox_pending": (
                "Messages accepted for a type on this node and not yet started",
                ("agent_type",),
                lambda: {(t,): bulkhead.load(t).n for t in types},
            ),
            "accord_promise_kept_ratio": (
                "Kept share of a promiser's recent assessments (services' promise ledger)",
                ("promise",),
                lambda: _kept(self._services()),
            ),
            "accord_workflows": (
                "Workflow runs by type and state, cluster-wide as this node sees them",
                ("type", "state"),
                self._runs.counts,
            ),
            "accord_service_replicas": (
                "Service replicas by health, cluster-wide as this node sees them",
                ("service", "health"),
                lambda: _replicas(self._services()),
            ),
        }


def _kept(agent: Any) -> dict[tuple[str, ...], float]:
    if agent is None:
        return {}
    return {(name,): row["ratio"] for name, row in agent.reputation.table().items()}


def _replicas(agent: Any) -> dict[tuple[str, ...], float]:
    if agent is None:
        return {}
    counts = Counter((i.service, i.status) for i in agent.current_instances())
    return {key: float(n) for key, n in counts.items()}
