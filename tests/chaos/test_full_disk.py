"""A full disk degrades; it does not take the node down (issue 11, item 3).

The JetStream store lives on a 24 MiB tmpfs the test mounts itself; an in-process node hosts an
exactly-once counter and an at-most-once echo. Exactly-once asks to ever new counters fill the
state bucket until its byte limit refuses them with `StorageFull`; meanwhile the echo keeps
answering and the node keeps every shard (leases live on memory storage), every acknowledged ask
is in the store, and `delete_state` frees space so that writes resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import accord
from accord._ids import AgentId
from accord.engine._api import BucketSpec, StreamSpec
from accord.engine._nats import NatsTransport
from accord.state._store import StateStore
from accord.testing import eventually_async

PAD = "x" * 1000  # per counter: its state record is ~1 KiB, so the bucket fills in seconds


class Tally(msgspec.Struct):
    n: int = 0
    pad: str = ""


class Bump(msgspec.Struct):
    pad: str = ""


class Read(msgspec.Struct):
    pass


class Ping(msgspec.Struct):
    text: str


class FdCounter(accord.Agent, type="fd_counter", delivery="exactly_once", idle_timeout=1.0):
    state: Tally

    @accord.handler
    async def bump(self, msg: Bump) -> int:
        self.state.n += 1
        self.state.pad = msg.pad
        return self.state.n

    @accord.handler
    async def read(self, msg: Read) -> int:
        return self.state.n


class FdEcho(accord.Agent, type="fd_echo"):
    @accord.handler
    async def ping(self, msg: Ping) -> str:
        return msg.text


@contextlib.contextmanager
def _small_filesystem(size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (and mount(8)); run the test as root")
    path = Path(tempfile.mkdtemp(prefix="accord-fulldisk-"))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    finally:
        path.rmdir()


def _counter(i: int) -> str:
    return f"fd_counter/c-{i}"


async def test_full_store_refuses_durable_writes_and_keeps_the_node_serving() -> None:
    with _small_filesystem("24m") as mnt:
        server = accord.EmbeddedServer(mnt)
        url = await asyncio.to_thread(server.start)
        cluster = f"fd{uuid.uuid4().hex[:8]}"
        node = accord.Node([FdCounter, FdEcho], nats=url, name="fd-node",
                           settings=accord.NodeSettings(cluster=cluster, num_shards=8))  # fmt: skip
        probe = await NatsTransport.connect([url], "fd-probe")
        try:
            await node.start()
            shards = node.config.num_shards

            async def all_held() -> bool:
                return len(node.held_shards()) == shards

            await eventually_async(all_held, 20, "every shard held")
            assert node.config.data_bytes > 0, "the cluster got no data byte budget"
            store = StateStore(
                await probe.bucket(BucketSpec(name=f"accord_{cluster}_state"), create=False)
            )

            # Fill: exactly-once asks to ever new counters, 32 at a time, until StorageFull.
            acked: list[int] = []
            full: list[int] = []
            other: list[tuple[int, str]] = []
            i = 0

            async def bump(k: int) -> None:
                try:
                    assert await node.ask(_counter(k), Bump(PAD), returns=int, timeout=10) == 1
                    acked.append(k)
                except accord.StorageFull:
                    full.append(k)
                except accord.AccordError as exc:
                    other.append((k, f"{type(exc).__name__}: {exc}"))

            deadline = time.monotonic() + 45
            while len(full) < 8 and time.monotonic() < deadline:
                await asyncio.gather(*(bump(k) for k in range(i, i + 32)))
                i += 32
            assert full, f"the store never filled: {len(acked)} writes acknowledged"
            assert not other, f"durable writes failed otherwise than StorageFull: {other[:5]}"
            print(f"\nfull-disk: {len(acked)} exactly-once writes acknowledged, then StorageFull "
                  f"(data budget {node.config.data_bytes} bytes)")  # fmt: skip

            # Full, for three lease TTLs: the stateless agent answers, every shard stays held,
            # and a new durable write is still refused (not timed out).
            ttl = node.config.lease_ttl
            until = time.monotonic() + 3 * ttl
            n = 0
            while time.monotonic() < until:
                assert await node.ask("fd_echo/e", Ping(f"p{n}"), returns=str, timeout=2) == f"p{n}"
                assert len(node.held_shards()) == shards, "a shard was lost while the store is full"
                n += 1
                await asyncio.sleep(0.05)
            with pytest.raises(accord.StorageFull):
                await node.ask(_counter(i + 1000), Bump(PAD), returns=int, timeout=10)

            # Another user fills the rest of the server's store: its own writes and accord's get
            # StorageFull, while leases and membership (memory storage) carry on.
            await probe.ensure_stream(
                StreamSpec(name=f"{cluster}_filler", subjects=(f"{cluster}.filler",))
            )
            filled = 0
            with pytest.raises(accord.StorageFull):
                while filled < 20_000:
                    await probe.append(f"{cluster}.filler", PAD.encode() * 4)
                    filled += 1
            until = time.monotonic() + 3 * ttl
            while time.monotonic() < until:
                assert await node.ask("fd_echo/e", Ping(f"p{n}"), returns=str, timeout=2) == f"p{n}"
                assert len(node.held_shards()) == shards, "a shard was lost: the server is full"
                n += 1
                await asyncio.sleep(0.05)
            with pytest.raises(accord.StorageFull):
                await node.ask(_counter(i + 1001), Bump(PAD), returns=int, timeout=10)
            await probe.purge(f"{cluster}_filler")
            print(f"full-disk: the server's store filled after {filled} more 4 KiB appends")

            # No acknowledged write is lost: each acknowledged counter's record holds its bump.
            for k in acked:
                record, _ = await store.load(AgentId.parse(_counter(k)))
                assert record is not None, f"{_counter(k)} was acknowledged but has no state"
                assert msgspec.msgpack.decode(record.state, type=Tally).n == 1, _counter(k)

            # Deleting state frees space: new durable writes succeed again.
            freed = acked[: len(acked) // 2]
            for k in freed:
                await node.delete_state(_counter(k))
            fresh = [i + 2000 + k for k in range(20)]

            async def writes_resume() -> bool:
                try:
                    await node.ask(_counter(fresh[0]), Bump(PAD), returns=int, timeout=10)
                except accord.StorageFull:
                    return False
                return True

            await eventually_async(
                writes_resume, 30, "a durable write to succeed after delete_state"
            )
            for k in fresh[1:]:
                assert await node.ask(_counter(k), Bump(PAD), returns=int, timeout=10) == 1
            # A deleted counter starts over; a kept one still has its acknowledged count.
            assert await node.ask(_counter(freed[0]), Read(), returns=int, timeout=10) == 0
            kept = acked[-1]
            assert await node.ask(_counter(kept), Read(), returns=int, timeout=10) == 1
            assert len(node.held_shards()) == shards
        finally:
            await probe.close()
            await node.stop()
            await asyncio.to_thread(server.stop)


async def test_memory_buckets_lost_with_a_server_restart_come_back_above_old_epochs() -> None:
    """Leases live on memory storage: a restart of the (single) server loses them. The node
    re-creates the bucket with revisions above every earlier one, so its new shard epochs fence
    correctly against the epochs recorded in state (an exactly-once agent keeps counting)."""
    server = accord.EmbeddedServer()
    url = await asyncio.to_thread(server.start)
    cluster = f"fr{uuid.uuid4().hex[:8]}"
    node = accord.Node([FdCounter, FdEcho], nats=url, name="fr-node",
                       settings=accord.NodeSettings(cluster=cluster, num_shards=4))  # fmt: skip
    try:
        await node.start()

        async def all_held() -> bool:
            return len(node.held_shards()) == node.config.num_shards

        await eventually_async(all_held, 20, "every shard held")
        assert await node.ask(_counter(1), Bump(), returns=int, timeout=10) == 1
        before = node.held_shards()

        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.to_thread(server.wait)
        await asyncio.to_thread(server.start)

        async def taken_again() -> bool:
            held = node.held_shards()
            return len(held) == len(before) and min(held.values()) > max(before.values())

        await eventually_async(
            taken_again, 30, "every shard held again, at epochs above the old ones"
        )

        async def counted() -> bool:
            try:
                return await node.ask(_counter(1), Bump(), returns=int, timeout=2) == 2
            except (accord.DeliveryTimeout, accord.NotConnected, accord.OutcomeUnknown):
                return False

        await eventually_async(counted, 30, "the counter to take its second bump (not fenced)")
        assert await node.ask(_counter(1), Read(), returns=int, timeout=10) == 2
    finally:
        await node.stop()
        await asyncio.to_thread(server.stop)
