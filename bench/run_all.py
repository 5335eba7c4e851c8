"""Run every benchmark (each in its own process, with --json) and print a summary table.

    python bench/run_all.py [--json] [--no-uvloop] [--save results.json]

Each benchmark runs with a marker in its environment; afterwards every live process carrying the
marker (a leaked nats-server, node or responder) is reported and counted as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MARKER = "ACCORD_BENCH_RUN"


def strays(tag: str) -> list[str]:
    """Live processes whose environment carries MARKER=tag (started by that benchmark)."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name} {cmd.strip()}")
        except OSError:
            continue
    return found


def run_one(script: str, extra: list[str], timeout: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex
    cmd = [sys.executable, str(BENCH / script), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, MARKER: tag}
    )
    elapsed = time.perf_counter() - t0
    time.sleep(0.5)  # let children that are exiting finish
    leaked = strays(tag)
    out: dict[str, Any] = {
        "command": " ".join(["python", f"bench/{script}", *extra, "--json"]),
        "exit_code": proc.returncode,
        "wall_s": round(elapsed, 1),
        "stray_processes": leaked,
    }
    if proc.returncode == 0:
        out["result"] = json.loads(proc.stdout)
    else:
        out["stderr_tail"] = proc.stderr[-2000:]
    return out


def rows(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(benchmark, metric, accord, baseline, ratio, target, status) rows of one result."""
    b = r["benchmark"]
    out = []

    def st(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if b == "ask_remote":
        a, w = r["accord"], r["raw"]
        out += [
            (name, "seq ask p50 (us)", f"{a['seq_p50_us']:.0f}", f"{w['seq_p50_us']:.0f}",
             f"{r['p50_ratio']:.2f}", "<= 1.3", st(r["p50_ratio"] <= 1.3)),
            (name, "seq ask p99 (us)", f"{a['seq_p99_us']:.0f}", f"{w['seq_p99_us']:.0f}",
             f"{r['p99_ratio']:.2f}", "-", "-"),
            (name, "64-in-flight ops/s", f"{a['tput_ops_s']:.0f}", f"{w['tput_ops_s']:.0f}",
             f"{r['throughput_ratio']:.2f}", ">= 0.7", st(r["throughput_ratio"] >= 0.7)),
        ]  # fmt: skip
    elif b == "ask_local":
        for m, ratio in r["ratios"].items():
            out.append((name, f"{m} ops/s", f"{r['accord'][f'{m}_ops_s']:.0f}",
                        f"{r['raw'][f'{m}_ops_s']:.0f}", f"{ratio:.2f}", ">= 0.3",
                        st(ratio >= 0.3)))  # fmt: skip
    elif b == "failover":
        ttl = r["lease_ttl_s"]
        runs = ", ".join(f"{x['agents_s']:.2f}" for x in r["runs"])
        out += [
            (name, "all shards owned (s)", f"{r['median_shards_s']:.2f}", "-", "-", "-", "-"),
            (name, f"all agents answer (s) [{runs}]", f"{r['median_agents_s']:.2f}",
             f"TTL+1 = {ttl + 1}", f"{r['ratio']:.2f}", "<= 1", st(r["ratio"] <= 1)),
        ]  # fmt: skip
    elif b == "failover_matrix":
        for x in r["rows"]:
            phase = {"kill": "kill", "heal": "heal"}.get(x["phase"], x["phase"].split()[0])
            metric = f"{x['fault']}/{phase} {x['view']} {x['strategy']} {x['op']} (s)"
            restored = "-" if x["restored_s"] is None else f"{x['restored_s']:.2f}"
            ratio = "-" if x["ratio"] is None else f"{x['ratio']:.2f}"
            target = "-" if x["target"] is None else f"<= {x['target']:g}"
            out.append((name, metric, restored, x["baseline"], ratio, target, x["status"]))
        for fault, fr in r["faults"].items():
            if "error" in fr or "skipped" in fr:
                status = "skipped" if "skipped" in fr else "FAILED"
                out.append((name, f"{fault}: {fr.get('skipped') or fr.get('error')}"[:90],
                            "-", "-", "-", "-", status))  # fmt: skip
    elif b == "node_footprint":
        n, w = r["node"], r["bare"]
        out += [
            (name, "start-up (s)", f"{n['startup_s']:.2f}", f"{w['startup_s']:.2f}",
             f"{r['startup_ratio']:.2f}", "-", "-"),
            (name, "idle RSS (MiB)", f"{n['rss_mib']:.1f}", f"{w['rss_mib']:.1f}",
             f"{r['rss_ratio']:.2f}", "-", "-"),
            (name, "idle CPU (% of a core)", f"{n['idle_cpu_pct']:.1f}",
             f"{w['idle_cpu_pct']:.1f}", "-", "-", "-"),
        ]  # fmt: skip
    elif b == "diag_hotpath":
        out += [
            (name, "client CPU us/ask (stubbed net)", f"{r['client_us_per_ask']:.2f}",
             f"{r['client_baseline_us']:.2f}", f"{r['client_ratio']:.1f}", "-", "-"),
            (name, "node CPU us/msg (stubbed net)", f"{r['node_us_per_msg']:.2f}",
             f"{r['node_baseline_us']:.2f}", f"{r['node_ratio']:.1f}", "-", "-"),
        ]  # fmt: skip
    elif b == "durable":
        t, a = r["tell"], r["ask"]
        out.append(
            (name, "at_least_once tell, N msgs/s", f"{t['accord']['msgs_s']:.0f}",
             f"{t['raw']['msgs_s']:.0f}", f"{t['ratio']:.2f}", ">= 0.7", st(t["ratio"] >= 0.7))
        )  # fmt: skip
        c = a["counter"]
        for kind in ("ledger", "slow_ledger"):
            k, rr = a[kind], a[f"{kind}_vs_counter"]
            out += [
                (name, f"{kind} ask p50 (us) vs counter", f"{k['seq_p50_us']:.0f}",
                 f"{c['seq_p50_us']:.0f}", f"{rr['p50_ratio']:.2f}", "-", "-"),
                (name, f"{kind} ask 64-in-flight ops/s vs counter", f"{k['tput_ops_s']:.0f}",
                 f"{c['tput_ops_s']:.0f}", f"{rr['tput_ratio']:.2f}", "-", "-"),
            ]  # fmt: skip
    elif b == "services_failover":
        o, d = r["overhead"], r["overhead"]["direct"]
        conc = f"{r['params']['concurrency']}-in-flight req/s"
        for side, key in (("balancer", "ratios"), ("bare_proxy", "bare_ratios")):
            x, rr = o[side], o[key]
            out += [
                (name, f"{side} vs direct: seq GET p50 (us)", f"{x['seq_p50_us']:.0f}",
                 f"{d['seq_p50_us']:.0f}", f"{rr['seq_p50']:.2f}", "-", "-"),
                (name, f"{side} vs direct: {conc}", f"{x['tput_req_s']:.0f}",
                 f"{d['tput_req_s']:.0f}", f"{rr['throughput']:.2f}", "-", "-"),
            ]  # fmt: skip
        runs = ", ".join(f"{x['healthy_s']:.2f}" for x in r["runs"])
        h = r["healthy_s"]
        out += [
            (name, f"replica healthy after SIGKILL (s) [{runs}]", f"{h['median']:.2f}", "-", "-",
             "-", "-"),
            (name, "GETs failed through balancer in failover", str(r["window_failed"]),
             f"of {r['window_requests']}", f"{r['window_error_rate']:.4f}", "-", "-"),
        ]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-uvloop", action="store_true", help="skip the uvloop variants")
    p.add_argument("--save", help="also write the combined JSON to this file")
    args = p.parse_args()
    try:
        import uvloop  # noqa: F401

        has_uvloop = not args.no_uvloop
    except ImportError:
        has_uvloop = False
    plan: list[tuple[str, str, list[str]]] = [("ask_remote", "ask_remote.py", [])]
    timeouts = {"failover_matrix": 480.0}  # 4 faults, 2 of them in a 3-server network lab
    if has_uvloop:
        plan.append(("ask_remote+uvloop", "ask_remote.py", ["--uvloop"]))
    plan.append(("ask_local", "ask_local.py", []))
    if has_uvloop:
        plan.append(("ask_local+uvloop", "ask_local.py", ["--uvloop"]))
    plan += [
        ("failover", "failover.py", []),
        ("failover_matrix", "failover_matrix.py", []),
        ("node_footprint", "node_footprint.py", []),
        ("diag_hotpath", "diag_hotpath.py", []),
        ("durable", "durable.py", []),
        ("services_failover", "services_failover.py", []),
    ]

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name, script, extra in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(script, extra, timeout=timeouts.get(name, 120.0))
    total = time.perf_counter() - t0

    failed = [n for n, r in results.items() if r["exit_code"] != 0 or r["stray_processes"]]
    combined = {"results": results, "total_wall_s": round(total, 1), "failed": failed}
    if args.save:
        Path(args.save).write_text(json.dumps(combined, indent=2, sort_keys=True))
    if args.json:
        print(json.dumps(combined, indent=2, sort_keys=True))
    else:
        table = [("benchmark", "metric", "accord", "baseline", "ratio", "target", "status")]
        for name, r in results.items():
            if "result" in r:
                table += rows(name, r["result"])
            else:
                table.append((name, "FAILED", "-", "-", "-", "-", f"exit {r['exit_code']}"))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for i, row in enumerate(table):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print()
        for name, r in results.items():
            leak = f"; STRAY PROCESSES: {r['stray_processes']}" if r["stray_processes"] else ""
            print(f"{name}: exit {r['exit_code']}, {r['wall_s']} s{leak}  ({r['command']})")
            if r["exit_code"] != 0:
                print(r.get("stderr_tail", ""))
        print(f"total {total:.0f} s; {'all clean' if not failed else 'FAILED: ' + str(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
