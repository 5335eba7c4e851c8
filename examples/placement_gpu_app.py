"""The placement app plus type B of the heterogeneous-nodes test (`gpu`): a node started with
this app hosts every type of `placement_app` and `gpu`; nodes with `placement_app` alone do not
host `gpu`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from placement_app import Echo, Ledger, Logged, Pinger, Ponger, Where

import accord


class Gpu(Logged, accord.Agent, type="gpu"):
    @accord.handler
    async def where(self, msg: Where) -> int:
        return os.getpid()


AGENTS = [Ledger, Ponger, Pinger, Echo, Gpu]
