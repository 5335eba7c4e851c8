"""The client side of live migration: `Mesh.migrate` asks any node, which forwards to the owner
of the agent's shard (runtime/_migrate.py does the move), and turns the answer into a value or
the accord error it names."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

import msgspec

from ._errors import WIRE_ERRORS, AccordError, AgentTypeNotFound, Contention, NotConnected
from ._ids import AgentId, as_agent_id
from .cluster._config import Names
from .engine._api import NoResponders, RequestTimeout, Transport


class _Client(Protocol):
    names: Names
    _transport: Transport


async def migrate(
    mesh: _Client, agent_id: AgentId | str, node: str, *, timeout: float = 30.0
) -> int:
    """`Mesh.migrate` (its contract is there)."""
    aid = as_agent_id(agent_id)
    deadline = asyncio.get_running_loop().time() + timeout
    req = msgspec.json.encode({"op": "migrate", "agent": str(aid), "node": node})
    subject = f"{mesh.names.prefix}.placectl.any"
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise NotConnected(f"migrate {aid}: no node completed the move within {timeout}s")
        try:
            data = await mesh._transport.request(subject, req, remaining)
        except NoResponders:
            await asyncio.sleep(min(0.1, remaining))
            continue
        except RequestTimeout:
            raise NotConnected(f"migrate {aid}: no answer within {timeout}s") from None
        answer: dict[str, Any] = msgspec.json.decode(data)
        if answer.get("ok"):
            return int(answer.get("epoch", 0))
        code, error = str(answer.get("code", "error")), str(answer.get("error", ""))
        if code == Contention.code and "no owner" in error:
            await asyncio.sleep(min(0.2, max(0.0, remaining)))  # a shard changing hands
            continue
        known = {Contention.code: Contention, AgentTypeNotFound.code: AgentTypeNotFound}
        raise known.get(code, WIRE_ERRORS.get(code, AccordError))(f"migrate {aid}: {error}")


class Migrating:
    """What `Mesh` gets from here (a base class: `Mesh` itself is at its size limit)."""

    async def migrate(self, agent_id: AgentId | str, node: str, *, timeout: float = 30.0) -> int:
        """Move `agent_id` with its state to `node`; return its new fencing epoch once it is
        active there.

        Its turns under way and queued finish where it was, its state is persisted, then it is
        activated on `node` under a per-agent fence (an epoch above every earlier owner's); messages
        sent meanwhile wait and then go to `node` (asks in flight retry, durable messages are
        neither lost nor applied twice). Raises `AgentTypeNotFound` when `node` is not a live node
        hosting its type, `Contention` when a move of it is under way, its shard has no owner right
        now or a node did not answer (retry), and `NotConnected` when no node answered at all
        within `timeout` (moved or not: calling again is safe, a move to where it is returns at
        once). On cancellation the move may still complete.
        """
        return await migrate(cast(_Client, self), agent_id, node, timeout=timeout)
