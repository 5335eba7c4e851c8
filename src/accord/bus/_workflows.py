"""Workflow lifecycle events on the bus: `workflow_events(mesh, bus)` hands every lifecycle event
of the runs a node hosts (through its `mesh`) to a bus topic, keyed by run id, so monitoring
subscribes to them like to any topic (per-run order, at least once from the bus on)."""

from __future__ import annotations

from collections.abc import Callable

from .._mesh import Mesh
from ..workflows._monitor import RunEvent, add_lifecycle_publisher
from ._api import AccordError
from ._bus import Bus


def workflow_events(mesh: Mesh, bus: Bus, topic: str = "workflow-events") -> Callable[[], None]:
    """Publish the lifecycle events of runs hosted by `mesh` (a `Node`: the runs it hosts) on
    `topic`, key = run id, type `RunEvent` (run, event, step, attempt, error, at, node).

    Each event is published inside the run's turn, after the events-stream append; a publish
    that fails is logged and dropped (monitoring, not the journal). Returns the function that
    stops it.
    """

    async def publish(ev: RunEvent) -> None:
        try:
            await bus.publish(topic, ev, key=ev.run)
        except AccordError as exc:
            raise RuntimeError(f"bus publish failed: {exc}") from None

    return add_lifecycle_publisher(mesh, publish)
