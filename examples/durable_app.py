"""Durable agents for the delivery/state tests and examples.

- `ledger` (exactly-once, strong state): increments are applied exactly once, even across crashes.
- `tally` (at-least-once): every processing is appended to $ACCORD_PROCESS_LOG so a test can count
  deliveries and duplicates.
- `flaky` (at-least-once, max_deliver=3): fails until the file $ACCORD_FIXED exists.
- `slow_ledger` (strong) and `gcount` (crdt): a turn can be made slow to pause an owner mid-turn;
  a slow turn appends {"id", "replica"} to $ACCORD_TURN_LOG once it is inside, for tests to wait on.
- `account` (event-sourced, snapshot every 5 events).
"""

from __future__ import annotations

import asyncio
import json
import os

import msgspec

import accord
from accord.crdt import GCounter


class Add(msgspec.Struct):
    n: int = 1
    id: str = ""
    pause: float = 0.0


class Read(msgspec.Struct):
    pass


class Total(msgspec.Struct):
    total: int = 0


def _log_processing(entry: dict[str, object]) -> None:
    path = os.environ.get("ACCORD_PROCESS_LOG")
    if path:
        with open(path, "a") as f:  # one short write per line: O_APPEND keeps lines whole
            f.write(json.dumps(entry) + "\n")


def _inside_slow_turn(agent: accord.Agent, msg: Add) -> None:
    path = os.environ.get("ACCORD_TURN_LOG")
    if path and msg.pause:
        with open(path, "a") as f:
            f.write(json.dumps({"id": str(agent.id), "replica": agent.replica_id}) + "\n")


def _fixed() -> bool:
    path = os.environ.get("ACCORD_FIXED", "")
    return bool(path) and os.path.exists(path)


class Ledger(accord.Agent, type="ledger", delivery="exactly_once"):
    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        return self.state.total

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


class Tally(accord.Agent, type="tally", delivery="at_least_once"):
    @accord.handler
    async def add(self, msg: Add) -> None:
        if msg.pause:
            await asyncio.sleep(msg.pause)
        _log_processing({"agent": str(self.id), "id": msg.id, "pid": os.getpid()})


class Flaky(accord.Agent, type="flaky", delivery="at_least_once", max_deliver=3):
    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        if not _fixed():
            raise RuntimeError("flaky is broken")
        self.state.total += msg.n
        return self.state.total

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


class SlowLedger(accord.Agent, type="slow_ledger"):
    """Strong state; `Add.pause` seconds pass between the change and the end of the turn."""

    state: Total

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.total += msg.n
        _inside_slow_turn(self, msg)
        await asyncio.sleep(msg.pause)
        return self.state.total

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.total


class Counts(msgspec.Struct):
    hits: GCounter = msgspec.field(default_factory=GCounter)


class GCount(accord.Agent, type="gcount", consistency="crdt"):
    """A CRDT counter: concurrent writers' increments merge instead of overwriting."""

    state: Counts

    @accord.handler
    async def add(self, msg: Add) -> int:
        self.state.hits = self.state.hits.increment(self.replica_id, msg.n)
        _inside_slow_turn(self, msg)
        await asyncio.sleep(msg.pause)
        return self.state.hits.value

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.hits.value


class Deposited(msgspec.Struct):
    amount: int


class Withdrawn(msgspec.Struct):
    amount: int


class Deposit(msgspec.Struct):
    amount: int


class Withdraw(msgspec.Struct):
    amount: int


class Balance(msgspec.Struct):
    balance: int = 0
    ops: int = 0


class Account(
    accord.Agent,
    type="account",
    consistency="event_sourced",
    events=(Deposited, Withdrawn),
    snapshot_every=5,
):
    state: Balance

    def apply(self, event: object) -> None:
        if isinstance(event, Deposited):
            self.state.balance += event.amount
        elif isinstance(event, Withdrawn):
            self.state.balance -= event.amount
        self.state.ops += 1

    @accord.handler
    async def deposit(self, msg: Deposit) -> int:
        self.emit(Deposited(msg.amount))
        return self.state.balance

    @accord.handler
    async def withdraw(self, msg: Withdraw) -> int:
        if msg.amount > self.state.balance:
            raise ValueError("insufficient funds")
        self.emit(Withdrawn(msg.amount))
        return self.state.balance

    @accord.handler
    async def read(self, msg: Read) -> Balance:
        return self.state
