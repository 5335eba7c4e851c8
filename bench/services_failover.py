"""Services failover through the load balancer: 3 web_app replicas behind node-1's balancer.

Each run starts a fresh 3-node cluster (`accord node --http-port P` on node-1), deploys
`examples/services/web_app.py` with 3 replicas, `path_prefix="/web"`, health interval 0.25 s, and
waits for one healthy replica per node (web_app runs with TCP_NODELAY unless --stock-web-app, see
NODELAY). Then:
  (1) proxy overhead (first run only): aiohttp clients with keep-alive GET /web/hello through the
      balancer and, as the baseline, directly from one replica's port (127.0.0.1), alternately in
      rounds at the same concurrency: sequential p50/p99, then throughput and p50/p99 with
      `--concurrency` requests in flight. Ratios are balancer/direct.
  (2) failover: `--clients` clients loop GETs through the balancer; a node other than node-1 is
      SIGKILLed; seconds until `services(mesh)` shows 3 healthy replicas on live nodes (and until
      the balancer first serves a request from the replacement); every non-200 answer and every
      client exception from 1 s before the kill until `--tail` s after the replacement is healthy.

    python bench/services_failover.py [--runs 3] [--concurrency 8] [--clients 4] [--stock-web-app]
                                      [--json]
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from _common import (
    COUNTER_APP,
    ROOT,
    cpu_seconds,
    emit,
    environment,
    median,
    parser,
    percentile,
    ratio,
    run,
)

from accord.services import deploy, parse_spec, services
from accord.services._promises import store_for
from accord.testing import Cluster

WEB_APP = ROOT / "examples" / "services" / "web_app.py"
BALANCER = "node-1"
NODES = ("node-1", "node-2", "node-3")
T = TypeVar("T")
# web_app.py answers with two writes (headers, then body) on a socket with Nagle's algorithm on:
# on a keep-alive connection the body waits for the client's delayed ACK, ~40 ms per request.
# By default the replicas run web_app.py unchanged but with TCP_NODELAY set on accepted sockets,
# so the figures measure accord and not that stall; --stock-web-app runs the file as it is.
NODELAY = (
    "import runpy, socketserver; socketserver.StreamRequestHandler.disable_nagle_algorithm = True; "
    f"runpy.run_path({str(WEB_APP)!r}, run_name='__main__')"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """Poll `check` every 50 ms until it returns something other than None."""
    deadline = time.perf_counter() + timeout
    while True:
        got = await check()
        if got is not None:
            return got
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.05)


async def web(mesh: Any) -> dict[str, Any]:
    return next(s for s in await services(mesh) if s["name"] == "web")


def healthy(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in svc["instances"] if i["status"] == "healthy" and i["node_alive"]]


async def deploy_web(mesh: Any, stock: bool) -> dict[str, Any]:
    """Deploy `web` once the 3 nodes are up; return it once one replica per node is healthy."""
    store = await store_for(mesh)

    async def nodes_up() -> bool | None:
        return True if len(await store.nodes()) >= len(NODES) else None

    await until(nodes_up, 30, "3 live nodes")
    command = [sys.executable, str(WEB_APP)] if stock else [sys.executable, "-c", NODELAY]
    spec = parse_spec({
        "name": "web", "command": command, "replicas": 3,
        "path_prefix": "/web", "health": {"interval": 0.25, "timeout": 0.5},
    })  # fmt: skip
    await deploy(mesh, spec)

    async def spread() -> dict[str, Any] | None:
        svc = await web(mesh)
        return svc if {i["node"] for i in healthy(svc)} == set(NODES) else None

    return await until(spread, 30, "healthy replica on each node")


# -- proxy overhead ----------------------------------------------------------------------------


async def block(
    http: aiohttp.ClientSession, url: str, duration: float, inflight: int
) -> tuple[list[float], float, int]:
    """`inflight` workers GET `url` back to back for `duration` s: (latencies, elapsed, errors)."""
    lat: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    end = t0 + duration

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t = time.perf_counter()
            async with http.get(url) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return lat, time.perf_counter() - t0, errors


# A bare aiohttp reverse proxy to one replica: the server and client code accord's balancer is
# built on, without routing, replica choice or retries. Its own process, like the balancer's node.
BARE_PROXY = """
import asyncio, os, sys
import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}

