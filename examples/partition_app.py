"""Agents of the partition scenarios: one per failover strategy, all counting increments.

- `abs_counter`: failover="absolute" (never two owners), strong state;
- `sb_counter`: failover="split_brain_allowed", a CRDT counter merged on heal;
- `deg_counter`: failover="degraded": reads answered while cut off, writes refused;
- `sb_register`: failover="split_brain_allowed" with plain state: last writer (by HLC) wins on heal.
"""

from __future__ import annotations

import msgspec

import accord
from accord.crdt import GCounter


class Add(msgspec.Struct):
    n: int = 1


class Read(msgspec.Struct):
    pass


class Total(msgspec.Struct):
    total: int = 0


class SetTo(msgspec.Struct):
    value: int


class Register(msgspec.Struct):
    value: int = 0


class Hits(msgspec.Struct):
    hits: GCounter = msgspec.field(default_factory=GCounter)


class AbsCounter(accord.Agent, type="abs_counter", failover="absolute"):
    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        return self.state.total

    @accord.handler(read_only=True)
    async def read(self, msg: Read) -> int:
        return self.state.total


class SbCounter(
    accord.Agent, type="sb_counter", failover="split_brain_allowed", consistency="crdt"
):
    state: Hits

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.hits = self.state.hits.increment(self.replica_id, msg.n)
        return self.state.hits.value

    @accord.handler(read_only=True)
    async def read(self, msg: Read) -> int:
        return self.state.hits.value


class DegCounter(accord.Agent, type="deg_counter", failover="degraded"):
    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        return self.state.total

    @accord.handler(read_only=True)
    async def read(self, msg: Read) -> int:
        return self.state.total


class SbRegister(accord.Agent, type="sb_register", failover="split_brain_allowed"):
    state: Register

    @accord.handler
    async def set(self, msg: SetTo) -> int:
        self.state.value = msg.value
        return self.state.value

    @accord.handler(read_only=True)
    async def read(self, msg: Read) -> int:
        return self.state.value
