"""Replication you can trust, on real nats-servers in network namespaces (accord.netlab).

- A client that connects before any node creates nothing; the first nodes decide the factor
  (three servers: three replicas) and every accord bucket and stream gets it. Cutting off the
  server that leads the state bucket leaves the majority serving exactly-once agents with the
  values they acknowledged.
- A cluster born on two servers with every resource at one replica (as clients used to create
  them) is raised to two, then to three once a third server joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest

import accord
from accord._status import cluster_status
from accord.engine._admin import JetStreamError, can_place

from ._support import ROOT, eventually

netlab = pytest.importorskip("accord.testing.netlab")
sys.path.insert(0, str(ROOT / "examples"))
from durable_app import Add, Read  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.netlab]
APP = str(ROOT / "examples" / "durable_app.py")
EVERY = {
    "meta", "members", "leases", "subs", "state", "locks", "coord", "services", "placements",
    "instances", "promises", "events", "mailbox", "dlq", "es", "ledger", "logs",
}  # fmt: skip


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"needs the `{tool}` command (apt-get install iproute2 nftables)"
    return None


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    reason = _usable()
    if reason:
        pytest.skip(reason)
    netlab.NetLab.cleanup_stale("accrepl")
    with netlab.NetLab("accrepl", hosts=3) as lab:
        lab.logs = tmp_path
        yield lab


def _start_node(lab: Any, nats: Any, host: str, *extra: str) -> Any:
    log = open(lab.logs / f"node-{host}.log", "ab")  # noqa: SIM115
    try:
        return lab.run(
            host,
            [sys.executable, "-m", "accord", "node", "--nats", nats.url(host), "--app", APP,
             "--name", f"node-{host}", "--log-level", "info", *extra],
            stdout=log, stderr=log,
        )  # fmt: skip
    finally:
        log.close()


@contextlib.contextmanager
def _nodes(lab: Any, nats: Any, hosts: list[str]) -> Iterator[dict[str, Any]]:
    procs = {h: _start_node(lab, nats, h) for h in hosts}
    try:
        yield procs
        exited = {h: p.returncode for h, p in procs.items() if p.poll() is not None}
        assert not exited, f"node processes exited during the scenario: {exited}"
    finally:
        for p in procs.values():
            netlab.stop_process(p, grace=10)


async def _replication(mesh: accord.Mesh) -> dict[str, Any] | None:
    """The replication part of `accord status`, or None while no node answers."""
    try:
        return dict((await cluster_status(mesh, timeout=2.0))["replication"])
    except accord.AccordError:
        return None


async def _all_at(mesh: accord.Mesh, n: int) -> dict[str, Any] | None:
    """The status once the factor is `n` and every accord bucket and stream has `n` replicas,
    all of them current; else None."""
    rep = await _replication(mesh)
    if rep is None or "error" in rep or rep["setting"] != n:
        return None
    got = {r["name"]: r for r in rep["resources"]}
    if set(got) < EVERY or any(r["replicas"] != n or r["current"] != n for r in got.values()):
        return None
    assert rep["below"] == [] and rep["warning"] is None
    return rep


@contextlib.asynccontextmanager
async def _raw(urls: list[str]) -> AsyncIterator[Any]:
    nc = await nats_py.connect(urls, connect_timeout=2, max_reconnect_attempts=-1)
    try:
        yield nc
    finally:
        await nc.close()


async def _accord_streams(urls: list[str]) -> list[str]:
    async with _raw(urls) as nc:
        reply = await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=5)
    return [s for s in json.loads(reply.data).get("streams") or [] if "accord_" in s]


async def _connected(nats: Any, name: str) -> bool | None:
    """True once a server lists a client connection called `name` (its /connz)."""
    for h in nats.lab.hosts:
        _, connz = await asyncio.to_thread(nats.monitor, h, "connz")
        if any(c.get("name") == name for c in (connz or {}).get("connections") or []):
            return True
    return None


async def test_a_client_first_cluster_gets_three_replicas_and_survives_its_state_leader_cut_off(
    lab: Any,
) -> None:
    with netlab.NatsCluster(lab, base_dir=lab.logs / "nats") as nats:
        nats.wait_ready(60)
        client = asyncio.create_task(_enter(accord.connect(nats.urls, name="early-client")))
        try:
            await eventually(lambda: _connected(nats, "early-client"), 30, "the client connected")
            assert not client.done()  # it waits for a node ...
            assert await _accord_streams(nats.urls) == []  # ... and has created nothing
            with _nodes(lab, nats, ["h1", "h2", "h3"]):
                mesh = await asyncio.wait_for(asyncio.shield(client), 60)
                t0 = time.monotonic()
                await eventually(lambda: _all_at(mesh, 3), 60, "every resource at 3 replicas")
                print(f"\nall {len(EVERY)} resources at 3 replicas {time.monotonic() - t0:.1f}s "
                      "after the client got its mesh")  # fmt: skip
                await _state_leader_cut_off(lab, nats, mesh)
        finally:
            await _exit(client)


async def _state_leader_cut_off(lab: Any, nats: Any, everywhere: accord.Mesh) -> None:
    agents = [f"ledger/k{i}" for i in range(8)]
    acked: dict[str, int] = {}
    for a in agents:  # acknowledged exactly-once increments, before the cut
        for i in range(3):
            acked[a] = await everywhere.ask(a, Add(1), timeout=20, msg_id=f"{a}-before-{i}")
        assert acked[a] == 3
    leader = await nats.leader_of("KV_accord_default_state")
    assert leader is not None
    majority = [h for h in lab.hosts if h != leader]
    async with accord.connect([nats.url(h) for h in majority], name="majority") as mesh:
        lab.partition([{leader}, set(majority)])
        cut = time.monotonic()
        try:
            served = {}
            for a in agents:

                async def add_once(a: str = a) -> int | None:
                    try:
                        return int(await mesh.ask(a, Add(1), timeout=3, msg_id=f"{a}-after"))
                    except accord.AccordError:
                        return None

                value = await eventually(add_once, 60, f"{a} served by the majority")
                served[a] = time.monotonic() - cut
                assert value == acked[a] + 1, f"{a}: {value} after {acked[a]} acknowledged"
                again = await mesh.ask(a, Add(1), timeout=10, msg_id=f"{a}-after")
                assert again == value  # the retried ask returns the recorded reply
                assert await mesh.ask(a, Read(), timeout=10, delivery="at_most_once") == value
            print(f"majority served every agent within {max(served.values()):.1f}s of the cut "
                  f"(state leader {leader} cut off)")  # fmt: skip
        finally:
            lab.heal()


class _Growing(netlab.NatsCluster):  # type: ignore[name-defined,misc]
    """Servers of `first` route only to each other (a cluster of two); the others route to all."""

    first = ("h1", "h2")

    def _config(self, host: str) -> Path:
        hosts = self.lab.hosts
        self.lab.hosts = list(self.first) if host in self.first else hosts
        try:
            return super()._config(host)  # type: ignore[no-any-return]
        finally:
            self.lab.hosts = hosts


async def _legacy_cluster(urls: list[str]) -> None:
    """The cluster as clients used to create it: every bucket and stream at one replica, and
    a record without a replication factor."""
    from accord.cluster._config import Names, open_cluster
    from accord.delivery._mailbox import ensure_streams
    from accord.engine._nats import NatsTransport

    async with _raw(urls) as nc:
        engine, names = NatsTransport(nc, "test-setup"), Names("default")
        _, buckets = await open_cluster(engine, names, num_shards=8, replicas=1)
        await buckets.meta.put("config", b'{"v":1,"num_shards":8,"lease_ttl":2,"created_at":1.0}')
        await ensure_streams(engine, names, 1)


async def test_a_cluster_grown_from_two_servers_to_three_ends_with_every_resource_at_three(
    lab: Any,
) -> None:
    nats = _Growing(lab, base_dir=lab.logs / "nats")  # started server by server, not all
    try:
        for h in _Growing.first:
            nats.start_server(h)
        urls = [nats.url(h) for h in _Growing.first]

        async def two_servers() -> bool | None:
            with contextlib.suppress(OSError, nats_py.errors.Error, JetStreamError):
                async with _raw(urls) as nc:
                    return await can_place(nc, nc.jetstream(), 2) or None
            return None

        await eventually(two_servers, 90, "JetStream on two servers", interval=0.5)
        await _legacy_cluster(urls)
        with _nodes(lab, nats, ["h1"]):
            async with accord.connect(urls, name="grow-client") as mesh:
                value = await mesh.ask("ledger/g", Add(5), timeout=20, msg_id="g-1")
                await eventually(lambda: _all_at(mesh, 2), 60, "every resource at 2 replicas")
                nats.start_server("h3")
                t0 = time.monotonic()
                await eventually(lambda: _all_at(mesh, 3), 60, "every resource at 3 replicas")
                print(
                    f"\nall resources at 3 replicas {time.monotonic() - t0:.1f}s after h3 started"
                )
                assert await mesh.ask("ledger/g", Read(), delivery="at_most_once") == value
    finally:
        nats.stop()


async def _enter(cm: Any) -> Any:
    mesh = await cm.__aenter__()
    mesh._test_cm = cm
    return mesh


async def _exit(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        mesh = await task
        await mesh._test_cm.__aexit__(None, None, None)
