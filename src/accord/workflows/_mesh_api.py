"""What the workflow layer uses of a `Mesh`, as a protocol: workflows sit above the client, and
`Mesh` offers `start_workflow`/`workflow` from this package, so naming `Mesh` here would make an
import cycle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .._ids import AgentId
from ..cluster._config import ClusterConfig, Names
from ..engine._api import Engine

if TYPE_CHECKING:
    from ..coord._leases import Lease


class MeshLike(Protocol):
    _transport: Engine
    names: Names
    config: ClusterConfig

    @property
    def name(self) -> str: ...

    async def ask(
        self,
        target: AgentId | str,
        msg: msgspec.Struct,
        *,
        timeout: float | None = None,
        returns: Any = None,
        delivery: str | None = None,
        msg_id: str | None = None,
    ) -> Any: ...

    async def ask_json(
        self,
        target: AgentId | str,
        type_name: str,
        body: bytes,
        *,
        timeout: float | None = None,
        delivery: str | None = None,
        msg_id: str | None = None,
    ) -> Any: ...

    _ask_here_once: Callable[[str, msgspec.Struct, str, float | None], Awaitable[Any] | None]
    """An exactly-once ask of an agent served in this process, without the mailbox; None when
    it is not served here (`_mesh._here_once`)."""

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Lease]: ...
