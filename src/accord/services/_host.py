"""What the node agent needs from the node that hosts it: `ServiceHost`, and `NodeParts`, which
builds one from a node's parts (membership, coordination, transport).

The services layer names only this protocol, never the runtime's `Node`, so the runtime can host
services without an import cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from typing import TYPE_CHECKING, Protocol

from ..cluster._membership import MemberInfo
from ..engine._api import Handler, Subscription, Transport

if TYPE_CHECKING:
    from ..coord._leases import Lease


class ServiceHost(Protocol):
    """The node a `NodeAgent` runs in, as the agent sees it."""

    @property
    def name(self) -> str:
        """This node's name: where its replicas are placed, and its `node/<name>` promiser."""

    @property
    def dead_after(self) -> float:
        """Seconds of silence after which the failure detector calls a node dead (a new
        services controller waits this long before it moves anything)."""

    def live(self) -> Collection[str]:
        """The nodes the failure detector considers alive right now, this one included."""

    def info(self, node: str) -> MemberInfo | None:
        """The node's latest self-description (status, labels), None if it never sent one."""

    def lease(
        self, name: str, ttl: int = 5, *, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Hold the cluster-wide lease `name` (as `Mesh.lease`: `LeaseLost` after `timeout`)."""

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Lease]:
        """Leadership terms of `name` (as `Mesh.election`)."""

    async def subscribe(self, subject: str, cb: Handler) -> Subscription:
        """Run `cb` for every message on the raw subject (the ledger's assessments)."""

    async def publish(self, subject: str, data: bytes) -> None:
        """Send `data` on the raw subject, at most once (replicas' log lines).

        Raises `NotConnected` when the connection cannot take it.
        """


class _Members(Protocol):
    @property
    def infos(self) -> Mapping[str, MemberInfo]: ...

    def live(self) -> list[str]: ...


class _Coordination(Protocol):
    def lease(
        self, name: str, ttl: int = 5, *, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Lease]: ...

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Lease]: ...


class NodeParts:
    """A `ServiceHost` made of the parts of a node: its name, its membership (who is alive, with
    which labels), what grants leases and elections (the node's `Mesh`), and its transport."""

    def __init__(
        self,
        name: str,
        members: _Members,
        coordination: _Coordination,
        transport: Transport,
        dead_after: float,
    ) -> None:
        self._name = name
        self._members = members
        self._coordination = coordination
        self._transport = transport
        self._dead_after = dead_after

    @property
    def name(self) -> str:
        return self._name

    @property
    def dead_after(self) -> float:
        return self._dead_after

    def live(self) -> Collection[str]:
        return self._members.live()

    def info(self, node: str) -> MemberInfo | None:
        return self._members.infos.get(node)

    def lease(
        self, name: str, ttl: int = 5, *, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        return self._coordination.lease(name, ttl, timeout=timeout)

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Lease]:
        return self._coordination.election(name, ttl)

    async def subscribe(self, subject: str, cb: Handler) -> Subscription:
        return await self._transport.subscribe(subject, cb)

    async def publish(self, subject: str, data: bytes) -> None:
        await self._transport.publish(subject, data)
