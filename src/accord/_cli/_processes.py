"""Long-running commands: `accord node`, `accord up` (embedded server and node processes) and
`accord demo`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Annotated

import typer

from .._errors import ConfigurationError
from .._loops import running_loop_name
from ._common import (
    ClusterOpt,
    LoopOpt,
    NatsOpt,
    _run,
    _until_signalled,
    app,
    out,
    print_error,
    use_loop,
)
from ._logs import LogFormatOpt, setup_or_exit
from ._security import SyncOpt, check_sync, up_security

MetricsPortOpt = Annotated[
    int | None,
    typer.Option("--metrics-port", min=0, max=65535,
                 help="Serve /metrics, /healthz, /readyz here (0: any free port)."),
]  # fmt: skip


@app.command()
def node(
    app_ref: Annotated[
        str | None, typer.Option("--app", help="Module with agent classes (file or pkg.mod).")
    ] = None,
    nats: NatsOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name (unique).")] = None,
    cluster: ClusterOpt = "default",
    label: Annotated[
        list[str] | None, typer.Option("--label", help="key=value, repeatable.")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas", min=1, max=5, help="JetStream replicas (default: min(3, servers))."
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option("--http-port", min=1, max=65535, help="Serve the services' load balancer."),
    ] = None,
    http_host: Annotated[str, typer.Option("--http-host", help="Load balancer address.")] = (
        "127.0.0.1"
    ),
    advertise: Annotated[
        str, typer.Option("--advertise", help="Address peers use to reach replicas run here.")
    ] = "127.0.0.1",
    metrics_port: MetricsPortOpt = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address the metrics endpoint listens on.")
    ] = "127.0.0.1",
    adaptive: Annotated[
        bool, typer.Option("--adaptive", help="Co-locate chatty agents, rebalance agent counts.")
    ] = False,
    placement_round: Annotated[
        float,
        typer.Option("--placement-round", min=0.5, help="Seconds between placement rounds."),
    ] = 20.0,
    sampling: Annotated[
        bool,
        typer.Option("--sampling/--no-sampling", help="Sample agent->agent messages (graph)."),
    ] = True,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    log_format: LogFormatOpt = "text",
    loop: LoopOpt = None,
) -> None:
    """Run one node process (agents from --app, plus the node agent for services) until
    SIGTERM/SIGINT."""
    from .._app import agent_classes, load_module
    from ..runtime._node import Node
    from ..runtime._settings import NodeSettings, PlacementSettings

    use_loop(loop)
    formatter = setup_or_exit(log_level, log_format)

    async def main() -> None:
        labels = {}
        for item in label or []:
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise ConfigurationError(f"--label must be key=value, got {item!r}")
            labels[k] = v
        classes = agent_classes(load_module(app_ref)) if app_ref else []
        settings = NodeSettings(
            cluster=cluster,
            labels=labels,
            replicas=replicas,
            http_port=http_port,
            http_host=http_host,
            advertise=advertise,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            adaptive=adaptive,
            placement=PlacementSettings(round_interval=placement_round, sample=sampling),
        )
        node = Node(classes, nats=nats, name=name, settings=settings)
        if formatter is not None:
            formatter.node = node.node_name
        async with node as n:
            logging.getLogger("accord").info(
                "node %s serving %s (event loop: %s)",
                n.node_name,
                ", ".join(sorted(n.specs)) or "no agent types",
                running_loop_name(),
            )
            await _until_signalled()

    _run(main())


@app.command()
def up(
    nodes: Annotated[int, typer.Option("--nodes", min=0, max=64, help="Node processes.")] = 3,
    app_ref: Annotated[str | None, typer.Option("--app", help="Module with agent classes.")] = None,
    cluster: ClusterOpt = "default",
    metrics: Annotated[
        bool, typer.Option("--metrics/--no-metrics", help="Serve each node's /metrics.")
    ] = True,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    log_format: LogFormatOpt = "text",
    tls: Annotated[bool, typer.Option("--tls", help="TLS with a generated CA.")] = False,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="Existing CA file.")] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="Server cert.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="Server key.")] = None,
    tls_verify: Annotated[
        bool, typer.Option("--tls-verify", help="Mutual TLS: clients present certificates.")
    ] = False,
    sync: SyncOpt = "default",
    loop: LoopOpt = None,
) -> None:
    """Start an embedded nats-server and N node processes; Ctrl-C stops everything.

    `--loop uvloop` runs this command and every node on uvloop (docs/operations.md).

    Each node serves /metrics, /healthz and /readyz on a free port (printed; `--no-metrics`: off).

    Authenticated: a credential is generated into the state directory (mode 0600) and nodes,
    the CLI and `accord.connect()` on this machine find it; see docs/security.md.

    The nats-server is supervised: if it dies it is restarted on the same port and data directory
    (see docs/operations.md); after repeated rapid failures `accord up` stops with exit code 1."""
    from ..engine._resolve import local_tls_file, state_dir, url_file
    from ..engine._server import EmbeddedServer
    from ..engine._supervisor import EngineSupervisor
    from ..testing import NodeProcess

    if nodes and not app_ref:
        print_error("--app is required when --nodes > 0")
        raise typer.Exit(2)
    use_loop(loop)
    setup_or_exit(log_level, log_format)
    sync_ = check_sync(sync)

    async def main() -> int:
        security, node_env = up_security(
            tls=tls or tls_verify, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            tls_verify=tls_verify, sync=sync_,
        )  # fmt: skip
        if app_ref:
            from .._app import agent_classes, load_module

            agent_classes(load_module(app_ref))  # fail fast on a bad app, before any process
        logs = state_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        gave_up = asyncio.Event()
        supervisor = EngineSupervisor(
            EmbeddedServer(
                state_dir() / "data", log_file=logs / "nats-server.log", security=security
            ),
            state_file=state_dir() / "engine.json",
            on_give_up=lambda _exc: loop.call_soon_threadsafe(gave_up.set),
        )
        url = await asyncio.to_thread(supervisor.start)
        procs: list[NodeProcess] = []
        try:
            url_file().parent.mkdir(parents=True, exist_ok=True)
            url_file().write_text(url)
            ports = _free_ports(nodes) if metrics else []
            for i in range(1, nodes + 1):
                assert app_ref is not None
                extra = ["--log-format", log_format]
                if metrics:
                    extra += ["--metrics-port", str(ports[i - 1])]
                procs.append(NodeProcess(url, app_ref, f"node-{i}", cluster=cluster,
                                         log_dir=logs, extra_args=extra,
                                         env=node_env).start())  # fmt: skip
            out.print(f"accord is up: NATS at [bold]{url}[/bold], {nodes} node(s), logs in {logs}")
            for i, port in enumerate(ports, 1):
                out.print(f"  node-{i} metrics: http://127.0.0.1:{port}/metrics")
            out.print(f"  export ACCORD_NATS={url}   # Ctrl-C to stop")
            await _until_signalled_or(gave_up)
        finally:
            # Nodes first, by PID, while the engine still runs: they hand their shards off. With
            # the engine gone for good there is nobody to hand off to, so do not wait long.
            grace = 2.0 if supervisor.failure is not None else 15.0
            out.print("stopping nodes…")
            await asyncio.gather(*(asyncio.to_thread(p.stop, grace) for p in procs))
            await asyncio.to_thread(supervisor.stop)
            with contextlib.suppress(FileNotFoundError):
                url_file().unlink()
            local_tls_file().unlink(missing_ok=True)
            restarts = f" (nats-server restarted {supervisor.restarts} time(s))"
            out.print(f"stopped.{restarts if supervisor.restarts else ''}")
        if supervisor.failure is not None:
            print_error(f"EngineError: {supervisor.failure}")
            return 1
        return 0

    code = _run(main())
    if code:
        raise typer.Exit(code)


def _free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on loopback now (held open together, so never the same)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def _until_signalled_or(event: asyncio.Event) -> None:
    """Return on SIGINT/SIGTERM or once `event` is set."""
    waiters = [asyncio.ensure_future(_until_signalled()), asyncio.ensure_future(event.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@app.command()
def demo(
    app_ref: Annotated[
        str, typer.Option("--app", help="Demo app module.")
    ] = "examples/counter_app.py",
    agents: Annotated[int, typer.Option("--agents", min=1, max=100_000)] = 500,
    tls: Annotated[
        bool, typer.Option("--tls", help="Authenticated server with TLS (generated CA).")
    ] = False,
    loop: LoopOpt = None,
) -> None:
    """Embedded server + 3 nodes; traffic; SIGKILL one node; show failover; summary."""
    from .._demo import run_demo

    use_loop(loop)
    if not Path(app_ref).exists() and not app_ref.replace(".", "").replace("_", "").isalnum():
        print_error(f"demo app {app_ref!r} not found; run from the repository root or pass --app")
        raise typer.Exit(2)
    code = _run(run_demo(app_ref, agents, out, tls=tls))
    raise typer.Exit(code)
