"""Helpers shared by the benchmarks: statistics, event-loop choice, output, the example app."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

from accord import _loops
from accord._errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
COUNTER_APP = ROOT / "examples" / "counter_app.py"
PARTITION_APP = ROOT / "examples" / "partition_app.py"
BENCH_DIR = Path(__file__).resolve().parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--uvloop",
        action="store_true",
        help="run the benchmark process on uvloop (if installed); node processes run on "
        "$ACCORD_LOOP's loop (asyncio unless set; ACCORD_LOOP=uvloop for uvloop)",
    )
    return p


def load_counter_app() -> ModuleType:
    """Import examples/counter_app.py from its path (registers the `counter` agent type)."""
    return load_app(COUNTER_APP)


def load_app(path: Path) -> ModuleType:
    """Import an example app from its path (registers its agent types in this process)."""
    name = f"accord_app_{path.stem}"  # the name `accord node --app <file>` gives it
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_bench(
    p: argparse.ArgumentParser, bench: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]]
) -> tuple[dict[str, Any], Any]:
    """Parse the command line, run `bench(args)` on the chosen loop; return its result (with the
    `env` block added) and the arguments."""
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    return res, args


def run(main: Callable[[], Coroutine[Any, Any, Any]], use_uvloop: bool) -> tuple[Any, str]:
    """Run `main()` on a fresh loop; return its result and the loop's name."""
    factory = None
    loop_name = "asyncio"
    if use_uvloop:
        try:
            factory = _loops.loop_factory("uvloop")
            loop_name = "uvloop"
        except ConfigurationError:
            print("uvloop not installed; using the default asyncio loop", file=sys.stderr)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main()), loop_name


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{'MET' if ok else 'MISSED'} (target {sign} {target:g})"


def environment(loop_name: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "loop": loop_name,
        "node_loop": _loops.loop_name(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:8.0f} us"


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds consumed so far by `pid` (from /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds of a set of processes, accumulated over measured blocks (`start`/`stop`)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.total = dict.fromkeys(pids, 0.0)
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """End a block: add its CPU seconds per process to `total` and return them."""
        used = {k: cpu_seconds(p) - self._before[k] for k, p in self.pids.items()}
        for k, v in used.items():
            self.total[k] += v
        return used

    def per_op_us(self, ops: int) -> dict[str, float]:
        return {k: round(v / ops * 1e6, 1) for k, v in self.total.items()} if ops else {}


async def activate(mesh: Any, agents: list[str], msg: Any, timeout: float = 60.0) -> None:
    """One ask to every agent, 64 at a time (all at once times out on a loaded machine)."""
    for k in range(0, len(agents), 64):
        await asyncio.gather(*(mesh.ask(a, msg, timeout=timeout) for a in agents[k : k + 64]))


async def sequential(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


async def throughput(
    call: Callable[[int], Awaitable[Any]], duration: float, inflight: int
) -> tuple[int, float]:
    """`inflight` workers call `call(i)` back to back for `duration` s; return (done, elapsed)."""
    count = 0
    t0 = time.perf_counter()
    end = t0 + duration

    async def worker(w: int) -> None:
        nonlocal count
        i = w
        while time.perf_counter() < end:
            await call(i)
            count += 1
            i += inflight

    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return count, time.perf_counter() - t0


async def alternating_rounds(
    meshes: dict[str, Any], cpu: dict[str, Cpu], args: Any, agents: list[str], msg: Any
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """`args.rounds` rounds over the sides of `meshes` (one-node clusters; which side goes first
    alternates), after each side's placement and a first ask to every agent: per round and side,
    `args.n` sequential asks of `msg` to counter/x, then `args.duration` s with `args.inflight`
    asks in flight over `agents`. Returns per side the latencies, each block's throughput and
    each block's CPU µs per ask of `cpu[side]`'s processes."""
    from accord.testing import wait_for_placement

    for mesh in meshes.values():
        await wait_for_placement(mesh, {"node-1"}, timeout=60)
        await activate(mesh, agents, msg)
        await mesh.ask("counter/x", msg)
    sides = list(meshes)
    lat: dict[str, list[float]] = {s: [] for s in sides}
    tput: dict[str, list[float]] = {s: [] for s in sides}
    blocks: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for name in sides if r % 2 == 0 else sides[::-1]:
            mesh = meshes[name]

            async def one(m: Any = mesh) -> Any:
                return await m.ask("counter/x", msg)

            async def many(i: int, m: Any = mesh) -> Any:
                return await m.ask(agents[i % len(agents)], msg, timeout=60)

            lat[name] += await sequential(one, args.n)
            cpu[name].start()
            done, elapsed = await throughput(many, args.duration, args.inflight)
            used = cpu[name].stop()
            tput[name].append(done / elapsed)
            blocks[name].append({k: v * 1e6 / max(1, done) for k, v in used.items()})
    return lat, tput, blocks


def side_summary(
    lat: list[float], tput: list[float], blocks: list[dict[str, float]]
) -> dict[str, Any]:
    """One side of `alternating_rounds`: p50/p99, median throughput, median CPU per ask (the sum
    and each process)."""
    return {
        "seq_p50_us": percentile(lat, 50) * 1e6,
        "seq_p99_us": percentile(lat, 99) * 1e6,
        "tput_ops_s": median(tput),
        "tput_rounds_ops_s": [round(x) for x in tput],
        "cpu_us_per_op": median([sum(b.values()) for b in blocks]),
        "cpu_us_per_op_by_process": {
            k: round(median([b[k] for b in blocks]), 1) for k in blocks[0]
        },
    }


def add_round_options(p: argparse.ArgumentParser) -> None:
    """The options of `alternating_rounds`: rounds, asks per round, block length, in flight,
    agents."""
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--n", type=int, default=1000, help="sequential asks per round")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per throughput block")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--agents", type=int, default=500)


def round_params(args: Any) -> dict[str, Any]:
    """`add_round_options`' values, as a result's `params` block."""
    return {"rounds": args.rounds, "seq_per_round": args.n, "inflight": args.inflight,
            "duration_s": args.duration, "agents": args.agents}  # fmt: skip
