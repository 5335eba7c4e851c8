"""Per-agent placement overrides on top of the shard hash: `agent.<base64url(id)>` in the leases
bucket names the node that serves the agent. The entry's revision is the agent's fencing epoch:
it shares the revision sequence of the shard leases, so it is above the epoch of every earlier
owner and an activation under it claims the agent's state away from all of them."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import msgspec

from .._background import Background
from ..engine._api import KV, Entry
from ._watch import follow

log = logging.getLogger("accord.placement")

PREFIX = "agent."


def place_subject(prefix: str, node: str, shard: int | str) -> str:
    """Where a node takes messages for the agents placed on it (`<prefix>.place.<node>.<shard>`)."""
    return f"{prefix}.place.{node}.{shard}"


class Override(msgspec.Struct, frozen=True):
    node: str
    reason: str = ""  # why it was placed there (co-location gain, type hosted, migrate)


class Placed(msgspec.Struct, frozen=True):
    node: str
    revision: int  # the agent's fencing epoch while this override stands


_dec = msgspec.msgpack.Decoder(Override)
_enc = msgspec.msgpack.Encoder()


def override_key(agent: str) -> str:
    """KV keys allow [-/_=.a-zA-Z0-9]; an agent id is arbitrary, so it is base64url'd."""
    return PREFIX + base64.urlsafe_b64encode(agent.encode()).decode().rstrip("=")


def agent_of(key: str) -> str | None:
    raw = key.removeprefix(PREFIX)
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


class Overrides:
    """A watched, cached copy of every override, and the compare-and-set that writes one.

    Entries only move forward: a watched entry older than one already known (written here and
    recorded with `set_local`) is ignored. `on_change(agent, placed)` runs for every change.
    """

    def __init__(self, kv: KV, bg: Background) -> None:
        self._kv = kv
        self._bg = bg
        self.table: dict[str, Placed] = {}
        self.on_change: Callable[[str, Placed | None], None] = lambda a, p: None

    def start(self) -> None:
        self._bg.spawn(
            follow(self._kv, self._apply, pattern=f"{PREFIX}>", what="placement"),
            name="accord-placement-watch",
        )

    def get(self, agent: str) -> Placed | None:
        return self.table.get(agent)

    def set_local(self, agent: str, placed: Placed) -> None:
        known = self.table.get(agent)
        if known is None or known.revision < placed.revision:
            self.table[agent] = placed
            self.on_change(agent, placed)

    async def write(self, agent: str, node: str, last: int, reason: str, timeout: float) -> int:
        """Point `agent` at `node` by compare-and-set on revision `last` (0: no override yet);
        return the new revision (the agent's new epoch). `WrongRevision` if it moved on."""
        value = _enc.encode(Override(node, reason))
        key = override_key(agent)
        if last:
            rev = await self._kv.update(key, value, last, timeout=timeout)
        else:
            rev = await self._kv.create(key, value, timeout=timeout)
        self.set_local(agent, Placed(node, rev))
        return rev

    async def delete(self, agent: str, last: int, timeout: float) -> None:
        """Remove `agent`'s override by compare-and-set on revision `last` (the agent goes back
        to its shard's hash). `WrongRevision` if it moved on. Only safe once the shard's owner
        holds the shard under an epoch above `last` (see runtime/_migrate.py `compact`)."""
        await self._kv.delete(override_key(agent), last=last, timeout=timeout)
        known = self.table.get(agent)
        if known is not None and known.revision == last:
            del self.table[agent]
            self.on_change(agent, None)

    def _apply(self, entry: Entry) -> None:
        agent = agent_of(entry.key)
        if agent is None:
            return
        if entry.deleted or not entry.value:
            known = self.table.get(agent)
            if known is not None and known.revision < entry.revision:
                del self.table[agent]
                self.on_change(agent, None)
            return
        try:
            ov = _dec.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("ignoring malformed placement entry %r", entry.key)
            return
        self.set_local(agent, Placed(ov.node, entry.revision))
