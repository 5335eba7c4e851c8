"""Failover matrix: seconds from a fault until service is restored, per failover strategy and fault.

    python bench/failover_matrix.py [--faults node_kill,partition,leader_kill] [--json]

Agents: examples/partition_app.py, one agent type per strategy (`abs_counter` absolute,
`sb_counter` split_brain_allowed, `deg_counter` degraded). A probe per agent asks back to back
(1 s timeout, 0.2 s apart): `Add(1)` (a write) for absolute and split_brain_allowed; for degraded
one probe asks `Read()` and another `Add(1)`. "Restored" for a group (one strategy, one client) =
the moment after which every one of its agents answered every ask (bench/_probe.py); a phase ends
once every probe has answered for `--stable` s, or at `--timeout` (then reported as a timeout,
with the agents still failing, their errors, the cluster status and node log lines).

Faults:
  node_kill   3 `accord node` processes on the embedded nats-server (64 shards), SIGKILL one;
              repeated `--kill-runs` times on one cluster (a fresh node joins after each kill).
  partition   accord.netlab: 3 nats-servers (R3, fsync) in network namespaces, one node per host
              pinned to its local server, 8 shards. h1 (server + node) is cut off from h2 and h3.
              Views: the majority client (h2, h3) on every agent, the minority client (h1) on
              the agents node-h1 owned. Then heal: both clients on every agent, and the time until
              placement spans the 3 nodes again.
  leader_kill the same lab, nodes connected to all 3 servers. The server leading the leases
              bucket is also made leader of the state and members buckets, then SIGKILLed; the
              client is connected to the two survivors.

Baselines, same run: the lease TTL from the cluster's status + 1 s for absolute and degraded, 1 s
for split_brain_allowed. Targets: split_brain_allowed < 1 s; absolute <= TTL + 1 with NATS healthy
(node_kill only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import PARTITION_APP, emit, environment, load_app, median, parser, run
from _probe import Probe, all_answering, observe, started, summarize

from accord import AccordError
from accord._ids import shard_of
from accord._status import cluster_status
from accord.testing import Cluster, connect_retrying, wait_for_placement

STRATEGIES = {
    "absolute": "abs_counter",
    "split_brain_allowed": "sb_counter",
    "degraded": "deg_counter",
}
FAULTS = ("node_kill", "partition", "partition_leader", "leader_kill")
HOSTS = ("h1", "h2", "h3")
LAB_PREFIX = "accbench"
#: The Raft groups a node needs to keep its leases, heartbeat and write agent state.
BUCKETS = ["KV_accord_default_leases", "KV_accord_default_state", "KV_accord_default_members"]


# -- probes ----------------------------------------------------------------------------------


def make_probes(mesh: Any, agents: dict[str, list[str]], view: str, args: Any) -> list[Probe]:
    app = load_app(PARTITION_APP)
    out = []
    for strategy, names in agents.items():
        ops = (
            [("read", app.Read()), ("write", app.Add(1))]
            if strategy == "degraded"
            else [("write", app.Add(1))]
        )
        for agent in names:
            for op, msg in ops:
                out.append(
                    Probe(mesh, agent, msg, view, strategy, op, args.ask_timeout, args.interval)
                )
    return out


def groups(probes: list[Probe], t0: float) -> list[dict[str, Any]]:
    """One summary per (view, strategy, op), in a stable order."""
    keys = sorted(
        {(p.view, p.strategy, p.op) for p in probes},
        key=lambda k: (k[0], list(STRATEGIES).index(k[1]), k[2]),
    )
    return [
        {
            "view": v,
            "strategy": s,
            "op": o,
            **summarize([p for p in probes if (p.view, p.strategy, p.op) == (v, s, o)], t0),
        }
        for v, s, o in keys
    ]


@contextlib.asynccontextmanager
async def probing(probes: list[Probe]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = started(probes, stop)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            t.cancel()


def pick_agents(st: dict[str, Any], per_node: int) -> dict[str, dict[str, list[str]]]:
    """`per_node` agents of every strategy owned by each node: {strategy: {node: [agent]}}."""
    owners = {s["shard"]: s["owner"] for s in st["shards"]}
    nodes = set(owners.values())
    out: dict[str, dict[str, list[str]]] = {}
    for strategy, type_name in STRATEGIES.items():
        by_node: dict[str, list[str]] = {n: [] for n in nodes}
        i = 0
        while min(len(v) for v in by_node.values()) < per_node and i < 100_000:
            agent = f"{type_name}/k{i}"
            owner = owners[shard_of(agent, st["num_shards"])]
            if len(by_node[owner]) < per_node:
                by_node[owner].append(agent)
            i += 1
        out[strategy] = by_node
    return out


async def status_or_none(mesh: Any) -> dict[str, Any] | None:
    try:
        return await cluster_status(mesh, timeout=1.0)
    except AccordError:
        return None


def status_digest(st: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a status worth printing: who reports, node states, shards per owner."""
    if st is None:
        return None
    owners: dict[str, int] = {}
    for s in st["shards"]:
        owners[s["owner"]] = owners.get(s["owner"], 0) + 1
    return {
        "reporter": st["reporter"],
        "nodes": {n["name"]: n["state"] for n in st["nodes"]},
        "shards_by_owner": owners,
        "shards_owned": len(st["shards"]),
        "num_shards": st["num_shards"],
    }


