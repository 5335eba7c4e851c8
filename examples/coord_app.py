"""Voters for the quorum examples and tests: each votes after `pause` seconds.

A voter whose key starts with `no` always votes no; the others vote as the plan says.
"""

from __future__ import annotations

import asyncio

import msgspec

import accord


class Plan(msgspec.Struct):
    approve: bool = True
    pause: float = 0.0


class Voter(accord.Agent, type="voter"):
    @accord.handler
    async def vote(self, req: accord.VoteRequest) -> bool:
        plan = msgspec.msgpack.decode(req.proposal, type=Plan)
        await asyncio.sleep(plan.pause)
        return plan.approve and not self.id.key.startswith("no")
