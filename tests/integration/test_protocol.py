"""The public wire protocol (docs/protocol.md), exercised without accord on the client side.

A real node hosts `ProtoCounter`; requests are sent by `raw_client.py` (stdlib + nats-py only,
run in a subprocess) and by hand-built msgpack / JSON envelopes on a plain nats-py connection.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.util
import json
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest

import accord
from accord._ids import shard_of

RAW_CLIENT = Path(__file__).with_name("raw_client.py")
AGENT_TYPE = "proto_counter"
TOPIC = "proto_topic"


class Add(msgspec.Struct):
    by: int


class Get(msgspec.Struct):
    pass


class Total(msgspec.Struct):
    agent: str
    value: int


class Shout(msgspec.Struct, tag="shout"):
    """A tagged struct: its wire name is its tag, not its class name."""

    text: str


class ProtoCounter(accord.Agent, type=AGENT_TYPE, topics=(TOPIC,)):
    def __init__(self) -> None:
        self.value = 0

    @accord.handler
    async def add(self, msg: Add) -> Total:
        self.value += msg.by
        return Total(str(self.id), self.value)

    @accord.handler
    async def get(self, msg: Get) -> Total:
        return Total(str(self.id), self.value)

    @accord.handler
    async def shout(self, msg: Shout) -> str:
        return msg.text.upper()


# -- helpers -------------------------------------------------------------------------------------


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_async(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_node(nats_url: str, cluster: str) -> AsyncIterator[accord.Node]:
    settings = accord.NodeSettings(cluster=cluster)
    async with accord.Node([ProtoCounter], nats=nats_url, settings=settings) as node:
        await wait_for(
            lambda: len(node.held_shards()) == node.config.num_shards, "the node to hold all shards"
        )
        yield node


async def run_raw_client(*args: str, timeout: float = 30.0) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(RAW_CLIENT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"raw client exited {proc.returncode}: {err.decode()}"
    reply: dict[str, Any] = json.loads(out)
    return reply


def load_raw_client() -> Any:
    spec = importlib.util.spec_from_file_location("raw_client_under_test", RAW_CLIENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- tests ---------------------------------------------------------------------------------------


def test_raw_client_imports_only_stdlib_and_nats() -> None:
    tree = ast.parse(RAW_CLIENT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add((node.module or "").split(".")[0])
    foreign = {r for r in roots if r not in sys.stdlib_module_names and r != "nats"}
    assert not foreign, f"raw_client.py must use only stdlib + nats, imports {foreign}"


SAMPLE_IDS = ["counter/alice", "proto_counter/k", "a/b/c/d", "x-y/ключ", "z_9/🦀", "t/" + "k" * 512]


@pytest.mark.parametrize("target", SAMPLE_IDS)
def test_documented_shard_function_matches_accord(target: str) -> None:
    raw = load_raw_client()
    for n in (1, 7, 64, 4096):
        assert raw.shard_for(target, n) == shard_of(target, n)
        assert raw.shard_for(target, n) == zlib.crc32(target.encode()) % n
    # the worked example of docs/protocol.md
    assert raw.shard_for("counter/alice", 64) == 36


async def test_cluster_resources_are_as_documented(nats_url: str) -> None:
    async with running_node(nats_url, "proto-res") as node:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            meta = await js.key_value("accord_proto-res_meta")
            config = json.loads((await meta.get("config")).value)
            assert set(config) == {
                "v",
                "num_shards",
                "lease_ttl",
                "created_at",
                "replicas",
                "replicas_auto",
                "data_bytes",
            }
            assert config["v"] == 1
            assert config["num_shards"] == node.config.num_shards == 64
            assert config["lease_ttl"] == node.config.lease_ttl
            for what in ("members", "leases", "subs"):
                await js.key_value(f"accord_proto-res_{what}")  # raises if missing
            info = await js.stream_info("accord_proto-res_events")
            assert info.config.subjects == ["accord.proto-res.events.>"]
            leases = await js.key_value("accord_proto-res_leases")
            assert f"shard.{shard_of('counter/alice', 64)}" in await leases.keys()
            members = await js.key_value("accord_proto-res_members")
            assert f"node.{node.node_name}" in await members.keys()
        finally:
            await nc.close()


async def test_raw_client_json_ask(nats_url: str) -> None:
    cluster = "proto-json"
    async with running_node(nats_url, cluster) as node:
        target = f"{AGENT_TYPE}/alice"
        reply = await run_raw_client(nats_url, cluster, target, "Add", '{"by": 2}')
        shard = shard_of(target, node.config.num_shards)
        assert reply == {
            "v": 1,
            "ok": True,
            "body": {"agent": target, "value": 2},  # nested, not a string
            "epoch": node.held_shards()[shard],
            "node": node.node_name,
        }
        assert isinstance(reply["epoch"], int) and reply["epoch"] > 0

        reply = await run_raw_client(nats_url, cluster, target, "Add", '{"by": 3}')
        assert reply["ok"] is True and reply["body"]["value"] == 5

        # the same agent, seen by the Python API
        total = await node.ask(target, Get())
        assert total == Total(target, 5)

        # a tagged message type travels under its tag; the tag field may be left out of the body
        reply = await run_raw_client(nats_url, cluster, target, "shout", '{"text": "hi"}')
        assert reply["ok"] is True and reply["body"] == "HI"
        assert node.stats.rejected == 0


async def test_raw_client_error_replies(nats_url: str) -> None:
    cluster = "proto-err"
    async with running_node(nats_url, cluster) as node:
        target = f"{AGENT_TYPE}/bob"
        cases = [
            (target, "NoSuchMessage", "{}", "unknown_message_type"),
            ("nosuch_agent/bob", "Add", '{"by": 1}', "agent_type_not_found"),
            (target, "Add", '{"by": "two"}', "bad_request"),
            (target, "Add", "{}", "bad_request"),  # a required field is missing
            (target, "Shout", '{"text": "hi"}', "unknown_message_type"),  # tagged: use the tag
        ]
        for i, (tgt, typ, body, code) in enumerate(cases, start=1):
            reply = await run_raw_client(nats_url, cluster, tgt, typ, body)
            assert reply["v"] == 1
            assert reply["ok"] is False
            assert reply["error"]["code"] == code, reply
            assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
            assert "body" not in reply and "epoch" not in reply  # error replies carry neither
            assert node.stats.rejected == i
        # nothing of the above was delivered to the agent
        assert await node.ask(target, Get()) == Total(target, 0)


async def test_msgpack_raw_ask(nats_url: str) -> None:
    cluster = "proto-mp"
    async with running_node(nats_url, cluster) as node:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(f"accord_{cluster}_meta")
            num_shards = json.loads((await kv.get("config")).value)["num_shards"]
            target = f"{AGENT_TYPE}/carol"
            subject = f"accord.{cluster}.shard.{zlib.crc32(target.encode()) % num_shards}"
            envelope = {
                "v": 1,
                "kind": "ask",
                "target": target,
                "type": "Add",
                "body": {"by": 7},  # a nested msgpack map
                "timeout_ms": 5000,
                "id": "req-1",
                "sender": "msgpack-test",
            }
            msg = await nc.request(subject, msgspec.msgpack.encode(envelope), timeout=5)
            assert msg.data[:1] != b"{"  # answered in msgpack, the request's encoding
            reply = msgspec.msgpack.decode(msg.data)
            assert reply == {
                "v": 1,
                "ok": True,
                "body": {"agent": target, "value": 7},
                "epoch": node.held_shards()[shard_of(target, num_shards)],
                "node": node.node_name,
            }

            # an error reply to a msgpack request is msgpack too
            envelope["type"] = "Nope"
            msg = await nc.request(subject, msgspec.msgpack.encode(envelope), timeout=5)
            reply = msgspec.msgpack.decode(msg.data)
            assert reply["ok"] is False
            assert reply["error"]["code"] == "unknown_message_type"
            assert node.stats.rejected == 1
        finally:
            await nc.close()


async def test_raw_tell_and_topic_publish(nats_url: str) -> None:
    cluster = "proto-tell"
    async with running_node(nats_url, cluster) as node:
        nc = await nats.connect(nats_url)
        try:
            target = f"{AGENT_TYPE}/dave"
            subject = f"accord.{cluster}.shard.{shard_of(target, node.config.num_shards)}"
            tell = {"v": 1, "kind": "tell", "target": target, "type": "Add", "body": {"by": 4}}
            await nc.publish(subject, json.dumps(tell).encode())

            async def value_is(expected: int) -> bool:
                total = await node.ask(target, Get())
                return bool(total.value == expected)

            await wait_for_async(lambda: value_is(4), "the tell to be handled")

            # a topic publish: every subs-bucket key `<topic>.<agent_type>` gets a tell to
            # `<agent_type>/<source>`
            subs = await nc.jetstream().key_value(f"accord_{cluster}_subs")
            keys = [k for k in await subs.keys() if k.startswith(f"{TOPIC}.")]
            assert keys == [f"{TOPIC}.{AGENT_TYPE}"]
            for key in keys:
                agent_type = key.partition(".")[2]
                tgt = f"{agent_type}/dave"
                envelope = {"v": 1, "kind": "tell", "target": tgt, "type": "Add", "body": {"by": 1}}
                subj = f"accord.{cluster}.shard.{shard_of(tgt, node.config.num_shards)}"
                await nc.publish(subj, msgspec.msgpack.encode(envelope))
            await wait_for_async(lambda: value_is(5), "the topic message to be handled")

            # a tell never replies, even when it has a reply subject
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, json.dumps(tell).encode(), timeout=0.5)
            await wait_for_async(lambda: value_is(9), "the requested tell to be handled")
            assert node.stats.rejected == 0
        finally:
            await nc.close()


async def test_no_responders_when_the_shard_has_no_owner(nats_url: str) -> None:
    cluster = "proto-gone"
    async with running_node(nats_url, cluster):
        pass  # a graceful stop releases every shard
    nc = await nats.connect(nats_url)
    try:
        envelope = {"v": 1, "kind": "ask", "target": f"{AGENT_TYPE}/x", "type": "Get", "body": {}}
        subject = f"accord.{cluster}.shard.{shard_of(f'{AGENT_TYPE}/x', 64)}"
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(subject, json.dumps(envelope).encode(), timeout=2)
    finally:
        await nc.close()
    # the raw client retries "no responders" until its deadline, then gives up (exit status 2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(RAW_CLIENT),
        nats_url,
        cluster,
        f"{AGENT_TYPE}/x",
        "Get",
        "{}",
        "--timeout",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and out == b""
