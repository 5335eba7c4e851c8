"""Agents for the placement tests and bench/colocation.py.

- `ledger` (exactly-once, strong state): counts increments.
- `pinger` / `ponger`: `pinger/i` asks its partner `ponger/<partner>` (default `i`) on `Ping`.
- `echo`: type A of the heterogeneous-nodes test (every node hosts it).
Every activation and deactivation is appended to $ACCORD_ACT_LOG (agent, pid, monotonic time),
so a test can check that no agent was ever active in two processes at once.
"""

from __future__ import annotations

import json
import os
import time

import msgspec

import accord


class Add(msgspec.Struct):
    n: int = 1


class Read(msgspec.Struct):
    pass


class Ping(msgspec.Struct):
    partner: str = ""
    n: int = 1


class Pong(msgspec.Struct):
    n: int = 0


class Where(msgspec.Struct):
    pass


def log_activation(agent: Logged, event: str) -> None:
    path = os.environ.get("ACCORD_ACT_LOG")
    if path:
        entry = {"agent": str(agent.id), "pid": os.getpid(), "event": event,
                 "t": time.monotonic()}  # fmt: skip
        with open(path, "a") as f:  # one short write per line: O_APPEND keeps lines whole
            f.write(json.dumps(entry) + "\n")


class Logged:
    """Logs activations (a mixin: not an agent type of its own)."""

    id: accord.AgentId

    async def on_activate(self) -> None:
        log_activation(self, "activate")

    async def on_deactivate(self) -> None:
        log_activation(self, "deactivate")


class Ledger(Logged, accord.Agent, type="ledger", delivery="exactly_once"):
    state: Pong

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.n += msg.n
        return self.state.n

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.n

    @accord.handler
    async def where(self, msg: Where) -> int:
        return os.getpid()


class Ponger(Logged, accord.Agent, type="ponger"):
    @accord.handler
    async def ping(self, msg: Ping) -> Pong:
        return Pong(msg.n)

    @accord.handler
    async def where(self, msg: Where) -> int:
        return os.getpid()


class Pinger(Logged, accord.Agent, type="pinger"):
    @accord.handler
    async def ping(self, msg: Ping) -> Pong:
        partner = msg.partner or self.id.key
        total = 0
        for _ in range(msg.n):
            total += (await self.mesh.ask(f"ponger/{partner}", Ping(n=1), returns=Pong)).n
        return Pong(total)

    @accord.handler
    async def where(self, msg: Where) -> int:
        return os.getpid()


class Echo(Logged, accord.Agent, type="echo"):
    @accord.handler
    async def where(self, msg: Where) -> int:
        return os.getpid()
