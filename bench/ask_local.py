"""In-process ask/tell: an `accord.Node` asking and telling agents it owns itself (no network hop).

Baseline, same run, same event loop: a bare asyncio "actor" runtime — one task per agent consuming
an asyncio.Queue of (msg, future) and awaiting the very same Counter handler; ask = put + await the
future, tell = put only (drained at the end). Accord and raw blocks are interleaved in rounds.

    python bench/ask_local.py [--uvloop] [--json]

Modes: ask_seq (one agent, one at a time; also p50/p99), ask_conc (64 in flight over many agents),
tell_seq (one agent), tell_conc (round-robin over many agents). Ratio accord/raw per mode,
target >= 0.3.

`agent_ask` (also run by default, reported apart, no target): the co-location workload's inner
ask (bench/colocation.py) inside one process: `--pairs` (100: one node's third of the 300) pairs
at once, each `pinger/i`'s turn asking `ponger/i` `--inner` times (examples/placement_app.py,
the same handlers on both sides), one client ask in flight per pinger. Reported as CPU µs of
this process per inner ask (`time.process_time`, best round), the figure co-location's
throughput follows on busy cores, and as inner asks/s.

    python bench/ask_local.py --only agent_ask [--agent-asks 20000]   # that mode alone, ~10 s
    python bench/ask_local.py --profile 200000   # cProfile of accord's agent_ask, top 30 (tottime)
    python bench/ask_local.py --sampling [--rounds 15]   # + the graph sampling's overhead

`--sampling` times the communication graph's two hooks in this node directly (best of 7 x
100,000 calls, inside a turn's context): what one sampled agent->agent message adds (the
route's `observe` and the per-turn load count) and what one turn adds (the load count: a client
ask's only cost). Reported against accord's CPU per inner `agent_ask` and per sequential ask
(`ask_seq`), both in this process: the sampling overhead (issue 16: <= 3 %; a remote ask costs
several times an in-process one, so its share is smaller still). A second node with sampling
off, in the same rounds, was tried: the two nodes differed by more than 3 % with sampling on in
both (an A/A), so that A/B could not resolve the figure.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    ROOT,
    emit,
    environment,
    load_app,
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
from accord._context import current_sender
from accord.testing import wait_for_placement

MODES = ("ask_seq", "ask_conc", "tell_seq", "tell_conc")
TARGET = 0.3
PLACEMENT_APP = ROOT / "examples" / "placement_app.py"
FAILED = [0]  # agent_ask's client asks that failed (reported: their inner asks are not counted)


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
    """The baseline's agents by type: (class, handlers by message type), the same as accord's."""

    def __init__(self, app: Any, pairs: Any) -> None:
        self.types: dict[str, tuple[type, dict[type, Any]]] = {
            "counter": (app.Counter, {app.Increment: app.Counter.increment,
                                      app.Get: app.Counter.get}),
            "pinger": (pairs.Pinger, {pairs.Ping: pairs.Pinger.ping}),
            "ponger": (pairs.Ponger, {pairs.Ping: pairs.Ponger.ping}),
        }  # fmt: skip
        self.actors: dict[str, RawActor] = {}
        self.loop = asyncio.get_running_loop()

    def _actor(self, target: str) -> RawActor:
        actor = self.actors.get(target)
        if actor is None:
            agent_id = AgentId.parse(target)
            cls, handlers = self.types[agent_id.type]
            agent = cls()
            agent.id = agent_id
            agent.mesh = self  # the pinger asks its ponger through this runtime
            actor = self.actors[target] = RawActor(agent, handlers)
        return actor

    async def ask(self, target: str, msg: Any, **options: Any) -> Any:
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


async def agent_ask(sys_: Any, ping: Any, n: int, pairs: int) -> tuple[float, float]:
    """`n` inner asks, `ping.n` per client ask, by `pairs` pairs at once (one client ask in
    flight per `pinger/i`): (inner asks/s, CPU µs of this process per inner ask)."""
    calls = max(1, n // (ping.n * pairs))

    async def pair(i: int) -> int:
        ok = 0
        for _ in range(calls):
            try:
                await sys_.ask(f"pinger/{i}", ping, timeout=60)
                ok += 1
            except accord.AccordError as exc:  # an overloaded machine: the node lost a lease
                if FAILED[0] < 3:
                    print(f"agent_ask: pinger/{i} failed: {exc!r}", file=sys.stderr)
                FAILED[0] += 1
        return ok

    c0, t0 = time.process_time(), time.perf_counter()
    done = sum(await asyncio.gather(*(pair(i) for i in range(pairs)))) * ping.n
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return done / wall, cpu / max(1, done) * 1e6


async def profile(node: Any, ping: Any, n: int, pairs: int) -> None:
    """cProfile of `n` inner asks of accord's `agent_ask`, printed (top 30 by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    await agent_ask(node, ping, n, pairs)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(30)
    # Calls of the functions run about once per ask or more: the steps of the path, a count
    # that the machine's load does not change (background work runs far less often).
    rows = stats.stats.values()  # type: ignore[attr-defined]
    hot = sum(nc for _, nc, _, _, _ in rows if nc >= n // 4)
    print(f"function calls per inner ask: {hot / n:.1f} (in functions called >= n/4 times)")


def time_hooks(node: Any) -> dict[str, float]:
    """Best of 7 x 100,000 calls of the node's sampling hooks, in a turn's context (the sender
    set): the route's `observe` (graph edge + sender's message count) plus the per-turn load
    count make a sampled message; the load count alone is what any turn adds."""
    col = node._colocation  # the node's communication graph and load (runtime/_colocate.py)
    dest = AgentId("ponger", "hook")
    n = 100_000

    def message() -> None:
        for _ in range(n):
            col.observe(dest, True)
            col.turns.turn_ended("ponger", "ask", "ok", 1e-5)

    def turn() -> None:
        for _ in range(n):
            col.turns.turn_ended("ponger", "ask", "ok", 1e-5)

    ctx = contextvars.copy_context()
    ctx.run(current_sender.set, "pinger/hook")
    out = {}
    for name, fn in (("message", message), ("turn", turn)):
        best = float("inf")
        for _ in range(7):
            t0 = time.process_time()
            ctx.run(fn)
            best = min(best, time.process_time() - t0)
        out[name] = round(best / n * 1e6, 3)
    return out


async def bench(args: Any) -> dict[str, Any]:
    app = load_counter_app()
    pairs = load_app(PLACEMENT_APP)
    ping = pairs.Ping(n=args.inner)
    modes = MODES if args.only is None else ()
    agent_modes = ("agent_ask",) if args.only in (None, "agent_ask") else ()
    inc = app.Increment(1)
    agents = [f"counter/l{k}" for k in range(args.agents)]
    server = EmbeddedServer()
    url = await asyncio.to_thread(server.start)
    try:
        settings = accord.NodeSettings(cluster="benchlocal")
        agent_types = [app.Counter, pairs.Pinger, pairs.Ponger]
        async with Node(agent_types, nats=url, name="bench-local", settings=settings) as node:
            await wait_for_placement(node, {"bench-local"}, timeout=30)
            hooks = time_hooks(node) if args.sampling else {}  # µs per message, per turn
            if args.profile:
                await agent_ask(node, ping, 20_000, args.pairs)  # warm-up
                await profile(node, ping, args.profile, args.pairs)
                return {}
            raw = RawRuntime(app, pairs)
            try:
                systems: dict[str, Any] = {"accord": node, "raw": raw}
                blocks: dict[str, Callable[[Any], Awaitable[Any]]] = {
                    "ask_seq": lambda s: ask_seq(s, inc, args.n_seq),
                    "ask_conc": lambda s: ask_conc(s, inc, agents, args.n_conc, args.inflight),
                    "tell_seq": lambda s: tell_seq(s, app, args.n_tell),
                    "tell_conc": lambda s: tell_conc(s, app, agents, args.n_tell),
                    "agent_ask": lambda s: agent_ask(s, ping, args.agent_asks, args.pairs),
                }
                # warm-up: create every activation / actor, warm every path
                for s in systems.values():
                    if modes:
                        await asyncio.gather(*(s.ask(a, inc) for a in agents))
                        await ask_seq(s, inc, 500)
                        await ask_conc(s, inc, agents, 5000, args.inflight)
                        await tell_seq(s, app, 2000)
                        await tell_conc(s, app, agents, 5000)
                    await agent_ask(s, ping, 5000, args.pairs)
                rates: dict[str, dict[str, list[float]]] = {
                    name: {m: [] for m in (*MODES, "agent_ask")} for name in systems
                }
                lat: dict[str, list[float]] = {name: [] for name in systems}
                cpu: dict[str, list[float]] = {name: [] for name in systems}
                for r in range(args.rounds):
                    order = list(systems) if r % 2 == 0 else list(reversed(systems))
                    for mode in (*modes, *agent_modes):
                        for name in order:
                            out = await blocks[mode](systems[name])
                            if mode == "ask_seq":
                                out, samples = out
                                lat[name] += samples
                            elif mode == "agent_ask":
                                out, us = out
                                cpu[name].append(us)
                            rates[name][mode].append(out)
            finally:
                await raw.close()
    finally:
        await asyncio.to_thread(server.stop)

    res: dict[str, Any] = {"benchmark": "ask_local"}
    ran = (*modes, *agent_modes)
    for name in ("accord", "raw"):
        res[name] = {f"{m}_ops_s": median(rates[name][m]) for m in ran}
        if modes:
            res[name]["ask_seq_p50_us"] = percentile(lat[name], 50) * 1e6
            res[name]["ask_seq_p99_us"] = percentile(lat[name], 99) * 1e6
        if agent_modes:  # the best round: the least disturbed by other users of the cores
            res[name]["agent_ask_cpu_us"] = round(min(cpu[name]), 2)
            res[name]["agent_ask_cpu_us_rounds"] = [round(x, 2) for x in cpu[name]]
        res[name]["rounds_ops_s"] = {m: [round(x) for x in rates[name][m]] for m in ran}
    res["ratios"] = {m: ratio(res["accord"][f"{m}_ops_s"], res["raw"][f"{m}_ops_s"]) for m in ran}
    if agent_modes:  # accord's CPU per inner ask over the baseline's, rounds side by side
        per_round = [a / r for a, r in zip(cpu["accord"], cpu["raw"], strict=True)]
        res["agent_ask_cpu_ratio"] = round(median(per_round), 2)
        res["agent_ask_failed"] = FAILED[0]
    if args.sampling:
        res["sampling_hooks_us"] = hooks
        a = res["accord"]
        if agent_modes:
            res["sampling_overhead_agent_ask"] = round(hooks["message"] / a["agent_ask_cpu_us"], 4)
        if modes:
            res["sampling_overhead_ask_seq"] = round(hooks["turn"] * a["ask_seq_ops_s"] / 1e6, 4)
            res["sampling_overhead_tell_seq"] = round(hooks["turn"] * a["tell_seq_ops_s"] / 1e6, 4)
    if modes:
        res["min_ratio"] = min(res["ratios"][m] for m in modes)
        res["target_met"] = res["min_ratio"] >= TARGET
    res["params"] = {
        "rounds": args.rounds,
        "n_seq": args.n_seq,
        "n_conc": args.n_conc,
        "n_tell": args.n_tell,
        "inflight": args.inflight,
        "agents": args.agents,
        "agent_asks": args.agent_asks,
        "inner": args.inner,
        "pairs": args.pairs,
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
    p.add_argument("--agent-asks", type=int, default=20000, help="inner asks per agent_ask block")
    p.add_argument("--inner", type=int, default=10, help="inner asks per client ask (agent_ask)")
    p.add_argument("--pairs", type=int, default=100, help="pairs asking at once (agent_ask)")
    p.add_argument("--only", choices=["agent_ask"], help="run only this mode")
    p.add_argument(
        "--sampling", action="store_true",
        help="also time the communication graph's sampling hooks (the sampling overhead)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile N inner asks (agent_ask)"
    )
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    if args.profile:
        return
    res["env"] = environment(loop_name)
    a, r = res["accord"], res["raw"]
    lines = [f"ask_local  (loop: {loop_name}; in-process node vs asyncio queue+task actors)"]
    lines.append(f"  {'mode':<10} {'accord ops/s':>13} {'raw ops/s':>12} {'ratio':>6}")
    for m in MODES if args.only is None else ():
        lines.append(
            f"  {m:<10} {a[f'{m}_ops_s']:13.0f} {r[f'{m}_ops_s']:12.0f} "
            f"{res['ratios'][m]:6.2f}  {verdict(res['ratios'][m], TARGET, True)}"
        )
    if args.only is None:
        lines.append(
            f"  ask_seq latency  accord p50 {a['ask_seq_p50_us']:.1f} us p99 "
            f"{a['ask_seq_p99_us']:.1f} us | raw p50 {r['ask_seq_p50_us']:.1f} us p99 "
            f"{r['ask_seq_p99_us']:.1f} us"
        )
    lines.append(
        f"  agent_ask  {a['agent_ask_ops_s']:13.0f} {r['agent_ask_ops_s']:12.0f} "
        f"{res['ratios']['agent_ask']:6.2f}  CPU per inner ask: accord {a['agent_ask_cpu_us']:.1f}"
        f" us, raw {r['agent_ask_cpu_us']:.1f} us (best round); accord/raw"
        f" {res['agent_ask_cpu_ratio']:.2f} (median of rounds); {res['agent_ask_failed']} failed"
    )
    if args.sampling:
        h = res["sampling_hooks_us"]
        lines.append(
            f"  sampling: {h['message']:.2f} us per sampled message, {h['turn']:.2f} us per turn"
        )
        if "sampling_overhead_agent_ask" in res:
            o = res["sampling_overhead_agent_ask"]
            lines.append(f"    of an agent_ask inner ask's CPU: {o:.1%} {verdict(o, 0.03, False)}")
        if "sampling_overhead_ask_seq" in res:
            o = res["sampling_overhead_ask_seq"]
            lines.append(f"    of a sequential ask (ask_seq): {o:.1%} {verdict(o, 0.03, False)}")
            o = res["sampling_overhead_tell_seq"]
            lines.append(f"    of a local tell and its turn (tell_seq): {o:.1%}")
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
