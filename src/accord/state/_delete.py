"""Deleting an agent's stored state (`Mesh.delete_state`): its event log, then its record.

Events go first: a record deleted before them could be rebuilt from them by an activation in
between. An activation that holds the record finds it gone on its next write (`StateDeleted`)
and ends without writing it back.
"""

from __future__ import annotations

from .._errors import NotConnected
from .._ids import AgentId
from ..cluster._config import Names
from ..engine._api import KV, JetStream, NoResponders, NotFound, Refused, RequestTimeout
from ._events import EventLog
from ._store import StateStore


async def delete_state(js: JetStream, names: Names, state: KV, agent_id: AgentId) -> None:
    """Delete `agent_id`'s events and state record (see `Mesh.delete_state`)."""
    events = EventLog(js, f"accord_{names.cluster}_es", f"{names.prefix}.es")
    try:
        await js.purge(events.stream, subject=events.subject(agent_id))
    except NotFound:
        pass  # no event log in this cluster (yet)
    except (Refused, RequestTimeout, NoResponders) as exc:
        raise NotConnected(f"cannot delete the events of {agent_id}: {exc}") from None
    await StateStore(state).delete(agent_id)
