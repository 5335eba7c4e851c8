"""Workflow runs by type and state, for `accord_workflows{type,state}`: a watch of the run index
(`workflows/_monitor.py`) kept as one small tuple per run, counted when scraped. Started only
with metrics on; every node reports the same cluster-wide view (aggregate with `max`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import msgspec

from .._errors import AccordError
from ..cluster._watch import follow
from ..engine._api import BucketSpec, Entry, NotFound
from ..workflows._mesh_api import MeshLike

log = logging.getLogger("accord.telemetry")


class _TypeState(msgspec.Struct):
    type: str
    state: str


_decode = msgspec.json.Decoder(_TypeState).decode


class RunCounts:
    def __init__(self) -> None:
        self._runs: dict[str, tuple[str, str]] = {}

    def counts(self) -> dict[tuple[str, ...], float]:
        return {key: float(n) for key, n in Counter(self._runs.values()).items()}

    def _apply(self, entry: Entry) -> None:
        if entry.deleted or not entry.value:
            self._runs.pop(entry.key, None)
            return
        try:
            run = _decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self._runs[entry.key] = (run.type, run.state)

    async def run(self, mesh: MeshLike) -> None:
        """Forever (cancel to stop): follow the run index once it exists (looked for every
        10 s: metrics never create the bucket of a cluster that runs no workflows)."""
        spec = BucketSpec(
            name=mesh.names.bucket("workflows"), replicas=max(1, mesh.config.replicas)
        )
        while True:
            try:
                kv = await mesh._transport.bucket(spec, create=False)
                break
            except (AccordError, NotFound) as exc:
                log.debug("no workflow run index yet: %s", exc)
                await asyncio.sleep(10.0)
        await follow(kv, self._apply, what="workflow runs")
