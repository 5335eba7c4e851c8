"""A bus consumer process for the chaos tests: `python bus_worker.py MODE URL TOPIC GROUP LOG`.

`record`: each handled event appends `<key> <n> <pid>` to LOG (one O_APPEND write per line, before
the handler returns, so a handled-then-acknowledged event is always in the file, even after a
SIGKILL). `route`: routes the topic to the `ledger` agents of the cluster on $ACCORD_NATS. The
process writes `ready` to LOG.ready once it consumes, and runs until killed or SIGTERMed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import msgspec

import accord


class Step(msgspec.Struct):
    n: int


async def main(mode: str, url: str, topic: str, group: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    async def record(msg: Step, d: accord.bus.Delivery) -> None:
        await asyncio.sleep(0.001)  # a little work, so kills land mid-stream
        os.write(fd, f"{d.key} {msg.n} {pid}\n".encode())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with accord.bus.connect(url, partitions=6, nats=os.environ.get("ACCORD_NATS")) as bus:
        while True:  # the store may be restarting when we come up
            try:
                if mode == "record":
                    sub = await bus.subscribe(topic, group=group, handler=record, min_idle=2)
                else:
                    sub = await bus.route(topic, group=group, agent_type="ledger", min_idle=2)
                break
            except accord.AccordError:
                await asyncio.sleep(0.5)
        os.write(
            fd_ready := os.open(log + ".ready", os.O_WRONLY | os.O_APPEND | os.O_CREAT),
            f"{pid}\n".encode(),
        )
        os.close(fd_ready)
        await stop.wait()
        await sub.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
