"""The example app of `accord demo`: counter agents that log their activations.

Set ACCORD_ACTIVATION_LOG to a file path and each activation appends JSON lines
{"event": "activate"|"deactivate", "agent", "pid", "node", "t"} there, which the demo and the
tests use to prove that no agent was ever active on two live processes at once.
"""

from __future__ import annotations

import json
import os
import time

import msgspec

import accord


class Increment(msgspec.Struct):
    by: int = 1


class Get(msgspec.Struct):
    pass


class Count(msgspec.Struct):
    agent: str
    value: int
    pid: int


def _log(event: str, agent: accord.AgentId) -> None:
    path = os.environ.get("ACCORD_ACTIVATION_LOG")
    if path:
        line = json.dumps(
            {"event": event, "agent": str(agent), "pid": os.getpid(), "t": time.time()}
        )
        with open(path, "a") as f:  # one write per line: O_APPEND keeps lines whole
            f.write(line + "\n")


class Counter(accord.Agent, type="counter"):
    """Counts increments in memory (state is per activation in this example)."""

    def __init__(self) -> None:
        self.value = 0

    async def on_activate(self) -> None:
        _log("activate", self.id)

    async def on_deactivate(self) -> None:
        _log("deactivate", self.id)

    @accord.handler
    async def increment(self, msg: Increment) -> Count:
        self.value += msg.by
        return Count(str(self.id), self.value, os.getpid())

    @accord.handler
    async def get(self, msg: Get) -> Count:
        return Count(str(self.id), self.value, os.getpid())
