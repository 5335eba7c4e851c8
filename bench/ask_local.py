"""In-process ask/tell: an `accord.Node` asking and telling agents it owns itself (no network hop).

Baseline, same run, same event loop: a bare asyncio "actor" runtime — one task per agent consuming
an asyncio.Queue of (msg, future) and awaiting the very same Counter handler; ask = put + await the
future, tell = put only (drained at the end). Accord and raw blocks are interleaved in rounds.

    python bench/ask_local.py [--uvloop] [--json]

Modes: ask_seq (one agent, one at a time; also p50/p99), ask_conc (64 in flight over many agents),
tell_seq (one agent), tell_conc (round-robin over many agents). Ratio accord/raw per mode,
target >= 0.3.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    emit,
    environment,
    load_counter_app,
    median,
    parser,
    percentile,
    ratio,
    run,
    verdict,
)

import accord
from accord import AgentId, EmbeddedServer, Node
from accord.testing import wait_for_placement

MODES = ("ask_seq", "ask_conc", "tell_seq", "tell_conc")
TARGET = 0.3


class RawActor:
    """One agent of the baseline: a queue and a task, running the same handlers as accord."""

    def __init__(self, agent: Any, handlers: dict[type, Any]) -> None:
        self.agent = agent
        self.handlers = handlers
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[Any] | None]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg, fut = await self.queue.get()
            try:
                result = await self.handlers[type(msg)](self.agent, msg)
            except Exception as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                continue
            if fut is not None and not fut.done():
                fut.set_result(result)


class RawRuntime:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.handlers = {app.Increment: app.Counter.increment, app.Get: app.Counter.get}
        self.actors: dict[str, RawActor] = {}
        self.loop = asyncio.get_running_loop()

    def _actor(self, target: str) -> RawActor:
        actor = self.actors.get(target)
        if actor is None:
            agent = self.app.Counter()
            agent.id = AgentId.parse(target)
            actor = self.actors[target] = RawActor(agent, self.handlers)
        return actor

    async def ask(self, target: str, msg: Any) -> Any:
        fut = self.loop.create_future()
        self._actor(target).queue.put_nowait((msg, fut))
        return await fut

    async def tell(self, target: str, msg: Any) -> None:
        self._actor(target).queue.put_nowait((msg, None))

    async def close(self) -> None:
        for actor in self.actors.values():
            actor.task.cancel()
        await asyncio.gather(*(a.task for a in self.actors.values()), return_exceptions=True)


async def ask_seq(sys_: Any, inc: Any, n: int) -> tuple[float, list[float]]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        await sys_.ask("counter/x", inc)
        lat.append(time.perf_counter() - t)
    return n / (time.perf_counter() - t0), lat


async def ask_conc(sys_: Any, inc: Any, agents: list[str], n: int, inflight: int) -> float:
    per = n // inflight

    async def worker(w: int) -> None:
        for j in range(per):
            await sys_.ask(agents[(w + j * inflight) % len(agents)], inc)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return per * inflight / (time.perf_counter() - t0)


async def tell_seq(sys_: Any, app: Any, n: int) -> float:
    inc = app.Increment(1)
    before = (await sys_.ask("counter/t", app.Get())).value
    t0 = time.perf_counter()
    for _ in range(n):
        await sys_.tell("counter/t", inc)
    after = (await sys_.ask("counter/t", app.Get())).value  # FIFO mailbox: drains the tells
    elapsed = time.perf_counter() - t0
    assert after - before == n, f"{type(sys_).__name__}: {after - before} of {n} tells handled"
    return n / elapsed


async def tell_conc(sys_: Any, app: Any, agents: list[str], n: int) -> float:
    inc = app.Increment(1)
    get = app.Get()
    t0 = time.perf_counter()
    for i in range(n):
        await sys_.tell(agents[i % len(agents)], inc)
    await asyncio.gather(*(sys_.ask(a, get) for a in agents))  # drain every mailbox
    return n / (time.perf_counter() - t0)


async def bench(args: Any) -> dict[str, Any]:
    app = load_counter_app()
    inc = app.Increment(1)
    agents = [f"counter/l{k}" for k in range(args.agents)]
    server = EmbeddedServer()
    url = await asyncio.to_thread(server.start)
    try:
        settings = accord.NodeSettings(cluster="benchlocal")
        async with Node([app.Counter], nats=url, name="bench-local", settings=settings) as node:
            await wait_for_placement(node, {"bench-local"}, timeout=30)
            raw = RawRuntime(app)
            try:
                systems: dict[str, Any] = {"accord": node, "raw": raw}
                blocks: dict[str, Callable[[Any], Awaitable[Any]]] = {
                    "ask_seq": lambda s: ask_seq(s, inc, args.n_seq),
                    "ask_conc": lambda s: ask_conc(s, inc, agents, args.n_conc, args.inflight),
                    "tell_seq": lambda s: tell_seq(s, app, args.n_tell),
                    "tell_conc": lambda s: tell_conc(s, app, agents, args.n_tell),
                }
                # warm-up: create every activation / actor, warm every path
                for s in systems.values():
                    await asyncio.gather(*(s.ask(a, inc) for a in agents))
                    await ask_seq(s, inc, 500)
                    await ask_conc(s, inc, agents, 5000, args.inflight)
                    await tell_seq(s, app, 2000)
                    await tell_conc(s, app, agents, 5000)
                rates: dict[str, dict[str, list[float]]] = {
                    name: {m: [] for m in MODES} for name in systems
                }
                lat: dict[str, list[float]] = {name: [] for name in systems}
                for r in range(args.rounds):
                    order = list(systems) if r % 2 == 0 else list(reversed(systems))
                    for mode in MODES:
                        for name in order:
                            out = await blocks[mode](systems[name])
                            if mode == "ask_seq":
                                out, samples = out
                                lat[name] += samples
                            rates[name][mode].append(out)
            finally:
                await raw.close()
    finally:
        await asyncio.to_thread(server.stop)

    res: dict[str, Any] = {"benchmark": "ask_local"}
    for name in ("accord", "raw"):
        res[name] = {f"{m}_ops_s": median(rates[name][m]) for m in MODES}
        res[name]["ask_seq_p50_us"] = percentile(lat[name], 50) * 1e6
        res[name]["ask_seq_p99_us"] = percentile(lat[name], 99) * 1e6
        res[name]["rounds_ops_s"] = {m: [round(x) for x in rates[name][m]] for m in MODES}
    res["ratios"] = {m: ratio(res["accord"][f"{m}_ops_s"], res["raw"][f"{m}_ops_s"]) for m in MODES}
    res["min_ratio"] = min(res["ratios"].values())
    res["target_met"] = res["min_ratio"] >= TARGET
    res["params"] = {
        "rounds": args.rounds,
        "n_seq": args.n_seq,
        "n_conc": args.n_conc,
        "n_tell": args.n_tell,
        "inflight": args.inflight,
        "agents": args.agents,
    }
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--n-seq", type=int, default=5000, help="sequential asks per block")
    p.add_argument("--n-conc", type=int, default=30000, help="concurrent asks per block")
    p.add_argument("--n-tell", type=int, default=30000, help="tells per block")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--agents", type=int, default=1000)
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    a, r = res["accord"], res["raw"]
    lines = [f"ask_local  (loop: {loop_name}; in-process node vs asyncio queue+task actors)"]
    lines.append(f"  {'mode':<10} {'accord ops/s':>13} {'raw ops/s':>12} {'ratio':>6}")
    for m in MODES:
        lines.append(
            f"  {m:<10} {a[f'{m}_ops_s']:13.0f} {r[f'{m}_ops_s']:12.0f} "
            f"{res['ratios'][m]:6.2f}  {verdict(res['ratios'][m], TARGET, True)}"
        )
    lines.append(
        f"  ask_seq latency  accord p50 {a['ask_seq_p50_us']:.1f} us p99 {a['ask_seq_p99_us']:.1f}"
        f" us | raw p50 {r['ask_seq_p50_us']:.1f} us p99 {r['ask_seq_p99_us']:.1f} us"
    )
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
