"""The public surface of `accord`: exactly the documented names, each importable."""

from __future__ import annotations

import importlib

import accord

DOCUMENTED = {
    "AccordError",
    "Agent",
    "AgentId",
    "AgentTypeNotFound",
    "BadRequest",
    "BreakerSettings",
    "CircuitOpen",
    "ConfigurationError",
    "Contention",
    "Decision",
    "Degraded",
    "DeliveryTimeout",
    "EmbeddedServer",
    "EngineError",
    "Fenced",
    "InvalidSpec",
    "Lease",
    "LeaseLost",
    "LeaseNotAcquired",
    "Mesh",
    "NonDeterminism",
    "Node",
    "NodeSettings",
    "NotConnected",
    "NotProcessed",
    "OutcomeUnknown",
    "Overloaded",
    "PromiseConflict",
    "RemoteError",
    "Retry",
    "StateError",
    "MessageTooLarge",
    "PermissionDenied",
    "StorageFull",
    "TurnTimeout",
    "UnknownMessageType",
    "Verdict",
    "VoteRequest",
    "Workflow",
    "WorkflowContext",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowNotFound",
    "WorkflowStatus",
    "bus",
    "connect",
    "handler",
    "promise",
}


def test_all_is_exactly_the_documented_set() -> None:
    assert set(accord.__all__) == DOCUMENTED
    assert len(accord.__all__) == len(DOCUMENTED), "__all__ lists a name twice"


def test_every_exported_name_is_importable() -> None:
    module = importlib.import_module("accord")
    for name in accord.__all__:
        assert getattr(module, name, None) is not None, name
    namespace: dict[str, object] = {}
    exec(f"from accord import {', '.join(accord.__all__)}", namespace)
    assert namespace.keys() >= DOCUMENTED


def test_star_import_exposes_only_the_documented_names() -> None:
    namespace: dict[str, object] = {}
    exec("from accord import *", namespace)
    assert set(namespace) - {"__builtins__"} == DOCUMENTED


def test_every_exported_exception_derives_from_accord_error() -> None:
    exported = [getattr(accord, n) for n in accord.__all__]
    errors = [o for o in exported if isinstance(o, type) and issubclass(o, BaseException)]
    assert len(errors) == 28
    for cls in errors:
        assert issubclass(cls, accord.AccordError), cls


def test_not_processed_groups_the_errors_that_are_safe_to_retry() -> None:
    safe = {accord.BadRequest, accord.AgentTypeNotFound, accord.UnknownMessageType,
            accord.Overloaded, accord.Degraded, accord.CircuitOpen}  # fmt: skip
    for cls in safe:
        assert issubclass(cls, accord.NotProcessed), cls
    maybe_applied = {accord.OutcomeUnknown, accord.DeliveryTimeout, accord.RemoteError,
                     accord.NotConnected, accord.TurnTimeout, accord.StorageFull}  # fmt: skip
    for cls in maybe_applied:
        assert not issubclass(cls, accord.NotProcessed), cls


MESH_SURFACE = {
    "ask", "ask_json", "tell", "tell_json", "publish", "publish_json", "subscribe",
    "register_types", "lease", "election", "fenced_write", "fenced_read", "propose", "decision",
    "barrier", "counter_add", "counter", "close", "name", "start_workflow", "workflow",
    "delete_state", "migrate",
}  # fmt: skip
NODE_SURFACE = MESH_SURFACE | {"start", "stop", "status", "activation_count", "held_shards"}
#: Plain data attributes set by the constructors (not methods).
MESH_DATA = {"names", "config"}
NODE_DATA = MESH_DATA | {"node_name", "settings", "specs", "stats"}


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_mesh_exposes_only_its_documented_methods() -> None:
    assert _public(accord.Mesh) == MESH_SURFACE


def test_node_exposes_only_its_documented_methods() -> None:
    # The internal callbacks of activations and the shard manager live on the node's parts
    # (runtime/), not on the public class.
    assert _public(accord.Node) == NODE_SURFACE


def test_node_instance_data_is_only_the_documented_attributes() -> None:
    node = accord.Node(name="surface-check")
    assert {n for n in vars(node) if not n.startswith("_")} == NODE_DATA - MESH_DATA
