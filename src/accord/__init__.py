"""accord: a distributed runtime for agents on NATS JetStream."""

from . import bus as bus
from ._agent import Agent as Agent
from ._agent import handler as handler
from ._connect import connect as connect
from ._errors import AccordError as AccordError
from ._errors import AgentTypeNotFound as AgentTypeNotFound
from ._errors import BadRequest as BadRequest
from ._errors import CircuitOpen as CircuitOpen
from ._errors import ConfigurationError as ConfigurationError
from ._errors import Contention as Contention
from ._errors import Degraded as Degraded
from ._errors import DeliveryTimeout as DeliveryTimeout
from ._errors import EngineError as EngineError
from ._errors import Fenced as Fenced
from ._errors import LeaseLost as LeaseLost
from ._errors import LeaseNotAcquired as LeaseNotAcquired
from ._errors import MessageTooLarge as MessageTooLarge
from ._errors import NonDeterminism as NonDeterminism
from ._errors import NotConnected as NotConnected
from ._errors import NotProcessed as NotProcessed
from ._errors import OutcomeUnknown as OutcomeUnknown
from ._errors import Overloaded as Overloaded
from ._errors import PermissionDenied as PermissionDenied
from ._errors import RemoteError as RemoteError
from ._errors import StateError as StateError
from ._errors import StorageFull as StorageFull
from ._errors import TurnTimeout as TurnTimeout
from ._errors import UnknownMessageType as UnknownMessageType
from ._errors import WorkflowFailed as WorkflowFailed
from ._errors import WorkflowNotFound as WorkflowNotFound
from ._ids import AgentId as AgentId
from ._mesh import Mesh as Mesh
from .coord._leases import Lease as Lease
from .coord._quorum import Decision as Decision
from .coord._quorum import VoteRequest as VoteRequest
from .delivery._breaker import BreakerSettings as BreakerSettings
from .engine._server import EmbeddedServer as EmbeddedServer
from .runtime._node import Node as Node
from .runtime._settings import NodeSettings as NodeSettings
from .services._promises import Verdict as Verdict
from .services._promises import promise as promise
from .services._spec import InvalidSpec as InvalidSpec
from .services._store import PromiseConflict as PromiseConflict
from .workflows._client import WorkflowHandle as WorkflowHandle
from .workflows._context import WorkflowContext as WorkflowContext
from .workflows._model import Retry as Retry
from .workflows._model import WorkflowStatus as WorkflowStatus
from .workflows._workflow import Workflow as Workflow

__all__ = [
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
    "MessageTooLarge",
    "Node",
    "NodeSettings",
    "NonDeterminism",
    "NotConnected",
    "NotProcessed",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "PromiseConflict",
    "RemoteError",
    "Retry",
    "StateError",
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
]

__version__ = "0.1.0"