async def main():
    target = os.environ["TARGET"]
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False)

    async def handle(request):
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with http.request(request.method, target + str(request.rel_url), headers=headers,
                                data=body, allow_redirects=False) as resp:
            out = web.Response(status=resp.status, body=await resp.read())
            for k, v in resp.headers.items():
                if k.lower() not in HOP:
                    out.headers.add(k, v)
            return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["PORT"])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def bare_proxy(target: str) -> tuple[asyncio.subprocess.Process, int]:
    """Start BARE_PROXY in front of `target` (http://host:port); return it and its port."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_PROXY, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PORT": str(port), "TARGET": target},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if line.strip() != b"ready":
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"bare proxy did not start: {line!r}")
    return proc, port


async def overhead(
    via: str, replica: dict[str, Any], balancer_pid: int, args: Any
) -> dict[str, Any]:
    """Balancer, bare aiohttp proxy and direct, interleaved rounds, same client and concurrency.

    `middle_cpu_us_per_req`: CPU of the process between client and replica (the balancer's node,
    the bare proxy; for direct, the balancer's node while idle) per request of the block."""
    target = f"http://127.0.0.1:{replica['port']}"
    proxy, proxy_port = await bare_proxy(target)
    sides: dict[str, tuple[str, int]] = {
        "balancer": (via, balancer_pid),
        "bare_proxy": (f"http://127.0.0.1:{proxy_port}/web/hello", proxy.pid),
        "direct": (f"{target}/web/hello", balancer_pid),
    }
    acc: dict[str, dict[str, Any]] = {
        k: {"seq": [], "conc": [], "n": 0, "s": 0.0, "errors": 0, "cpu": 0.0} for k in sides
    }
    try:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as http:
            for url, _ in sides.values():  # warm-up: connections, every side's code path
                await block(http, url, 0.5, args.concurrency)
            for _ in range(args.rounds):
                for side, (url, pid) in sides.items():
                    d = acc[side]
                    lat, _, err = await block(http, url, args.seq_duration, 1)
                    d["seq"] += lat
                    c0 = cpu_seconds(pid)
                    lat, elapsed, err2 = await block(http, url, args.duration, args.concurrency)
                    d["cpu"] += cpu_seconds(pid) - c0
                    d["conc"] += lat
                    d["n"] += len(lat)
                    d["s"] += elapsed
                    d["errors"] += err + err2
    finally:
        proxy.kill()
        await proxy.wait()
    out: dict[str, Any] = {"direct_replica": f"{replica['index']}@{replica['node']}"}
    for side, d in acc.items():
        out[side] = {
            "seq_p50_us": percentile(d["seq"], 50) * 1e6,
            "seq_p99_us": percentile(d["seq"], 99) * 1e6,
            "tput_req_s": d["n"] / d["s"],
            "conc_p50_us": percentile(d["conc"], 50) * 1e6,
            "conc_p99_us": percentile(d["conc"], 99) * 1e6,
            "middle_cpu_us_per_req": d["cpu"] / d["n"] * 1e6,
            "errors": d["errors"],
        }

    def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        return {
            "seq_p50": ratio(a["seq_p50_us"], b["seq_p50_us"]),
            "seq_p99": ratio(a["seq_p99_us"], b["seq_p99_us"]),
            "throughput": ratio(a["tput_req_s"], b["tput_req_s"]),
            "conc_p50": ratio(a["conc_p50_us"], b["conc_p50_us"]),
            "conc_p99": ratio(a["conc_p99_us"], b["conc_p99_us"]),
        }

    out["ratios"] = ratios(out["balancer"], out["direct"])
    out["bare_ratios"] = ratios(out["bare_proxy"], out["direct"])
    out["balancer_vs_bare"] = ratios(out["balancer"], out["bare_proxy"])
    return out


# -- failover ----------------------------------------------------------------------------------


async def failover(cluster: Cluster, mesh: Any, url: str, victim: str, args: Any) -> dict[str, Any]:
    """Kill `victim` under client load; time the replacement; count failed requests."""
    seen: list[tuple[float, float, str, str]] = []  # (sent, done, status or exception, replica)
    stop = asyncio.Event()

    async def client() -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    async with http.get(url) as r:
                        await r.read()
                        outcome, rep = str(r.status), r.headers.get("X-Accord-Replica", "")
                except Exception as exc:  # every failure counts, whatever its kind
                    outcome, rep = type(exc).__name__, ""
                seen.append((t, time.perf_counter(), outcome, rep))
                await asyncio.sleep(args.pause)

    async def controller() -> str | None:
        leases = await mesh._keeper().list()
        return next((x.holder for x in leases if x.name == "services-controller"), None)

    holder = await until(controller, 5, "services controller lease")
    clients = [asyncio.create_task(client()) for _ in range(args.clients)]
    try:

        async def all_used() -> bool | None:
            used = {rep.rsplit("@", 1)[-1] for _, _, s, rep in seen if s == "200"}
            return True if set(NODES) <= used else None

        await until(all_used, 20, "balancer answer from every replica")
        await asyncio.sleep(1.0)  # steady load before the kill
        before = {rep for _, _, s, rep in seen if s == "200"}
        t_kill, wall_kill = time.perf_counter(), time.time()
        cluster.nodes[victim].kill()

        async def replaced() -> dict[str, Any] | None:
            svc = await web(mesh)
            ok = [i for i in healthy(svc) if i["node"] != victim]
            return svc if len(ok) == 3 else None

        svc = await until(replaced, args.timeout, "replacement replica")
        healthy_s = time.perf_counter() - t_kill
        await asyncio.sleep(args.tail)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    new = [i for i in healthy(svc) if i["node"] != victim and i["started_at"] > wall_kill]
    served = [d - t_kill for _, d, s, rep in seen if s == "200" and rep not in before]
    window = [x for x in seen if x[1] >= t_kill - 1.0]
    failed = [x for x in window if x[2] != "200"]
    kinds: dict[str, int] = {}
    for x in failed:
        kinds[x[2]] = kinds.get(x[2], 0) + 1
    lat = [d - t for t, d, _, _ in window]
    pre = [d - t for t, d, _, _ in seen if d < t_kill]
    return {
        "victim": victim,
        "controller": holder,
        "healthy_s": healthy_s,
        "placed_s": (svc["decided_at"] or wall_kill) - wall_kill,
        "started_s": (new[0]["started_at"] - wall_kill) if new else None,
        "replacement": f"{new[0]['index']}@{new[0]['node']}" if new else None,
        "first_served_s": min(served) if served else None,
        "window_requests": len(window),
        "window_failed": len(failed),
        "failed_kinds": kinds,
        "window_error_rate": len(failed) / len(window) if window else float("nan"),
        "window_max_latency_ms": max(lat) * 1e3 if lat else float("nan"),
        "window_p99_ms": percentile(lat, 99) * 1e3,
        "steady_p99_ms": percentile(pre, 99) * 1e3,
        "client_req_s": len(window) / (seen[-1][1] - (t_kill - 1.0)) if window else 0.0,
    }


async def one_run(i: int, args: Any, with_overhead: bool) -> dict[str, Any]:
    port = free_port()
    victim = NODES[1 + (i + 1) % 2]  # node-3, node-2, node-3, ...: never the balancer's node
    node_args = {BALANCER: ["--http-port", str(port)]}
    out: dict[str, Any] = {}
    with Cluster(str(COUNTER_APP), len(NODES), cluster=f"svcbench{i}", node_args=node_args) as c:
        async with c.connect() as mesh:
            t0 = time.perf_counter()
            svc = await deploy_web(mesh, args.stock_web_app)
            out["deploy_s"] = time.perf_counter() - t0
            url = f"http://127.0.0.1:{port}/web/hello"
            if with_overhead:
                rep = sorted(healthy(svc), key=lambda x: x["node"])[0]
                out["overhead"] = await overhead(url, rep, c.nodes[BALANCER].pid, args)
            out["failover"] = await failover(c, mesh, url, victim, args)
    return out


async def bench(args: Any) -> dict[str, Any]:
    runs = [await one_run(i, args, with_overhead=i == 0) for i in range(args.runs)]
    fo = [r["failover"] for r in runs]
    hs = [r["healthy_s"] for r in fo]
    served = [r["first_served_s"] for r in fo if r["first_served_s"] is not None]
    total = sum(r["window_requests"] for r in fo)
    failed = sum(r["window_failed"] for r in fo)
    return {
        "benchmark": "services_failover",
        "overhead": runs[0]["overhead"],
        "runs": fo,
        "deploy_s": [r["deploy_s"] for r in runs],
        "healthy_s": {"median": median(hs), "min": min(hs), "max": max(hs)},
        "first_served_s": {
            "median": median(served),
            "min": min(served, default=float("nan")),
            "max": max(served, default=float("nan")),
        },
        "window_requests": total,
        "window_failed": failed,
        "window_error_rate": failed / total if total else float("nan"),
        "params": {
            "runs": args.runs,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "seq_duration_s": args.seq_duration,
            "rounds": args.rounds,
            "clients": args.clients,
            "pause_s": args.pause,
            "tail_s": args.tail,
            "health_interval_s": 0.25,
            "web_app": "stock" if args.stock_web_app else "TCP_NODELAY",
        },
    }


def report(res: dict[str, Any]) -> list[str]:
    o, p = res["overhead"], res["params"]
    b, x, w = o["balancer"], o["bare_proxy"], o["direct"]
    r, xr = o["ratios"], o["bare_ratios"]
    c = f"{p['concurrency']} in flight"
    lines = [
        f"services_failover  (3 nodes, 3 web_app replicas [{p['web_app']}], balancer on "
        f"{BALANCER}; {os.cpu_count()} cpus)",
        f"proxy overhead (direct = replica {o['direct_replica']}, aiohttp keep-alive, "
        f"{p['rounds']} interleaved rounds; ratios against direct)",
        f"  {'':<24}{'balancer':>10}{'bare proxy':>11}{'direct':>9}{'balancer':>10}{'bare':>7}",
    ]
    for label, key, fmt in (
        ("sequential p50 (us)", "seq_p50", ".0f"),
        ("sequential p99 (us)", "seq_p99", ".0f"),
        (f"{c} req/s", "throughput", ".0f"),
        (f"{c} p50 (us)", "conc_p50", ".0f"),
        (f"{c} p99 (us)", "conc_p99", ".0f"),
    ):
        field = "tput_req_s" if key == "throughput" else f"{key}_us"
        lines.append(
            f"  {label:<24}{b[field]:>10{fmt}}{x[field]:>11{fmt}}{w[field]:>9{fmt}}"
            f"{r[key]:>10.2f}{xr[key]:>7.2f}"
        )
    lines += [
        f"  CPU per request of the process in the middle: balancer node "
        f"{b['middle_cpu_us_per_req']:.0f} us, bare proxy {x['middle_cpu_us_per_req']:.0f} us "
        f"(balancer node idle, per direct request: {w['middle_cpu_us_per_req']:.0f} us); "
        f"non-200: {b['errors']} / {x['errors']} / {w['errors']}",
        f"failover (SIGKILL a node under {p['clients']} looping clients, "
        f"health interval {p['health_interval_s']} s)",
        f"  {'run':<4}{'victim':<8}{'ctrl':<8}{'placed s':>9}{'started s':>10}{'healthy s':>10}"
        f"{'served s':>9}{'requests':>9}{'failed':>7}{'max ms':>8}",
    ]
    for i, f in enumerate(res["runs"], 1):
        started = "-" if f["started_s"] is None else f"{f['started_s']:.2f}"
        served = "-" if f["first_served_s"] is None else f"{f['first_served_s']:.2f}"
        lines.append(
            f"  {i:<4}{f['victim']:<8}{f['controller']:<8}{f['placed_s']:>9.2f}{started:>10}"
            f"{f['healthy_s']:>10.2f}{served:>9}{f['window_requests']:>9}"
            f"{f['window_failed']:>7}{f['window_max_latency_ms']:>8.0f}"
        )
    h, s = res["healthy_s"], res["first_served_s"]
    lines += [
        f"  replacement healthy: median {h['median']:.2f} s (min {h['min']:.2f}, "
        f"max {h['max']:.2f}); first served through the balancer: median {s['median']:.2f} s",
        f"  error rate through the balancer: {res['window_failed']}/{res['window_requests']} "
        f"= {res['window_error_rate']:.4f}",
    ]
    return lines


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="failover runs, each on a fresh cluster")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (overhead)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per concurrent block")
    p.add_argument("--seq-duration", type=float, default=1.0, help="seconds per sequential block")
    p.add_argument("--rounds", type=int, default=3, help="interleaved overhead rounds")
    p.add_argument("--clients", type=int, default=4, help="looping clients during failover")
    p.add_argument("--pause", type=float, default=0.01, help="client pause between requests")
    p.add_argument("--tail", type=float, default=1.0, help="keep clients going after recovery")
    p.add_argument("--timeout", type=float, default=30.0, help="give up on a run after this")
    p.add_argument(
        "--stock-web-app",
        action="store_true",
        help="run web_app.py as it is (Nagle on: ~40 ms per keep-alive request)",
    )
    args = p.parse_args()
    res, loop_name = run(lambda: bench(args), args.uvloop)
    res["env"] = environment(loop_name)
    emit(res, args.json, report(res))


if __name__ == "__main__":
    main()
