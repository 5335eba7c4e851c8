"""A real 3-server JetStream cluster in network namespaces: crash, partition, heal.

Needs root and `ip netns` (iproute2), `nft` (nftables); CI runs as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import pytest

from accord.testing.netlab import NatsCluster, NetLab, list_namespaces

T = TypeVar("T")
PREFIX = "acctest"


def _netns_usable() -> bool:
    if shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode == 0


pytestmark = [
    pytest.mark.netlab,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="netlab needs root (network namespaces)",
    ),
    pytest.mark.skipif(not _netns_usable(), reason="netlab needs a working `ip netns` (iproute2)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="netlab needs `nft` (nftables)"),
]

FAILED_WRITE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)


async def eventually(fn: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """Retry `fn` until it returns without raising; re-raise the last error at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except Exception as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout}s") from e
            await asyncio.sleep(0.2)


def _leftovers(lab: NetLab, started: list[int]) -> list[str]:
    """What teardown left behind: our namespaces, live servers we started, our client port."""
    left = [f"netns {ns}" for ns in list_namespaces() if ns.startswith(lab.id)]
    for pid in started:
        with contextlib.suppress(OSError):
            if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(f"nats-server pid {pid}")
    if lab.client_if and Path(f"/sys/class/net/{lab.client_if}").exists():
        left.append(f"link {lab.client_if}")
    return left


async def _scenario(lab: NetLab, cluster: NatsCluster, log: Callable[[str], None]) -> None:
    await asyncio.to_thread(cluster.wait_ready, 30.0)
    log("cluster ready")
    nc = await nats.connect(cluster.urls, connect_timeout=2)
    pinned: list[Any] = []
    try:
        js = nc.jetstream(timeout=3.0)
        kv = await js.create_key_value(bucket="netlab", replicas=3)
        await kv.put("a", b"1")
        assert (await kv.get("a")).value == b"1"
        log("R3 bucket created, put/get ok")

        # Crash the server that leads the bucket's raft group: 2 of 3 still make a quorum.
        leader = await cluster.leader_of("KV_netlab", nc=nc)
        assert leader in lab.hosts
        cluster.kill(leader)
        await eventually(lambda: kv.put("b", b"2"), 25.0, f"put after killing leader {leader}")
        log(f"killed leader {leader}; bucket still writable")
        cluster.start_server(leader)
        await asyncio.to_thread(cluster.wait_ready, 30.0)
        assert (await kv.get("b")).value == b"2"
        log(f"{leader} restarted and caught up")

        # Clients pinned to one server each (no reconnect: they can never hop to another server).
        # Bind before the partition: binding asks the stream leader for stream info.
        for host in ("h1", "h2"):
            pinned.append(await nats.connect(cluster.url(host), allow_reconnect=False))
        kv1 = await pinned[0].jetstream(timeout=2.0).key_value("netlab")
        kv2 = await pinned[1].jetstream(timeout=2.0).key_value("netlab")

        # h1 alone vs {h2, h3}, with h1 leading the bucket (the hard case): the minority side
        # can't commit, the majority elects a new leader and can.
        await cluster.move_leader("KV_netlab", "h1", nc=nc)
        lab.partition([{"h1"}, {"h2", "h3"}])
        with pytest.raises(FAILED_WRITE):
            await kv1.put("minority", b"x")
        log("minority write failed as expected")
        seq = await eventually(lambda: kv2.put("during", b"p"), 25.0, "majority write")
        with pytest.raises(FAILED_WRITE):
            await kv1.put("minority2", b"y")  # still no quorum once the majority has a leader
        log("majority wrote during the partition; h1 still cannot")

        # As seen from the majority (h1 may still believe it leads until it notices lost quorum).
        assert await cluster.leader_of("KV_netlab", nc=pinned[1]) in ("h2", "h3")
        lab.heal()

        async def h1_has_it() -> None:
            state = await asyncio.to_thread(cluster.stream_state, "h1", "KV_netlab")
            assert state is not None and state["last_seq"] >= seq, state  # h1's own replica
            assert (await kv1.get("during")).value == b"p"

        await eventually(h1_has_it, 30.0, "h1 catching up after heal")
        await eventually(lambda: kv1.put("after", b"h"), 30.0, "h1 write after heal")
        log("healed: h1 caught up and writes again")
    finally:
        for c in [*pinned, nc]:
            await c.close()


async def test_kv_survives_crash_and_partition() -> None:
    NetLab.cleanup_stale(PREFIX)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[netlab {time.monotonic() - t0:5.1f}s] {msg}")

    started: list[int] = []
    lab = NetLab(PREFIX, hosts=3)
    try:
        with lab, NatsCluster(lab) as cluster:
            try:
                await asyncio.wait_for(_scenario(lab, cluster, log), timeout=90.0)
            finally:
                started = list(cluster.started_pids)
    finally:
        left = _leftovers(lab, started)
        log(f"torn down; left behind: {left}")
    assert len(started) == 4  # 3 servers + 1 restart
    assert left == []
