"""Diagnostic: nats-server CPU per mailbox message against the number of shard consumers that
traffic is spread over.

    python bench/diag_mailbox.py [--n 20000] [--json]

One embedded nats-server, accord's mailbox stream, and `ShardMailbox` consumers (the node's pull
loop, acking each message on dispatch) in this process; 64 concurrent `js.publish` calls with
`Nats-Msg-Id` spread over 50 agent subjects that fall on `subjects` shard subjects. Reports
nats-server CPU µs per message for each (consumers, subjects) case and the ratio against one
consumer. Explains where accord's server-side cost in `bench/durable.py` part 1 comes from: the
raw baseline there has one consumer, accord one per shard that holds traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import nats
from _common import cpu_seconds, emit, environment, parser, ratio, run

from accord.cluster._config import Names
from accord.delivery._mailbox import ShardMailbox, ensure_streams, mailbox_subject
from accord.engine._nats import NatsTransport
from accord.engine._server import EmbeddedServer

CASES = [(1, 1), (40, 1), (40, 4), (40, 40)]  # (consumers, shard subjects carrying traffic)
_names = itertools.count(1)


async def one_case(url: str, server_pid: int, consumers: int, subjects: int, n: int) -> dict:
    nc = await nats.connect(url)
    pub = await nats.connect(url)
    js, pjs = NatsTransport(nc, "diag-consumers"), pub.jetstream()
    names = Names(f"diag{next(_names)}")
    await ensure_streams(js, names, 1)
    got = 0
    done = asyncio.Event()

    def dispatch(shard: int, epoch: int, msg: Any) -> bool:
        nonlocal got
        got += 1
        asyncio.get_running_loop().create_task(msg.ack())
        if got == n:
            done.set()
        return True

    async def capacity() -> None:
        return None

    mailboxes = [
        ShardMailbox(js, names, s, 1, dispatch, capacity, lambda: True) for s in range(consumers)
    ]
    for m in mailboxes:
        await m.start()
    targets = [mailbox_subject(names, a % subjects) for a in range(50)]
    it = iter(range(n))

    async def sender() -> None:
        for i in it:
            await pjs.publish(targets[i % 50], b"x" * 109, headers={"Nats-Msg-Id": str(i)})

    try:
        cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(64)))
        await asyncio.wait_for(done.wait(), 120)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server_pid) - cpu0
    finally:
        for m in mailboxes:
            await m.stop()
        await nc.close()
        await pub.close()
    return {
        "consumers": consumers,
        "subjects": subjects,
        "msgs_s": n / elapsed,
        "server_cpu_us_per_msg": round(cpu / n * 1e6, 1),
    }


async def bench(args: Any) -> dict[str, Any]:
    server = EmbeddedServer()
    url = server.start()
    try:
        assert server.pid is not None
        cases = [await one_case(url, server.pid, c, s, args.n) for c, s in CASES]
    finally:
        server.stop()
    base = cases[0]["server_cpu_us_per_msg"]
    for c in cases:
        c["server_cpu_ratio"] = ratio(c["server_cpu_us_per_msg"], base)
    return {"benchmark": "diag_mailbox", "cases": cases, "params": {"n": args.n}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="messages per case")
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    lines = [f"diag_mailbox  ({args.n} msgs per case, 64 publishers, ack on dispatch)"]
    for c in res["cases"]:
        lines.append(
            f"  {c['consumers']:3d} consumers, traffic on {c['subjects']:2d} subjects: "
            f"{c['msgs_s']:8.0f} msgs/s  server {c['server_cpu_us_per_msg']:5.1f} us/msg "
            f"(x{c['server_cpu_ratio']:.2f} of one consumer)"
        )
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
