"""What the promise verifiers and the load balancer read of the services: `ServiceView`.

`NodeAgent` is the one implementation (its watched buckets, decoded); the readers name only this
protocol, so they sit below the agent in the import graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._spec import ServiceSpec
    from ._store import Instance, Placement, ServiceStore
    from ._supervisor import Replica


class ServiceView(Protocol):
    """One node's current view of the deployed services (refreshed by watch, never stale by more
    than the watch lag)."""

    @property
    def name(self) -> str:
        """The node this view belongs to (the assessor of what it records)."""

    @property
    def store(self) -> ServiceStore:
        """The services' buckets and streams, to record assessments and read the ledger."""

    @property
    def replicas(self) -> Mapping[tuple[str, int], Replica]:
        """The replicas this node runs, by (service, slot index; -1 for a fenced service)."""

    def current_specs(self) -> dict[str, ServiceSpec]:
        """Every deployed spec, by service name."""

    def current_placements(self) -> dict[str, Placement]:
        """The controller's latest placement of each service."""

    def current_instances(self) -> list[Instance]:
        """What every node reports it runs (records expire with their node)."""

    def healthy(self, service: str) -> list[Instance]:
        """Healthy replicas of `service` on live nodes that the placement still assigns."""

    def lost(self, service: str) -> list[Instance]:
        """Replicas of `service` last reported healthy by a node that is no longer alive."""
