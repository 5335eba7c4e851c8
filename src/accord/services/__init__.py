"""Services the mesh runs: node agents, specs, placement, supervision, load balancing, promises."""

from ._client import deploy, explain, logs, promises_report, services, undeploy
from ._promises import PromiseHandle, Verdict, promise
from ._spec import InvalidSpec, ServiceSpec, load_spec, parse_spec
from ._store import PromiseConflict

__all__ = [
    "InvalidSpec",
    "PromiseConflict",
    "PromiseHandle",
    "ServiceSpec",
    "Verdict",
    "deploy",
    "explain",
    "load_spec",
    "logs",
    "parse_spec",
    "promise",
    "promises_report",
    "services",
    "undeploy",
]
