"""Voters for the quorum examples and tests: each votes after `pause` seconds.

A voter whose key starts with `no` always votes no; the others vote as the plan says. A voter
appends its id to $ACCORD_VOTE_LOG (when set) as it starts deliberating, for tests to wait on.
"""

from __future__ import annotations

import asyncio
import os

import msgspec

import accord


class Plan(msgspec.Struct):
    approve: bool = True
    pause: float = 0.0


def _report_deliberating(voter: str) -> None:
    log = os.environ.get("ACCORD_VOTE_LOG")
    if log:
        with open(log, "a") as f:  # one short O_APPEND write: lines stay whole
            f.write(f"{voter}\n")


class Voter(accord.Agent, type="voter"):
    @accord.handler
    async def vote(self, req: accord.VoteRequest) -> bool:
        plan = msgspec.msgpack.decode(req.proposal, type=Plan)
        _report_deliberating(str(self.id))
        await asyncio.sleep(plan.pause)
        return plan.approve and not self.id.key.startswith("no")
