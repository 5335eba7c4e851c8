"""Test app of test_tracing: a relay agent whose handler asks the next agent on its list, so
one client ask becomes a chain of nested asks across node processes."""

from __future__ import annotations

import os

import msgspec

import accord


class Hop(msgspec.Struct):
    rest: list[str]


class Relay(accord.Agent, type="relay"):
    @accord.handler
    async def hop(self, msg: Hop) -> list[int]:
        """The pids of every process the chain passed through, this one first."""
        if not msg.rest:
            return [os.getpid()]
        after: list[int] = await self.mesh.ask(msg.rest[0], Hop(msg.rest[1:]), returns=list[int])
        return [os.getpid(), *after]


class PoolRelay(accord.Agent, type="relay-pool", stateless=True):
    """The same hop as a worker pool (any node runs it): traced like a shard's agent."""

    @accord.handler
    async def hop(self, msg: Hop) -> list[int]:
        if not msg.rest:
            return [os.getpid()]
        after: list[int] = await self.mesh.ask(msg.rest[0], Hop(msg.rest[1:]), returns=list[int])
        return [os.getpid(), *after]
