"""A minimal accord client that speaks only the public wire protocol (docs/protocol.md).

It deliberately imports nothing from accord — only the standard library and nats-py — so it shows
(and the integration tests check) what a client in another language has to do:

1. read the cluster configuration from the KV bucket `accord_<cluster>_meta`, key `config`;
2. compute the agent's shard: crc32(utf8("type/key")) mod num_shards;
3. send a JSON request envelope to `accord.<cluster>.shard.<n>`, retrying on "no responders"
   (the shard has no owner right now; nothing was delivered) until the deadline;
4. print the JSON reply envelope.

Usage: python raw_client.py URL CLUSTER TARGET TYPE BODY_JSON [--timeout SECONDS]

Prints the reply envelope as one line of JSON and exits 0 whenever a reply arrived (check its
`ok` field); exits 2 if the deadline passed without a reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from typing import Any

import nats
import nats.errors

PROTOCOL_VERSION = 1


def shard_for(target: str, num_shards: int) -> int:
    """The shard of agent `type/key`: CRC-32 (IEEE) of its UTF-8 bytes, modulo the shard count."""
    return zlib.crc32(target.encode("utf-8")) % num_shards


async def read_config(nc: Any, cluster: str) -> dict[str, Any]:
    kv = await nc.jetstream().key_value(f"accord_{cluster}_meta")
    entry = await kv.get("config")
    config: dict[str, Any] = json.loads(entry.value)
    return config


async def ask(
    url: str, cluster: str, target: str, msg_type: str, body: Any, timeout: float
) -> dict[str, Any] | None:
    """Send one JSON ask; return the decoded reply envelope, or None if the deadline passed."""
    nc = await nats.connect(url, connect_timeout=timeout)
    try:
        config = await read_config(nc, cluster)
        subject = f"accord.{cluster}.shard.{shard_for(target, config['num_shards'])}"
        deadline = time.monotonic() + timeout
        backoff = 0.005
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            envelope = {
                "v": PROTOCOL_VERSION,
                "kind": "ask",
                "target": target,
                "type": msg_type,
                "body": body,  # a nested JSON value, not a string
                "timeout_ms": max(1, int(remaining * 1000)),
                "sender": "raw-client",
            }
            data = json.dumps(envelope, separators=(",", ":")).encode()
            try:
                reply = await nc.request(subject, data, timeout=remaining)
            except nats.errors.NoRespondersError:
                # Nobody owns the shard right now and nothing was delivered: safe to retry.
                await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
                backoff = min(backoff * 2, 0.1)
                continue
            except nats.errors.TimeoutError:
                return None  # sent, but no reply: the outcome is unknown
            result: dict[str, Any] = json.loads(reply.data)
            return result
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="NATS URL, e.g. nats://127.0.0.1:4222")
    p.add_argument("cluster", help="accord cluster name")
    p.add_argument("target", help="agent id 'type/key'")
    p.add_argument("type", help="message type name (the handler's message class name or tag)")
    p.add_argument("body", help="message body as JSON, e.g. '{\"by\": 2}'")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    args = p.parse_args(argv)
    reply = asyncio.run(
        ask(args.url, args.cluster, args.target, args.type, json.loads(args.body), args.timeout)
    )
    if reply is None:
        print("no reply within the deadline", file=sys.stderr)
        return 2
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
