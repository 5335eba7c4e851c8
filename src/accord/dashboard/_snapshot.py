"""One snapshot of a cluster for `accord top` and the dashboard, gathered from NATS by an observer
process: it calls what `accord status`, `dlq`, `services`, `promises` and `workflows` call, and asks
each node for its own status. Nodes push nothing extra: all the cost is paid when someone looks."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .._background import cancel_and_wait
from .._errors import AccordError
from .._status import cluster_status
from ..delivery._dlq import DeadLetters
from ..delivery._mailbox import dlq_stream, mailbox_stream
from ..engine._api import NoResponders, NotFound, RequestTimeout
from ._leases import LeaseClock

if TYPE_CHECKING:
    from .._mesh import Mesh

#: Sections that read many records (ledgers, indexes, streams): refreshed at most this often.
SLOW_EVERY = 5.0
NODE_TIMEOUT = 0.5


class _Rates:
    """Messages per second from the difference of a counter between two snapshots."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def rate(self, key: str, now: float, count: int) -> float | None:
        prev = self._last.get(key)
        self._last[key] = (now, count)
        if prev is None or now <= prev[0] or count < prev[1]:
            return None  # first sight, or the node restarted (its counters began again)
        return round((count - prev[1]) / (now - prev[0]), 1)


class Observer:
    """Gathers snapshots of one cluster through `mesh`; keeps what rates and lease expiries need
    between calls. Each section fails on its own: its error is in `snapshot["errors"]` and the
    rest is still shown. `snapshot()` raises only `NotConnected` (no node answers the status)."""

    def __init__(self, mesh: Mesh, *, watch_leases: bool = False) -> None:
        self.mesh = mesh
        self._rates = _Rates()
        # section -> (read at, value, error of the last read or None); refreshed behind the
        # snapshot, so a slow ledger never delays the nodes' states on the page.
        self._slow: dict[str, tuple[float, Any, str | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._leases = LeaseClock(mesh) if watch_leases else None
        self.dlq = DeadLetters(mesh._transport, mesh.names, mesh.config.num_shards)

    async def close(self) -> None:
        await cancel_and_wait(list(self._refreshing.values()))
        if self._leases is not None:
            await self._leases.stop()

    def pause(self) -> None:
        """Stop following the leases (nobody looks); the next `snapshot()` starts again."""
        if self._leases is not None:
            self._leases.pause()

    def forget(self, section: str) -> None:
        """Read `section` afresh next time (after an action changed it, e.g. a DLQ replay)."""
        self._slow.pop(section, None)
        task = self._refreshing.pop(section, None)
        if task is not None:
            task.cancel()  # it may have read the section before the change

    async def snapshot(self) -> dict[str, Any]:
        """The cluster now: see docs/operations.md "Dashboard and accord top" for the shape."""
        if self._leases is not None:
            self._leases.start()
        st = await cluster_status(self.mesh, replication=False)  # that one is a slow section
        now = time.time()
        errors: dict[str, str] = {}
        reports = await asyncio.gather(*(self._node_status(n["name"]) for n in st["nodes"]))
        nodes = [
            _node(n, rep, now, self._rates) for n, rep in zip(st["nodes"], reports, strict=True)
        ]
        sections = ("dlq", "services", "promises", "workflows", "replication")
        slow = await asyncio.gather(*(self._section(s, errors) for s in sections))
        dlq, services, promises, workflows, replication = slow
        expiry = self._leases.expiries(now) if self._leases is not None else {}
        shards = [{**s, "expires_in": expiry.get(s["shard"])} for s in st["shards"]]
        return {
            "at": now,
            "cluster": st["cluster"],
            "num_shards": st["num_shards"],
            "lease_ttl": st["lease_ttl"],
            "reporter": st["reporter"],
            "nodes": nodes,
            "shards": shards,
            "history": list(reversed(st["history"])),
            "agent_types": _agent_types(nodes),
            "mailbox": await self._depths(errors),
            "dlq": dlq,
            "services": services,
            "promises": promises,
            "workflows": workflows,
            "topology": _topology(nodes, services),
            "replication": replication or {},
            "pools": st.get("pools") or {},
            "errors": errors,
        }

    async def _node_status(self, name: str) -> dict[str, Any] | None:
        """The node's own report (asked of it alone), or None when it does not answer."""
        subject = f"{self.mesh.names.admin_subject}.{name}"
        try:
            data = await self.mesh._transport.request(subject, b"{}", NODE_TIMEOUT)
            report: dict[str, Any] = msgspec.json.decode(data)
            return report
        except (NoResponders, RequestTimeout, AccordError, msgspec.DecodeError):
            return None

    async def _section(self, name: str, errors: dict[str, str]) -> Any:
        """The section's last read: awaited the first time, then refreshed in the background
        once older than SLOW_EVERY (the snapshot shows the previous value meanwhile)."""
        if name not in self._slow:
            await self._refresh(name)
        at, value, error = self._slow[name]
        if time.monotonic() - at >= SLOW_EVERY and name not in self._refreshing:
            task = asyncio.get_running_loop().create_task(self._refresh(name))
            self._refreshing[name] = task
            task.add_done_callback(functools.partial(self._refreshed, name))
        if error is not None:
            errors[name] = error
        return value

    def _refreshed(self, name: str, task: asyncio.Task[None]) -> None:
        if self._refreshing.get(name) is task:
            del self._refreshing[name]

    async def _refresh(self, name: str) -> None:
        read: dict[str, Callable[[], Awaitable[Any]]] = {
            "dlq": self._dead_letters,
            "services": self._services,
            "promises": self._promises,
            "workflows": self._workflows,
            "replication": self._replication,
        }
        try:
            self._slow[name] = (time.monotonic(), await read[name](), None)
        except (AccordError, NotFound, RequestTimeout, NoResponders) as exc:
            previous = self._slow.get(name)
            why = str(exc) or type(exc).__name__
            self._slow[name] = (time.monotonic(), previous[1] if previous else None, why)

    async def _dead_letters(self) -> list[dict[str, Any]]:
        return [msgspec.to_builtins(e) for e in await self.dlq.list(limit=500)]

    async def _services(self) -> list[dict[str, Any]]:
        from ..services import services

        return await services(self.mesh)

    async def _promises(self) -> dict[str, Any]:
        from ..services import promises_report

        return await promises_report(self.mesh, last=500)

    async def _workflows(self) -> list[dict[str, Any]]:
        from ..workflows._monitor import list_runs

        return [msgspec.to_builtins(r) for r in await list_runs(self.mesh)]

    async def _replication(self) -> dict[str, Any]:
        replication: dict[str, Any] = (await cluster_status(self.mesh))["replication"]
        return replication

    async def _depths(self, errors: dict[str, str]) -> dict[str, int | None]:
        """Messages waiting in the mailbox work queue and kept in the dead letters (None when the
        stream does not exist: nothing durable was ever sent)."""
        out: dict[str, int | None] = {}
        for key, stream in (("pending", mailbox_stream), ("dead_letters", dlq_stream)):
            try:
                state = await self.mesh._transport.stream_state(stream(self.mesh.names))
                out[key] = state.messages if state is not None else None
            except (AccordError, RequestTimeout, NoResponders) as exc:
                errors[f"mailbox.{key}"] = str(exc) or type(exc).__name__
                out[key] = None
        return out


def _node(
    n: dict[str, Any], rep: dict[str, Any] | None, now: float, rates: _Rates
) -> dict[str, Any]:
    """One node's row: the cluster view's entry `n` joined with the node's own report `rep`."""
    node: dict[str, Any] = {**n, "reachable": rep is not None, "activations": None,
                            "inflight": None, "msgs_per_s": None, "p99_turn_ms": None,
                            "loop_lag_ms": None, "agent_types": [], "per_type": {},
                            "counters": {}, "metrics_url": None}  # fmt: skip
    if rep is None:
        return node
    # A node with metrics reports `stats` (rates measured where they happen) next to its
    # `counters`; an older node has only the counters, under `stats`.
    stats = rep.get("stats") or {}
    counters = rep.get("counters") or ({} if "msgs_per_s" in stats else stats)
    node.update(activations=rep.get("activations"), inflight=rep.get("inflight"),
                agent_types=rep.get("agent_types", []), counters=counters,
                metrics_url=rep.get("metrics_url"))  # fmt: skip
    turns_rate = rates.rate(n["name"], now, int(counters.get("turns", 0)))
    node["msgs_per_s"] = stats.get("msgs_per_s", turns_rate)
    node["p99_turn_ms"] = stats.get("p99_turn_ms")
    lag = stats.get("loop_lag_ms")
    if lag is None and counters.get("loop_lag_last") is not None:
        lag = round(float(counters["loop_lag_last"]) * 1000, 1)  # the node's loop-lag probe
    node["loop_lag_ms"] = lag
    node["per_type"] = stats.get("per_type") or {}
    return node


def _agent_types(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent types over all nodes, hottest (most msgs/s, then activations) first."""
    types: dict[str, dict[str, Any]] = {}
    for n in nodes:
        for t in n["agent_types"]:
            row = types.setdefault(t, {"type": t, "nodes": 0, "activations": None,
                                       "msgs_per_s": None, "mailbox_pending": None})  # fmt: skip
            row["nodes"] += 1
            for field, value in (n["per_type"].get(t) or {}).items():
                if field in ("activations", "msgs_per_s", "mailbox_pending"):
                    row[field] = round((row[field] or 0) + value, 2)
    return sorted(types.values(), key=lambda r: (-(r["msgs_per_s"] or 0),
                                                 -(r["activations"] or 0), r["type"]))  # fmt: skip


def _topology(nodes: list[dict[str, Any]], services: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A placeholder graph: nodes and the service instances on them (no message edges yet)."""
    edges = [
        {"from": f"service:{s['name']}", "to": f"node:{i['node']}"}
        for s in services or []
        for i in s["instances"]
    ]
    vertices = [{"id": f"node:{n['name']}", "kind": "node", "state": n["state"]} for n in nodes]
    vertices += [{"id": f"service:{s['name']}", "kind": "service"} for s in services or []]
    return {"vertices": vertices, "edges": edges}
