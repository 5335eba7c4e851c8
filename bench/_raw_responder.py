"""Baseline responder for bench/ask_remote.py: a bare nats-py process that answers every request.

It subscribes to one subject, decodes nothing and replies with a small fixed payload. It runs on
the loop an `accord node` process would ($ACCORD_LOOP: asyncio unless set to uvloop), so the
comparison is process for process.
With --fanout N it also subscribes to `<subject>.0` .. `<subject>.N-1` (one nats-py subscription,
hence one dispatch task, each), the shape of a node's per-shard subscriptions.
Prints `ready` once subscribed; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import nats

from accord._loops import loop_factory, loop_name

# About the size of an accord reply envelope carrying a Count.
PAYLOAD = b"\x85\xa1v\x01\xa2ok\xc3\xa4body" + b"x" * 48


async def main(url: str, subject: str, fanout: int) -> None:
    nc = await nats.connect(url, name="bench-raw-responder")

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, PAYLOAD)

    await nc.subscribe(subject, cb=on_msg)
    for i in range(fanout):  # optional: one subscription per subject, like a node's per-shard subs
        await nc.subscribe(f"{subject}.{i}", cb=on_msg)
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nats", required=True)
    p.add_argument("--subject", default="bench.raw")
    p.add_argument("--fanout", type=int, default=0, help="also subscribe to <subject>.0..N-1")
    a = p.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(loop_name())) as runner:
        runner.run(main(a.nats, a.subject, a.fanout))
