"""CLI commands for services and promises: deploy, services [explain], undeploy, logs, promises."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from ._common import ClusterOpt, JsonOpt, NatsOpt, _existing_cluster, _run, app, out

services_app = typer.Typer(
    help="Deployed services: replicas, node, pid, port, health, restarts.",
    invoke_without_command=True,
)
app.add_typer(services_app, name="services")


@app.command()
def deploy(
    spec_file: Annotated[str, typer.Argument(help="Service spec (TOML).")],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Deploy (or update) a service from a spec file; conflicting promises are refused."""
    from ..services import deploy as do_deploy
    from ..services import load_spec

    async def main() -> None:
        spec = load_spec(spec_file)
        async with _existing_cluster(nats, cluster) as mesh:
            rev = await do_deploy(mesh, spec)
        out.print(f"deployed {spec.name} (revision {rev}): {spec.replicas} replica(s), "
                  f"policy {spec.placement.policy}")  # fmt: skip

    _run(main())


@app.command()
def undeploy(
    name: Annotated[str, typer.Argument(help="Service name.")],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Remove a service: its replicas are stopped and its promises withdrawn."""
    from ..services import undeploy as do_undeploy

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            await do_undeploy(mesh, name)
        out.print(f"undeployed {name}")

    _run(main())


@services_app.callback()
def services_list(
    ctx: typer.Context,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    as_json: JsonOpt = False,
) -> None:
    """List services and their instances."""
    if ctx.invoked_subcommand is not None:
        return
    from ..services import services

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            svcs = await services(mesh)
        if as_json:
            sys.stdout.write(msgspec.json.encode(svcs).decode() + "\n")
            return
        table = Table(title=f"{len(svcs)} service(s)")
        for col in ("service", "replica", "role", "node", "pid", "port", "health", "restarts"):
            table.add_column(col)
        for svc in svcs:
            if not svc["instances"]:
                table.add_row(svc["name"], "-", "-", "-", "-", "-", "not running", "-")
            for i in svc["instances"]:
                health = i["status"] if i["node_alive"] else f"{i['status']} (node gone)"
                table.add_row(svc["name"], str(i["index"]), i["role"], i["node"],
                              str(i["pid"] or "-"), str(i["port"] or "-"), health,
                              str(i["restarts"]))  # fmt: skip
        out.print(table)

    _run(main())


@services_app.command("explain")
def services_explain(
    name: Annotated[str, typer.Argument(help="Service name.")],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    as_json: JsonOpt = False,
) -> None:
    """Why each replica of a service is where it is."""
    from ..services import explain

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            svc = await explain(mesh, name)
        if as_json:
            sys.stdout.write(msgspec.json.encode(svc).decode() + "\n")
            return
        when = time.strftime("%H:%M:%S", time.localtime(svc["decided_at"] or 0))
        out.print(f"{name}: policy {svc['policy']}, decided by {svc['decided_by']} at {when}")
        for s in svc["placement"]:
            out.print(f"  slot {s['index']} ({s['role']}) -> {s['node'] or 'unplaced'}: "
                      f"{s['reason']}", highlight=False)  # fmt: skip

    _run(main())


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Service name.")],
    last: Annotated[int, typer.Option("--last", min=1, max=5000)] = 100,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """The last output lines of every replica of a service."""
    from ..services import logs as read_logs

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            lines = await read_logs(mesh, name, last)
        for ln in lines:
            when = time.strftime("%H:%M:%S", time.localtime(ln.at))
            sys.stdout.write(f"{when} {ln.service}/{ln.index}@{ln.node} {ln.line}\n")

    _run(main())


@app.command()
def promises(
    nats: NatsOpt = None, cluster: ClusterOpt = "default", as_json: JsonOpt = False
) -> None:
    """Promises, their latest assessment, and reputation (kept ratio) per promiser."""
    from ..services import promises_report

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            report: dict[str, Any] = await promises_report(mesh)
        if as_json:
            sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
            return
        table = Table(title=f"{len(report['promises'])} promise(s)")
        for col in ("promise", "promiser", "kind", "outcome", "evidence"):
            table.add_column(col)
        for p in report["promises"]:
            table.add_row(p["name"], p["promiser"], p["kind"], p["outcome"], p["evidence"])
        out.print(table)
        rep = Table(title="reputation (kept ratio, last 5 min)")
        for col in ("promiser", "kept", "assessed", "ratio"):
            rep.add_column(col)
        for who, r in report["reputation"].items():
            rep.add_row(who, str(r["kept"]), str(r["assessed"]), f"{r['ratio']:.2f}")
        out.print(rep)

    _run(main())
