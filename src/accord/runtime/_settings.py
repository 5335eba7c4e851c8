"""Node settings (one typed object, a docstring line per field) and node counters."""

from __future__ import annotations

import msgspec

from ..cluster._graph import GraphSettings
from ..delivery._breaker import BreakerSettings


class PlacementSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Co-location rounds (`NodeSettings.adaptive`) and the communication graph they read."""

    round_interval: float = 20.0
    """Seconds between two decision rounds of the elected decider."""
    min_gain: float = 0.5
    """Messages/s an agent must gain (to its partners on the target, less those it leaves on its
    node) before it is moved: below it, a move costs more than it saves."""
    tolerance: float = 0.10
    """No node above the mean agent count plus max(tolerance x mean, slack)."""
    slack: int = 50
    max_move_fraction: float = 0.15
    """At most this fraction of the known agents moves in one round (at least one agent)."""
    hold_rounds: int = 3
    """Hysteresis: an agent moved is not moved again for this many rounds."""
    load_tolerance: float = 0.25
    """Load-aware rebalancing: a node above mean load + max(load_tolerance x mean, load_slack)
    hands agents to the least loaded node (load: messages/s + `turn_weight` x turn ms/s)."""
    load_slack: float = 20.0
    turn_weight: float = 1.0
    """Load units per millisecond of handler time per second (0: messages/s alone)."""
    compact_per_round: int = 64
    """Overrides a shard owner may remove per decay period when they say no more than the hash
    (cluster/_overrides.py)."""
    graph: GraphSettings = GraphSettings()
    sample: bool = True
    """Sample agent->agent messages into the graph (off: no graph, no co-location)."""


class NodeSettings(msgspec.Struct, kw_only=True):
    cluster: str = "default"
    """Cluster name; every subject and bucket is scoped by it."""
    num_shards: int | None = None
    """Shard count, used only when this node creates the cluster (None: 64, or as stored)."""
    lease_ttl: int | None = None
    """Shard lease TTL in whole seconds, used only at cluster creation (None: 2 or stored)."""
    replicas: int | None = None
    """JetStream replicas of the cluster's buckets and streams, stored with the cluster (explicit:
    raises a lower stored factor, never lowers one); None: min(3, servers JetStream can place
    replicas on), raised as servers join (cluster/_replication.py)."""
    heartbeat_interval: float = 0.25
    """Seconds between membership heartbeats."""
    suspect_after: float = 0.75
    """Seconds without a heartbeat before a peer is suspected."""
    dead_after: float = 1.5
    """Seconds without a heartbeat before a peer is declared dead and its shards re-placed."""
    drain_timeout: float = 10.0
    """Seconds a graceful handoff waits for queued turns before cancelling them."""
    deactivate_timeout: float = 5.0
    """Seconds an `on_deactivate` hook may run."""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    """Free-form node labels (zone, cost, ...) published with membership."""
    mailbox: bool | None = None
    """Consume the durable mailbox of owned shards. None: only if a hosted agent type uses
    at-least-once / exactly-once delivery, votes (handles `VoteRequest`) or is
    `split_brain_allowed` (its states merge back through the mailbox); each consumer is a
    JetStream Raft group, so nodes that need none should not pay for 64 of them."""
    max_inflight: int = 20_000
    """Bulkhead: messages queued or running on this node; beyond it asks get `Overloaded` and
    mailbox consumers stop fetching (backpressure)."""
    breaker: BreakerSettings | None = None
    """Circuit breakers for the asks this node makes (None: off)."""
    max_inflight_per_type: int = 10_000
    """Bulkhead per agent type, so one hot type cannot starve the others."""
    services: bool = True
    """Run the node agent: supervise the service replicas placed here, take part in the services
    controller election, assess promises (see docs/services.md)."""
    http_port: int | None = None
    """Serve the HTTP load balancer for deployed services on this port (None: no entry point)."""
    http_host: str = "127.0.0.1"
    """Address the load balancer listens on."""
    advertise: str = "127.0.0.1"
    """Address other nodes (and their load balancers) use to reach replicas running here."""
    metrics_port: int | None = None
    """Serve Prometheus metrics, /healthz and /readyz on this port (None: off; 0: any free port,
    the URL is logged, in `status()["metrics_url"]` and in the membership record)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on."""
    adaptive: bool = False
    """Co-locate agents that talk a lot and rebalance agent counts (`placement`)."""
    placement: PlacementSettings = PlacementSettings()
    """Co-location and communication-graph parameters (used with `adaptive`; the graph is
    always sampled, for `accord topology`)."""
    loop_lag_warning: float | None = 0.25
    """Seconds the event loop may stall (a handler blocking it) before a WARNING names the
    stall and the turn running; reported by a watchdog thread while the loop is still blocked.
    None: no loop monitor."""


class Stats(msgspec.Struct):
    """Counters of one node, reported by `accord status`."""

    turns: int = 0
    activations: int = 0
    deactivations: int = 0
    handler_errors: int = 0
    rejected: int = 0
    """Malformed or unroutable requests refused (error reply where a reply subject exists)."""
    dropped_not_owner: int = 0
    """Requests that reached a stale subscription and were ignored."""
    replies_withheld: int = 0
    """Turns that finished after this node's lease ended: their reply is never sent."""
    expired: int = 0
    """Messages whose deadline passed before their turn; not run."""
    deduplicated: int = 0
    """Exactly-once messages answered from the dedup record instead of being applied again."""
    dead_lettered: int = 0
    """Mailbox messages moved to the dead-letter stream."""
    merges: int = 0
    """Split-brain states merged back into this node's agents after a partition healed."""
    overloaded: int = 0
    """Messages refused by a bulkhead."""
    turn_timeouts: int = 0
    """Turns that ran past their type's `turn_timeout` (answered `TurnTimeout`, activation
    restarted)."""
    loop_stalls: int = 0
    """Times the event loop stalled for longer than `loop_lag_warning` (a blocking handler)."""
    loop_lag_last: float = 0.0
    """Seconds the loop monitor's last tick fired late."""
    loop_lag_max: float = 0.0
    """The largest such lateness since the node started (seconds)."""
