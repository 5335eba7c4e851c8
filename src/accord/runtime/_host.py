"""What an activation may ask of the node that hosts it (`Host`), so `Activation` depends on this
small protocol and not on `Node`; and the shape of the hooks the node runs around turns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import AccordError
from .._ids import AgentId
from .._observe import Observers
from .._spec import AgentSpec
from ..delivery._mailbox import DurableDelivery
from ..state._durable import Durable
from ..state._store import MergeState
from ._bulkhead import Bulkhead
from ._settings import Stats

if TYPE_CHECKING:
    from .._mesh import Mesh

#: Run after a handler returned for a message of a given type: (message, agent id string,
#: result). Votes are recorded this way (`coord/_quorum.py`).
AfterTurn = Callable[[Any, str, Any], Awaitable[None]]


class ActivationRef(Protocol):
    """What the host keeps of an activation once it ends."""

    id: AgentId
    shard: int
    task: asyncio.Task[None]


class Host(Protocol):
    loop: asyncio.AbstractEventLoop
    name: str
    """The node's name (replica ids, merge records)."""
    stats: Stats
    bulkhead: Bulkhead
    deactivate_timeout: float
    observe: Observers
    """The node's observers (`_observe.py`): activations and turns are reported to them."""

    @property
    def after_turn(self) -> Mapping[type, AfterTurn]:
        """Hooks by message type, run after a handler of that type returned."""

    @property
    def mesh(self) -> Mesh:
        """What agents send with (`agent.mesh`)."""

    def valid(self, shard: int, epoch: int) -> bool:
        """May a turn of an activation born in `epoch` of `shard` run (or reply) now?"""

    def orphan_epoch(self, shard: int) -> int | None:
        """The epoch under which `shard` is served without holding it (cut off, standby)."""

    def durable_for(self, agent_id: AgentId, spec: AgentSpec, shard: int, epoch: int) -> Durable:
        """The durable state of one activation."""

    def ended(self, act: ActivationRef) -> None:
        """The activation stopped taking work (its task may still be deactivating)."""

    def abandon(self, act: Any, stuck: asyncio.Task[Any] | None, restart: bool) -> None:
        """`act` (an `Activation`) gave up after a turn timeout; with `restart` a fresh
        activation takes its place and its queue. `stuck` is the timed-out handler's task."""

    def dead_letter(self, data: bytes, dd: DurableDelivery, error: AccordError) -> Awaitable[None]:
        """A mailbox message failed `max_deliver` times: move it to the dead letters."""

    def merged(self, agent_id: AgentId, incoming: MergeState, outcome: str) -> None:
        """A split-brain peer's state was folded into this agent's."""
