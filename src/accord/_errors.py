"""The one exception hierarchy of accord.

Every error a caller can see derives from `AccordError`; library errors (nats-py, msgspec) are
translated at the boundary so callers never catch a dependency's exception types.
"""

from __future__ import annotations


class AccordError(Exception):
    """Root of every error raised by accord."""

    #: Stable wire code for errors that travel in a reply envelope.
    code = "error"


class NotProcessed(AccordError):
    """Base of the errors that mean "certainly not processed": retrying is safe (after waiting
    for the cause to pass, for `Overloaded`, `Degraded` and `CircuitOpen`)."""

    code = "not_processed"


class ConfigurationError(AccordError, ValueError):
    """Bad arguments or settings given by the user (an invalid agent id, cluster name, ...)."""

    code = "bad_config"


class BadRequest(NotProcessed):
    """The receiver could not decode or validate a request; it was not processed."""

    code = "bad_request"


class AgentTypeNotFound(NotProcessed):
    """No node of the cluster hosts the requested agent type; the message was not processed."""

    code = "agent_type_not_found"


class UnknownMessageType(NotProcessed):
    """The agent type has no handler for this message type; the message was not processed."""

    code = "unknown_message_type"


class RemoteError(AccordError):
    """The handler raised; the agent keeps serving.

    `remote_type` names the exception class raised on the remote side, `remote_message` its text.
    The message *was* processed up to the point of the failure.
    """

    code = "remote_error"

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message


class DeliveryTimeout(AccordError, TimeoutError):
    """The deadline passed before a reply arrived.

    `maybe_delivered` is False when no node ever accepted the message (every attempt found no owner
    for the shard), so it was certainly not processed; True when a request reached an owner and the
    outcome is unknown.
    """

    code = "timeout"

    def __init__(self, message: str, *, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class TurnTimeout(AccordError, TimeoutError):
    """The handler ran longer than its agent type's `turn_timeout`; the turn was abandoned.

    The message *may have been processed in part*: the handler ran until the timeout (asks and
    tells it sent are not undone) and may still be running (a stuck thread or await cannot be
    killed), but nothing of the turn is kept: its state changes are rolled back, never
    persisted, and the activation is abandoned and replaced by a fresh one, which answers the
    next message. For an at-least-once / exactly-once delivery it counts as a failed attempt:
    the caller gets `TurnTimeout` at once, and the message stays in the agent's mailbox to be
    retried (in order) by the fresh activation up to `max_deliver` attempts, then
    dead-lettered; so it may still be applied after the caller saw this error.
    """

    code = "turn_timeout"


class NotConnected(AccordError, ConnectionError):
    """The client could not reach, or lost, the NATS server."""

    code = "not_connected"


class LeaseLost(AccordError):
    """A lease (shard or named) was lost or expired while work depended on it."""

    code = "lease_lost"


class LeaseNotAcquired(LeaseLost, TimeoutError):
    """A lease could not be taken within the timeout: another holder kept it. (A `LeaseLost`
    subclass, which is what this case raised before it had its own name.)"""

    code = "lease_not_acquired"


class Fenced(AccordError):
    """A write carried an epoch older than the one already recorded, and was refused."""

    code = "fenced"


class Contention(Fenced):
    """A conditional write lost the race too many times in a row: not applied; retry later. (A
    `Fenced` subclass, which is what this case raised before it had its own name.)"""

    code = "contention"


class EngineError(AccordError):
    """The embedded nats-server could not be started or stopped."""

    code = "engine_error"


class StateError(AccordError):
    """A stored agent state cannot be used (it no longer decodes, or its schema is unknown).

    Never silently reset: the agent refuses to activate until the record is migrated or removed.
    """

    code = "state_error"


class OutcomeUnknown(AccordError):
    """A durable send was not confirmed: the message may or may not be stored.

    Retrying the same call with the same `msg_id` is safe: the mailbox drops duplicates within its
    duplicate window.
    """

    code = "outcome_unknown"

    def __init__(self, message: str, *, msg_id: str) -> None:
        super().__init__(message)
        self.msg_id = msg_id


class StorageFull(AccordError):
    """The engine's store has no room for this write (a bucket or stream reached its byte limit,
    or the server its storage limit): the write was not applied.

    For a send (`tell`/`ask` of a durable agent) the message was not stored: nothing happened.
    When the state write at the end of an exactly-once or at-least-once turn is refused, the
    caller gets this error and the message stays in the mailbox unacknowledged: it is processed
    again, from the last stored state, once space is freed (so a retry must reuse its `msg_id`).
    Not transient: waiting does not help until something frees space (`Mesh.delete_state`,
    expiring state, a larger disk). Leases and membership do not depend on it.
    """

    code = "storage_full"


class MessageTooLarge(NotProcessed):
    """The encoded message is larger than the server's `max_payload`: refused before sending,
    so it was certainly not delivered. Send a reference (a key, a URL) instead of the data."""

    code = "message_too_large"


class PermissionDenied(AccordError):
    """The server refused this connection's credentials the subject of this operation (a role
    without that permission, see docs/security.md): nothing was published or subscribed."""

    code = "permission_denied"


class CircuitOpen(NotProcessed):
    """Calls to this target failed repeatedly; the breaker refuses new ones for a while."""

    code = "circuit_open"


class Degraded(NotProcessed):
    """The owner is cut off from the cluster's majority and its agent type is `degraded`: reads
    are still answered, this write was refused (not processed). Retry after the partition heals."""

    code = "degraded"


class Overloaded(NotProcessed):
    """The node's bulkhead for this agent type (or the whole node) is full; not processed."""

    code = "overloaded"


class WorkflowFailed(AccordError):
    """A workflow run ended without a result: it failed, was compensated, or was cancelled.

    `state` is the run's final state (`failed`, `compensated`, `cancelled`), `cause` the error
    that ended it (a step's last error, `run`'s exception, a `NonDeterminism`), and `compensated`
    whether the compensations of its completed steps all ran to completion.
    """

    code = "workflow_failed"

    def __init__(self, message: str, *, state: str, cause: str, compensated: bool) -> None:
        super().__init__(message)
        self.state = state
        self.cause = cause
        self.compensated = compensated


class NonDeterminism(AccordError):
    """A workflow's replay asked for a different step than its journal holds (its code changed
    under a running run); `step` names the step (number and name) where they diverge."""

    code = "non_determinism"

    def __init__(self, message: str, *, step: str) -> None:
        super().__init__(message)
        self.step = step


class WorkflowNotFound(AccordError):
    """No workflow run has this id (it was never started)."""

    code = "workflow_not_found"


#: Codes that a reply envelope may carry, mapped to the exception the caller raises.
WIRE_ERRORS: dict[str, type[AccordError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        AgentTypeNotFound,
        UnknownMessageType,
        DeliveryTimeout,
        Fenced,
        StateError,
        Overloaded,
        Degraded,
        TurnTimeout,
        StorageFull,
    )
}
