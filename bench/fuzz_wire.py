"""Wire fuzzing: random and mutated envelopes on every subject a node listens on.

Two `accord node` processes host counter agents; for `--seconds` (default 60) a raw nats-py
client sends, from 32 concurrent workers, random bytes, valid envelopes with bytes flipped,
inserted, removed or cut, and well-formed envelopes with hostile fields (unknown types, wrong
bodies, absurd timeouts, kind "result", huge or odd targets) to the shard subjects, the standby
subjects, the mailbox stream (JetStream publish) and the admin subject.

    python bench/fuzz_wire.py [--seconds 60] [--seed 1] [--json]

Reports messages sent per subject kind, replies (ok / error), no answers, node crashes (must
be 0) and whether every agent asked before the storm still answers, with its count intact.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from _common import COUNTER_APP, emit, environment, parser, run

from accord import _codec as codec
from accord.testing import Cluster, wait_for_placement

WORKERS = 32
AGENTS = 32
NODES = {"node-1", "node-2"}
LOG_DIR = Path(tempfile.gettempdir()) / "accord-fuzz-wire-logs"  # node logs, for a crash


def _seeds() -> list[bytes]:
    """Valid envelopes to mutate, and well-formed ones with hostile fields."""
    out: list[bytes] = []
    for enc in ("msgpack", "json"):
        body = codec.encode({"by": 1}, enc)  # type: ignore[arg-type]
        for fields in (
            {"v": 1, "kind": "ask", "target": "counter/fz1", "type": "Increment"},
            {"v": 1, "kind": "tell", "target": "counter/fz2", "type": "Increment"},
            {"v": 1, "kind": "ask", "target": "counter/fz3", "type": "Get", "timeout_ms": 1},
            {"v": 1, "kind": "result", "target": "counter/fz4", "type": "Increment", "id": "x"},
            {"v": 1, "kind": "ask", "target": "nosuch/a", "type": "Increment"},
            {"v": 1, "kind": "ask", "target": "counter/fz5", "type": "Nope"},
            {"v": 1, "kind": "ask", "target": "counter", "type": "Increment"},
            {"v": 1, "kind": "ask", "target": "counter/" + "é" * 300, "type": "Get"},
            {"v": 1, "kind": "ask", "target": "counter/fz6", "type": "Increment",
             "timeout_ms": 2**62, "delivery": "exactly_once", "id": "i" * 200},
            {"v": 1, "kind": "ask", "target": "counter/fz7", "type": "Increment",
             "timeout_ms": -5, "reply_to": "_INBOX.nobody"},
            {"v": 2, "kind": "ask", "target": "counter/fz8", "type": "Increment"},
        ):  # fmt: skip
            with_body = {**fields, "body": msgspec.Raw(body)}
            out.append(codec.encode(with_body, enc))  # type: ignore[arg-type]
            out.append(codec.encode(fields, enc))  # type: ignore[arg-type]
        bad_body = {"v": 1, "kind": "ask", "target": "counter/fz9", "type": "Increment",
                    "body": msgspec.Raw(codec.encode({"by": "lots"}, enc))}  # type: ignore[arg-type]  # fmt: skip
        out.append(codec.encode(bad_body, enc))  # type: ignore[arg-type]
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        i = rng.randrange(len(buf)) if buf else 0
        if op < 0.4 and buf:
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            buf.insert(i, rng.randrange(256))
        elif op < 0.8 and buf:
            del buf[i]
        else:
            buf = buf[:i]
    return bytes(buf)


def _payload(rng: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.25:
        return "random", rng.randbytes(rng.randrange(0, 512))
    if r < 0.65:
        return "mutated", _mutate(rng, rng.choice(seeds))
    return "hostile", rng.choice(seeds)


async def storm(url: str, num_shards: int, seconds: float, seed: int) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-fuzz")
    js = nc.jetstream()
    seeds = _seeds()
    sent: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            where = rng.choice(["shard", "shard", "standby", "mailbox", "admin"])
            kind, data = _payload(rng, seeds)
            kinds[kind] += 1
            sent[where] += 1
            shard = rng.randrange(num_shards)
            try:
                if where == "mailbox":
                    await js.publish(f"accord.default.mbox.{shard}", data, timeout=2,
                                     headers={"Nats-Msg-Id": uuid.uuid4().hex})  # fmt: skip
                    outcome["mailbox stored"] += 1
                    continue
                subject = (f"accord.default.{where}.{shard}" if where != "admin"
                           else "accord.default.admin.status")  # fmt: skip
                msg = await nc.request(subject, data, timeout=0.5)
            except nats.errors.NoRespondersError:
                outcome["no responders"] += 1
                continue
            except (nats.errors.TimeoutError, TimeoutError):
                outcome["no answer"] += 1
                continue
            except Exception as exc:  # a JetStream refusal (e.g. over a limit): counted
                outcome[f"refused: {type(exc).__name__}"] += 1
                continue
            try:
                reply, _ = codec.decode_reply(msg.data)
                outcome["ok replies" if reply.ok else "error replies"] += 1
            except Exception:
                outcome["other replies"] += 1  # admin status answers with its own JSON

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    await nc.close()
    return {"sent": dict(sent), "payloads": dict(kinds), "outcomes": dict(outcome),
            "total_sent": sum(sent.values())}  # fmt: skip


async def main(seconds: float, seed: int) -> dict[str, Any]:
    with Cluster(str(COUNTER_APP), 2, log_dir=LOG_DIR) as cluster:
        async with cluster.connect() as mesh:
            st = await wait_for_placement(mesh, NODES, timeout=60)
            ids = [f"counter/fuzz-{i}" for i in range(AGENTS)]
            for aid in ids:
                await mesh.ask_json(aid, "Increment", b'{"by": 1}', timeout=30)
            crashes: list[str] = []

            async def watch() -> None:
                while True:
                    for name, node in cluster.nodes.items():
                        if not node.alive() and name not in crashes:
                            crashes.append(name)
                    await asyncio.sleep(0.5)

            watcher = asyncio.ensure_future(watch())
            try:
                result = await storm(cluster.url, st["num_shards"], seconds, seed)
            finally:
                watcher.cancel()
            answering = 0
            intact = 0
            for aid in ids:
                try:
                    got = await mesh.ask_json(aid, "Get", b"{}", timeout=30)
                except Exception:
                    continue
                answering += 1
                intact += got["value"] >= 1
        result.update(seconds=seconds, seed=seed, node_crashes=len(crashes),
                      crashed=crashes, agents=AGENTS, agents_answering=answering,
                      agents_with_state=intact)  # fmt: skip
        return result


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    result, loop_name = run(lambda: main(args.seconds, args.seed), args.uvloop)
    result["environment"] = environment(loop_name)
    out = result["outcomes"]
    lines = [
        f"fuzz_wire: {result['total_sent']} messages in {args.seconds:.0f} s "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result['sent'].items()))})",
        f"  payloads: {', '.join(f'{k} {v}' for k, v in sorted(result['payloads'].items()))}",
        f"  outcomes: {', '.join(f'{k} {v}' for k, v in sorted(out.items()))}",
        f"  node crashes: {result['node_crashes']} (must be 0)",
        f"  agents answering afterwards: {result['agents_answering']}/{result['agents']}, "
        f"state intact: {result['agents_with_state']}/{result['agents']}",
    ]
    emit(result, args.json, lines)
    if result["node_crashes"] or result["agents_answering"] != result["agents"]:
        raise SystemExit(1)