def log_tail(log_dir: Path, lines: int = 6) -> dict[str, list[str]]:
    """The last WARNING/ERROR lines of every node log in `log_dir`."""
    out = {}
    for f in sorted(log_dir.glob("*.log")):
        text = f.read_text(errors="replace").splitlines()
        bad = [ln[:200] for ln in text if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln]
        out[f.stem] = bad[-lines:]
    return out


async def converged(
    mesh: Any, nodes: set[str], t0: float, timeout: float, procs: dict[str, Any]
) -> float | None:
    """Seconds from t0 until all shards are owned by exactly `nodes`, all alive in the status and
    all with a running process (a stale view can list a node that has exited); None: timeout."""
    while time.perf_counter() - t0 < timeout:
        st = await status_or_none(mesh)
        if st is not None:
            owners = {s["owner"] for s in st["shards"]}
            alive = {n["name"] for n in st["nodes"] if n["alive"]}
            running = all(procs[n].poll() is None for n in nodes)
            placed = len(st["shards"]) == st["num_shards"] and owners == nodes <= alive
            if placed and running:
                return time.perf_counter() - t0
        await asyncio.sleep(0.25)
    return None


async def watch_exits(
    procs: dict[str, Any], names: set[str], t0: float, out: dict[str, Any]
) -> None:
    """Record in `out` when each of `names` exits (seconds from t0, exit code)."""
    while True:
        for n in names - set(out):
            if procs[n].poll() is not None:
                out[n] = {"at_s": round(time.perf_counter() - t0, 2), "code": procs[n].returncode}
        await asyncio.sleep(0.2)


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    return ""


