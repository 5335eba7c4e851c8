"""`accord demo`: a real 3-node cluster on the embedded server, traffic, a SIGKILL, and the proof.

It drives asks to many counter agents, kills one node process mid-traffic, measures how long until
every shard is owned again and every agent answers, and checks the activation log for any agent
that was active on two live processes at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._app import agent_classes, load_module
from ._errors import AccordError, ConfigurationError
from ._ids import AgentId
from .testing import Cluster, wait_for_placement

ASK_TIMEOUT = 2.0


def overlapping_activations(log_path: Path, death: dict[int, float]) -> list[tuple[str, int, int]]:
    """Agents active on two live processes at once: (agent, pid_a, pid_b) per overlap.

    An activation lasts from its `activate` line to its `deactivate` line, or to its process's
    death time in `death` (pid → time), or forever if neither.
    """
    opened: dict[tuple[str, int], float] = {}
    spans: dict[str, list[tuple[float, float, int]]] = {}
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        ev = json.loads(line)
        key = (ev["agent"], ev["pid"])
        if ev["event"] == "activate":
            opened[key] = ev["t"]
        elif key in opened:
            spans.setdefault(ev["agent"], []).append((opened.pop(key), ev["t"], ev["pid"]))
    for (agent, pid), start in opened.items():
        spans.setdefault(agent, []).append((start, death.get(pid, float("inf")), pid))
    bad = []
    for agent, items in spans.items():
        items.sort()
        reach, reach_pid = float("-inf"), -1  # the latest end among earlier spans
        for start, end, pid in items:
            if start < reach and pid != reach_pid:
                bad.append((agent, reach_pid, pid))
            if end > reach:
                reach, reach_pid = end, pid
    return bad


async def run_demo(app_ref: str, n_agents: int, out: Console, *, tls: bool = False) -> int:
    classes = agent_classes(load_module(app_ref))
    module = load_module(app_ref)
    inc_type = getattr(module, "Increment", None)
    if inc_type is None or not any(c.__accord_spec__.type_name == "counter" for c in classes):
        raise ConfigurationError("the demo app must define a 'counter' agent and Increment")
    workdir = Path(tempfile.mkdtemp(prefix="accord-demo-"))
    act_log = workdir / "activations.jsonl"
    env = {"ACCORD_ACTIVATION_LOG": str(act_log)}
    targets = [AgentId("counter", f"c{i}") for i in range(n_agents)]
    stats: Counter[str] = Counter()
    out.rule("[bold]accord demo")
    out.print(f"starting an embedded nats-server and 3 node processes (logs in {workdir})")
    with Cluster(app_ref, 3, env=env, log_dir=workdir / "logs", secure=tls) as cluster:
        async with cluster.connect() as mesh:
            t0 = time.monotonic()
            st = await wait_for_placement(mesh, set(cluster.nodes), timeout=30)
            out.print(f"cluster ready in {time.monotonic() - t0:.2f}s: NATS {cluster.url}")
            _print_owners(out, st, "shards before the fault")

            async def ask_ok(agent: AgentId) -> bool:
                stats["asks"] += 1
                try:
                    await mesh.ask(agent, inc_type(1), timeout=ASK_TIMEOUT)
                except AccordError as exc:
                    stats[type(exc).__name__] += 1
                    return False
                stats["ok"] += 1
                return True

            with _progress(out) as progress:
                task = progress.add_task("warm-up: every agent once", total=n_agents)
                sem = asyncio.Semaphore(64)

                async def warm(agent: AgentId) -> None:
                    async with sem:
                        while not await ask_ok(agent):
                            pass
                    progress.advance(task)

                await asyncio.gather(*(warm(a) for a in targets))

            victim = random.choice(sorted(cluster.nodes))
            proc = cluster.nodes[victim]
            out.print(f"traffic running; [bold red]SIGKILL {victim}[/] (pid {proc.pid}) …")
            stop_traffic = asyncio.Event()

            async def background() -> None:
                while not stop_traffic.is_set():
                    await ask_ok(random.choice(targets))

            workers = [asyncio.create_task(background()) for _ in range(16)]
            await asyncio.sleep(0.5)  # let traffic flow before the fault (demo pacing)
            kill_at = time.monotonic()
            kill_wall = time.time()
            proc.kill()
            live = set(cluster.nodes) - {victim}
            answered: set[AgentId] = set()
            with _progress(out) as progress:
                task = progress.add_task("after the kill: agents answering again", total=n_agents)
                sem = asyncio.Semaphore(64)

                async def until_answer(agent: AgentId) -> None:
                    async with sem:
                        while not await ask_ok(agent):
                            if time.monotonic() - kill_at > 60:
                                return
                    answered.add(agent)
                    progress.advance(task)

                await asyncio.gather(*(until_answer(a) for a in targets))
            all_answer_s = time.monotonic() - kill_at
            st = await wait_for_placement(mesh, live, timeout=30)
            stop_traffic.set()
            await asyncio.gather(*workers)
            _print_owners(out, st, "shards after failover")
            lost = n_agents - len(answered)
    overlaps = overlapping_activations(act_log, {proc.pid: kill_wall})
    summary = Table(title="summary", show_header=False)
    summary.add_row("asks sent", str(stats["asks"]))
    summary.add_row("asks answered", str(stats["ok"]))
    summary.add_row(
        "asks timed out (in flight at the kill or shard unowned; retried)",
        str(stats["DeliveryTimeout"]),
    )
    summary.add_row("failover: kill → every agent answering", f"{all_answer_s:.2f} s")
    summary.add_row("lease TTL", f"{st['lease_ttl']} s")
    summary.add_row("agents never answering again (lost)", str(lost))
    summary.add_row("double activations", str(len(overlaps)))
    out.print(summary)
    ok = lost == 0 and not overlaps
    out.print("[bold green]demo passed[/]" if ok else "[bold red]demo FAILED[/]")
    _cleanup(workdir, keep=not ok)
    return 0 if ok else 1


def _progress(out: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    )


def _print_owners(out: Console, st: dict[str, Any], title: str) -> None:
    t = Table(title=title)
    t.add_column("node")
    t.add_column("state")
    t.add_column("shards held")
    for n in st["nodes"]:
        t.add_row(n["name"], n["state"], str(n["shards"]))
    out.print(t)


def _cleanup(workdir: Path, keep: bool) -> None:
    if keep:
        return
    for p in sorted(workdir.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    os.rmdir(workdir)
