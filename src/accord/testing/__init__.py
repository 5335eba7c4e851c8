"""Test support: real clusters of node processes, a network-namespace lab (`netlab`) and a
history checker (`history`). Nothing here is a fake: the same engine and node binary users run."""

from ._cluster import Cluster as Cluster
from ._cluster import NodeProcess as NodeProcess
from ._cluster import connect_retrying as connect_retrying
from ._cluster import wait_for_placement as wait_for_placement
from ._wait import eventually as eventually
from ._wait import eventually_async as eventually_async

__all__ = [
    "Cluster",
    "NodeProcess",
    "connect_retrying",
    "eventually",
    "eventually_async",
    "wait_for_placement",
]