async def phase(
    name: str,
    probes: list[Probe],
    watch: list[Probe],
    fault: Callable[[], None],
    args: Any,
    *,
    min_s: float,
    status_mesh: Any,
    log_dir: Path,
    procs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `fault` while `probes` ask; wait until `watch` is restored (or time out). Node
    processes (`procs`, name -> Popen) that exit on their own meanwhile are reported."""
    before = {n for n, proc in procs.items() if proc.poll() is None}
    exits: dict[str, Any] = {}
    t0 = time.perf_counter()
    fault()
    gone = {n for n in before if procs[n].poll() is not None}  # killed by the fault itself
    watcher = asyncio.create_task(watch_exits(procs, before - gone, t0, exits))
    end = await observe(watch, t0, stable=args.stable, min_s=min_s, timeout=args.timeout)
    watcher.cancel()
    for n, e in exits.items():
        e["last_line"] = last_line(log_dir / f"{n}.log")
    res: dict[str, Any] = {
        "phase": name,
        "observed_s": time.perf_counter() - t0,
        "timed_out": end is None,
        "groups": groups(probes, t0),
        "node_exits": exits,
        **(extra or {}),
    }
    if end is None:
        res["observed"] = {
            "status": status_digest(await status_or_none(status_mesh)),
            "node_logs": log_tail(log_dir),
        }
    return res


# -- fault 1: node SIGKILL, embedded server ---------------------------------------------------


async def node_kill(args: Any, log_dir: Path) -> dict[str, Any]:
    agents = {s: [f"{t}/f{k}" for k in range(args.agents)] for s, t in STRATEGIES.items()}
    runs = []
    ttl = None
    with Cluster(app=str(PARTITION_APP), nodes=3, log_dir=log_dir) as cluster:
        async with cluster.connect() as mesh:
            next_id = 4
            for i in range(args.kill_runs):
                live = {n for n, p in cluster.nodes.items() if p.alive()}
                st = await wait_for_placement(mesh, live, timeout=60)
                ttl = st["lease_ttl"]
                victim = f"node-{i + 1}"
                probes = make_probes(mesh, agents, "client", args)
                async with probing(probes):
                    if not await all_answering(probes, 30):
                        raise RuntimeError("agents not all answering before the kill")
                    await asyncio.sleep(args.settle)
                    victim_shards = sum(1 for s in st["shards"] if s["owner"] == victim)
                    res = await phase(
                        f"kill {victim}",
                        probes,
                        probes,
                        cluster.nodes[victim].kill,
                        args,
                        min_s=0,
                        status_mesh=mesh,
                        log_dir=log_dir,
                        procs={n: node.proc for n, node in cluster.nodes.items()},
                        extra={"victim": victim, "victim_shards": victim_shards},
                    )
                runs.append(res)
                if res["timed_out"] or i + 1 == args.kill_runs:
                    break
                cluster.add_node(f"node-{next_id}")
                next_id += 1
    # Per group: the median over runs (None if any run did not restore).
    merged = []
    for gi, g in enumerate(runs[0]["groups"]):
        values = [r["groups"][gi]["restored_s"] for r in runs]
        merged.append(
            {
                **g,
                "restored_s": None if None in values else median(values),
                "runs_s": values,
                "affected": max(r["groups"][gi]["affected"] for r in runs),
            }
        )
    return {
        "lease_ttl_s": ttl,
        "shards": 64,
        "runs": runs,
        "groups": merged,
        "timed_out": any(r["timed_out"] for r in runs),
    }


# -- the network lab: faults 2 and 3 -----------------------------------------------------------


def lab_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    return None


async def create_cluster(urls: list[str], num_shards: int) -> None:
    from accord.cluster._config import Names, open_cluster
    from accord.engine._nats import NatsTransport

    engine = await NatsTransport.connect(urls, "bench-setup", timeout=2)
    try:
        await open_cluster(engine, Names("default"), num_shards=num_shards, replicas=3)
    finally:
        await engine.close()


mesh_to = connect_retrying  # retried: JetStream can be slow to answer while the lab starts


@contextlib.contextmanager
def lab_cluster() -> Any:
    """3 hosts, a nats-server and an `accord node` on each; yields (lab, nats, node procs).
    Processes are started from this (the main) thread: they die with the thread that made them."""
    from accord.testing import netlab

    netlab.NetLab.cleanup_stale(LAB_PREFIX)
    with netlab.NetLab(LAB_PREFIX, hosts=3) as lab, netlab.NatsCluster(lab) as nats:
        procs: dict[str, subprocess.Popen[Any]] = {}
        try:
            yield lab, nats, procs
        finally:
            for p in procs.values():  # nodes before servers, so they can hand off
                netlab.stop_process(p, grace=10)


def start_node(lab: Any, nats: Any, h: str, log_dir: Path, pinned: bool) -> Any:
    urls = [nats.url(h)] if pinned else [nats.url(h), *(nats.url(o) for o in HOSTS if o != h)]
    argv = [sys.executable, "-m", "accord", "node", "--nats", ",".join(urls), "--app",
            str(PARTITION_APP), "--name", f"node-{h}", "--replicas", "3"]  # fmt: skip
    with open(log_dir / f"node-{h}.log", "ab") as log:
        return lab.run(h, argv, stdout=log, stderr=log)


async def lab_ready(
    lab: Any, nats: Any, procs: dict[str, Any], log_dir: Path, pinned: bool, args: Any
) -> dict[str, Any]:
    """Servers healthy, cluster created, one node per host placed. A node that exits while the
    lab starts (JetStream answering slowly right after the servers formed) is started again,
    up to 3 times each; how often is returned, it is not part of any measurement."""
    await asyncio.to_thread(nats.wait_ready, 60)
    await create_cluster(nats.urls, args.lab_shards)
    for h in HOSTS:
        procs[f"node-{h}"] = start_node(lab, nats, h, log_dir, pinned)
    restarts: dict[str, int] = {}
    deadline = time.perf_counter() + 120
    async with mesh_to(nats.urls) as mesh:
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    if restarts.get(name, 0) >= 3:
                        raise RuntimeError(f"{name} keeps exiting at start: "
                                           f"{last_line(log_dir / f'{name}.log')}")  # fmt: skip
                    restarts[name] = restarts.get(name, 0) + 1
                    procs[name] = start_node(lab, nats, name.removeprefix("node-"), log_dir,
                                             pinned)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await wait_for_placement(mesh, set(procs), timeout=2)
                return {"node_restarts_at_start": restarts}
            if time.perf_counter() > deadline:
                st = status_digest(await status_or_none(mesh))
                raise RuntimeError(f"placement over 3 nodes not reached at start: {st}")


async def partition(args: Any, log_dir: Path, leaders_on: str) -> dict[str, Any]:
    """Cut h1 (server and node) off from h2 and h3, with the KV buckets' Raft leaders moved to
    `leaders_on` first; then heal."""
    all_nodes = {f"node-{h}" for h in HOSTS}
    with lab_cluster() as (lab, nats, procs):
        setup = await lab_ready(lab, nats, procs, log_dir, True, args)
        async with (
            mesh_to([nats.url("h2"), nats.url("h3")]) as majority,
            mesh_to([nats.url("h1")]) as minority,
        ):
            await wait_for_placement(majority, all_nodes, timeout=90)
            for b in BUCKETS:
                await nats.move_leader(b, leaders_on)
            led = {b.removeprefix("KV_accord_default_"): await nats.leader_of(b) for b in BUCKETS}
            st = await wait_for_placement(majority, all_nodes, timeout=60)
            ttl = st["lease_ttl"]
            picked = pick_agents(st, args.per_node)
            every = {s: [a for v in by.values() for a in v] for s, by in picked.items()}
            on_h1 = {s: by["node-h1"] for s, by in picked.items()}
            maj = make_probes(majority, every, "majority", args)
            mino = make_probes(minority, on_h1, "minority", args)
            async with probing(maj + mino):
                if not await all_answering(maj + mino, 60):
                    raise RuntimeError("agents not all answering before the partition")
                await asyncio.sleep(args.settle)
                cut = await phase(
                    "partition h1 | h2 h3",
                    maj + mino,
                    maj,
                    lambda: lab.partition([{"h1"}, {"h2", "h3"}]),
                    args,
                    min_s=max(ttl + 1 + args.stable, args.hold),
                    status_mesh=majority,
                    log_dir=log_dir,
                    procs=procs,
                    extra={"leaders": led},
                )
            both = make_probes(majority, every, "majority", args)
            both += make_probes(minority, every, "minority", args)
            async with probing(both):
                t_heal = time.perf_counter()
                placed = asyncio.create_task(
                    converged(majority, all_nodes, t_heal, args.timeout, procs)
                )
                healed = await phase(
                    "heal",
                    both,
                    both,
                    lab.heal,
                    args,
                    min_s=ttl + 1 + args.stable,
                    status_mesh=majority,
                    log_dir=log_dir,
                    procs=procs,
                )
                healed["placement_s"] = await placed
                if healed["placement_s"] is None:
                    healed.setdefault("observed", {})["placement"] = status_digest(
                        await status_or_none(majority)
                    )
    return {
        "lease_ttl_s": ttl,
        "shards": args.lab_shards,
        "phases": [cut, healed],
        **setup,
        "timed_out": cut["timed_out"] or healed["timed_out"] or healed["placement_s"] is None,
    }


async def new_leaders(
    nats: Any, hosts: list[str], streams: list[str], t0: float, timeout: float
) -> dict[str, float | None]:
    """Seconds from t0 until each stream reports a leader among `hosts` (None: not in time)."""
    import nats as nats_py

    out: dict[str, float | None] = {s: None for s in streams}
    nc = await nats_py.connect([nats.url(h) for h in hosts], connect_timeout=2)
    try:
        while time.perf_counter() - t0 < timeout and None in out.values():
            for s in [s for s, v in out.items() if v is None]:
                with contextlib.suppress(Exception):
                    if await nats.leader_of(s, nc=nc, timeout=0.5) in hosts:
                        out[s] = time.perf_counter() - t0
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return out


async def leader_kill(args: Any, log_dir: Path) -> dict[str, Any]:
    all_nodes = {f"node-{h}" for h in HOSTS}
    buckets = BUCKETS
    with lab_cluster() as (lab, nats, procs):
        setup = await lab_ready(lab, nats, procs, log_dir, False, args)
        async with mesh_to(nats.urls) as anywhere:
            st = await wait_for_placement(anywhere, all_nodes, timeout=90)
            victim = await nats.leader_of(buckets[0])
            if victim not in HOSTS:
                raise RuntimeError(f"no leader for {buckets[0]}: {victim}")
            for b in buckets[1:]:
                await nats.move_leader(b, victim)
        survivors = [h for h in HOSTS if h != victim]
        led = {b.removeprefix("KV_accord_default_"): await nats.leader_of(b) for b in buckets}
        async with mesh_to([nats.url(h) for h in survivors]) as client:
            st = await wait_for_placement(client, all_nodes, timeout=60)
            ttl = st["lease_ttl"]
            picked = pick_agents(st, args.per_node)
            every = {s: [a for v in by.values() for a in v] for s, by in picked.items()}
            probes = make_probes(client, every, "survivors", args)
            async with probing(probes):
                if not await all_answering(probes, 60):
                    raise RuntimeError("agents not all answering before the leader kill")
                await asyncio.sleep(args.settle)
                t_kill = time.perf_counter() + 0.001
                elected = asyncio.create_task(
                    new_leaders(nats, survivors, buckets, t_kill, args.timeout)
                )
                res = await phase(
                    f"kill nats-server {victim}",
                    probes,
                    probes,
                    lambda: nats.kill(victim),
                    args,
                    min_s=args.stable,
                    status_mesh=client,
                    log_dir=log_dir,
                    procs=procs,
                    extra={"victim": victim, "led_before": led},
                )
                res["leader_elected_s"] = await elected
    return {
        "lease_ttl_s": ttl,
        "shards": args.lab_shards,
        "phases": [res],
        **setup,
        "timed_out": res["timed_out"],
    }


# -- report ------------------------------------------------------------------------------------


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (fault, phase, view, strategy, op), with its baseline, ratio and target."""
    out = []
    for fault, fr in res["faults"].items():
        if "skipped" in fr or "error" in fr:
            continue
        ttl = fr["lease_ttl_s"]
        phases = [("kill", fr)] if fault == "node_kill" else [(p["phase"], p) for p in fr["phases"]]
        for pname, p in phases:
            for g in p["groups"]:
                s = g["strategy"]
                base, base_name = (
                    (1.0, "1 s")
                    if s == "split_brain_allowed"
                    else (ttl + 1.0, f"TTL+1 = {ttl + 1} s")
                )
                healthy = s == "absolute" and fault == "node_kill"
                target = 1.0 if s == "split_brain_allowed" or healthy else None
                by_design = (
                    pname.startswith("partition")
                    and g["view"] == "minority"
                    and (s == "absolute" or (s == "degraded" and g["op"] == "write"))
                )
                r = g["restored_s"]
                ratio = r / base if r is not None else None
                note = ""
                if r is None or by_design:
                    ff = g["first_failure_s"]
                    errs = ", ".join(f"{k} x{v}" for k, v in g["errors_after"].items())
                    note = f"failing from {ff:.1f} s ({errs})" if ff is not None else ""
                if by_design:
                    target = None
                    status = "refused (by design)" if r is None else "SERVED (unexpected)"
                elif r is None:
                    status = "TIMEOUT"
                elif target is None:
                    status = "-"
                else:
                    status = "met" if ratio is not None and ratio <= target else "MISSED"
                out.append(
                    {
                        "fault": fault,
                        "phase": pname,
                        "view": g["view"],
                        "strategy": s,
                        "op": g["op"],
                        "agents": g["agents"],
                        "affected": g["affected"],
                        "restored_s": r,
                        "baseline_s": base,
                        "baseline": base_name,
                        "ratio": ratio,
                        "target": target,
                        "status": status,
                        "first_failure_s": g["first_failure_s"],
                        "ok_fraction_after": g["ok_fraction_after"],
                        "note": note,
                    }
                )
    return out


def text(res: dict[str, Any], args: Any) -> list[str]:
    lines = [
        f"failover_matrix  (faults: {', '.join(res['faults'])}; ask timeout "
        f"{args.ask_timeout} s, probe every {args.interval} s, stable {args.stable} s)"
    ]
    hdr = (
        f"  {'fault':<17}{'phase':<22}{'view':<10}{'strategy':<21}{'op':<6}{'agents':>7}"
        f"{'hit':>5}{'restored s':>11}  {'baseline':<15}{'ratio':>6}  {'target':<7}status"
    )
    lines.append(hdr)
    for r in res["rows"]:
        rs = f"{r['restored_s']:.2f}" if r["restored_s"] is not None else "-"
        ra = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        tg = f"<= {r['target']:g}" if r["target"] is not None else "-"
        lines.append(
            f"  {r['fault']:<17}{r['phase'][:21]:<22}{r['view']:<10}{r['strategy']:<21}"
            f"{r['op']:<6}{r['agents']:>7}{r['affected']:>5}{rs:>11}  {r['baseline']:<15}"
            f"{ra:>6}  {tg:<7}{r['status']}" + (f"  {r['note']}" if r["note"] else "")
        )
    for fault, fr in res["faults"].items():
        if "skipped" in fr:
            lines.append(f"  {fault}: skipped ({fr['skipped']})")
            continue
        if "error" in fr:
            lines.append(f"  {fault}: FAILED: {fr['error']}")
            continue
        if fr.get("node_restarts_at_start"):
            lines.append(f"  {fault}: nodes restarted at lab start {fr['node_restarts_at_start']}")
        if fault == "node_kill":
            per = "; ".join(
                f"{g['strategy']} {g['op']}: "
                + ", ".join("-" if v is None else f"{v:.2f}" for v in g["runs_s"])
                for g in fr["groups"]
            )
            lines.append(f"  node_kill runs (s): {per}")
        for p in fr.get("phases", fr.get("runs", [])):
            extra = []
            if led := p.get("leaders") or p.get("led_before"):
                extra.append(
                    "Raft leaders at the fault: " + ", ".join(f"{k} {v}" for k, v in led.items())
                )
            if "placement_s" in p:
                ps = p["placement_s"]
                extra.append(
                    "placement over 3 nodes "
                    + (f"{ps:.2f} s" if ps is not None else "NOT converged (timeout)")
                )
            if "leader_elected_s" in p:
                extra.append(
                    "new leaders: "
                    + ", ".join(
                        f"{k.removeprefix('KV_accord_default_')} "
                        + ("-" if v is None else f"{v:.2f} s")
                        for k, v in p["leader_elected_s"].items()
                    )
                )
            if p["timed_out"]:
                extra.append(f"TIMED OUT after {p['observed_s']:.0f} s")
            for n, e in p.get("node_exits", {}).items():
                extra.append(f"{n} EXITED (code {e['code']}) at {e['at_s']} s: {e['last_line']!r}")
            if extra:
                lines.append(f"  {fault} / {p['phase']}: " + "; ".join(extra))
            for g in p["groups"]:
                if "not_restored" in g:
                    lines.append(
                        f"    not restored: {g['view']} {g['strategy']} {g['op']}: "
                        f"{g['not_restored']}/{g['agents']} agents, last errors "
                        f"{g['last_errors']}, e.g. {g['not_restored_agents'][:3]}: "
                        f"{g['last_error_sample']!r}"
                    )
            if "observed" in p:
                obs = p["observed"]
                if obs.get("status") is not None or "placement" in obs:
                    lines.append(f"    status: {obs.get('status') or obs.get('placement')}")
                for node, tail in (obs.get("node_logs") or {}).items():
                    for ln in tail[-3:]:
                        lines.append(f"    {node}: {ln}")
    return lines


async def bench(args: Any, log_dir: Path) -> dict[str, Any]:
    load_app(PARTITION_APP)  # reply types of the agents, for decoding
    runners: dict[str, Callable[[Any, Path], Awaitable[dict[str, Any]]]] = {
        "node_kill": node_kill,
        "partition": lambda a, d: partition(a, d, leaders_on="h2"),
        "partition_leader": lambda a, d: partition(a, d, leaders_on="h1"),
        "leader_kill": leader_kill,
    }
    faults: dict[str, Any] = {}
    for fault in args.faults:
        if fault != "node_kill" and (why := lab_unusable()):
            faults[fault] = {"skipped": why}
            continue
        t0 = time.perf_counter()
        print(f"  {fault} ...", file=sys.stderr, flush=True)
        try:
            faults[fault] = await asyncio.wait_for(
                runners[fault](args, log_dir / fault), args.fault_timeout
            )
        except (TimeoutError, RuntimeError, AccordError) as exc:
            faults[fault] = {
                "error": f"{type(exc).__name__}: {exc}",
                "node_logs": log_tail(log_dir / fault),
            }
        faults[fault]["wall_s"] = time.perf_counter() - t0
    res: dict[str, Any] = {
        "benchmark": "failover_matrix",
        "faults": faults,
        "params": {
            k: getattr(args, k)
            for k in (
                "agents",
                "per_node",
                "kill_runs",
                "ask_timeout",
                "interval",
                "stable",
                "timeout",
                "lab_shards",
                "hold",
            )
        },
    }
    res["rows"] = rows(res)
    res["failed"] = [f for f, r in faults.items() if "error" in r or r.get("timed_out")]
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {FAULTS}")
    p.add_argument("--agents", type=int, default=30, help="agents per strategy (node_kill)")
    p.add_argument("--per-node", type=int, default=3, help="agents per strategy and node (lab)")
    p.add_argument("--kill-runs", type=int, default=3)
    p.add_argument("--lab-shards", type=int, default=8)
    p.add_argument("--ask-timeout", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=0.2, help="pause between a probe's asks")
    p.add_argument("--stable", type=float, default=3.0, help="answering this long = restored")
    p.add_argument("--hold", type=float, default=10.0, help="least seconds a partition lasts")
    p.add_argument("--settle", type=float, default=1.0, help="steady state before a fault")
    p.add_argument("--timeout", type=float, default=30.0, help="give up on a phase after this")
    p.add_argument("--fault-timeout", type=float, default=180.0, help="give up on a fault")
    p.add_argument("--log-dir", help="keep node logs here (default: a temporary directory)")
    args = p.parse_args()
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if bad := [f for f in args.faults if f not in FAULTS]:
        p.error(f"unknown faults {bad}; choose from {FAULTS}")
    with contextlib.ExitStack() as stack:
        log_dir = (
            Path(args.log_dir)
            if args.log_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="accord-fmatrix-")))
        )
        for f in args.faults:
            (log_dir / f).mkdir(parents=True, exist_ok=True)
        res, loop_name = run(lambda: bench(args, log_dir), args.uvloop)
    res["env"] = environment(loop_name)
    emit(res, args.json, text(res, args))


if __name__ == "__main__":
    main()
