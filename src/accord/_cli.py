"""The `accord` command line: run clusters and nodes, talk to agents, inspect the cluster.

Every command turns bad input and runtime failures into one clear line on stderr and a non-zero
exit code (2: bad input, 1: runtime failure) — never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from ._errors import AccordError, ConfigurationError
from ._ids import AgentId

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="accord: a distributed runtime for agents on NATS JetStream.",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error line, never wrapped mid-message
T = TypeVar("T")

NatsOpt = Annotated[
    str | None,
    typer.Option(
        "--nats", help="NATS URL(s), comma-separated. Default: $ACCORD_NATS or `accord up`."
    ),
]
ClusterOpt = Annotated[str, typer.Option("--cluster", help="Cluster name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, mapping every failure to a one-line error and exit code."""
    try:
        return asyncio.run(coro)
    except ConfigurationError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except AccordError as exc:
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _json_arg(text: str) -> bytes:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"message body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError("message body must be a JSON object, e.g. '{\"by\": 1}'")
    return json.dumps(value).encode()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _until_signalled(on_signal: Callable[[], Awaitable[None]] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if on_signal is not None:
        await on_signal()


# -- node and cluster processes ---------------------------------------------------------------


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
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run one node process (agents from --app, plus the node agent for services) until
    SIGTERM/SIGINT."""
    from ._app import agent_classes, load_module
    from ._node import Node
    from ._settings import NodeSettings

    _setup_logging(log_level)

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
        )
        async with Node(classes, nats=nats, name=name, settings=settings) as n:
            logging.getLogger("accord").info(
                "node %s serving %s", n.node_name, ", ".join(sorted(n.specs)) or "no agent types"
            )
            await _until_signalled()

    _run(main())


@app.command()
def up(
    nodes: Annotated[int, typer.Option("--nodes", min=0, max=64, help="Node processes.")] = 3,
    app_ref: Annotated[str | None, typer.Option("--app", help="Module with agent classes.")] = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Start an embedded nats-server and N node processes; Ctrl-C stops everything."""
    from ._connect import state_dir, url_file
    from ._server import EmbeddedServer
    from .testing import NodeProcess

    if nodes and not app_ref:
        err.print("[red]error:[/red] --app is required when --nodes > 0", highlight=False)
        raise typer.Exit(2)

    async def main() -> None:
        if app_ref:
            from ._app import agent_classes, load_module

            agent_classes(load_module(app_ref))  # fail fast on a bad app, before any process
        data = state_dir() / "data"
        server = EmbeddedServer(data)
        url = await asyncio.to_thread(server.start)
        procs: list[NodeProcess] = []
        try:
            url_file().parent.mkdir(parents=True, exist_ok=True)
            url_file().write_text(url)
            logs = state_dir() / "logs"
            for i in range(1, nodes + 1):
                assert app_ref is not None
                procs.append(NodeProcess(url, app_ref, f"node-{i}", cluster=cluster,
                                         log_dir=logs).start())  # fmt: skip
            out.print(f"accord is up: NATS at [bold]{url}[/bold], {nodes} node(s), logs in {logs}")
            out.print(f"  export ACCORD_NATS={url}   # Ctrl-C to stop")
            await _until_signalled()
        finally:
            out.print("stopping nodes…")
            await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
            await asyncio.to_thread(server.stop)
            with contextlib.suppress(FileNotFoundError):
                url_file().unlink()
            out.print("stopped.")

    _run(main())


# -- talking to agents ------------------------------------------------------------------------


@app.command()
def ask(
    target: Annotated[str, typer.Argument(help="Agent id, type/key.")],
    msg_type: Annotated[str, typer.Argument(help="Message type name, e.g. Increment.")],
    body: Annotated[str, typer.Argument(help="Message as a JSON object.")] = "{}",
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    timeout: Annotated[float, typer.Option("--timeout", min=0.001)] = 10.0,
) -> None:
    """Ask an agent and print its reply as JSON."""

    async def main() -> None:
        data = _json_arg(body)
        AgentId.parse(target)  # bad input first, before any connection
        async with _existing_cluster(nats, cluster) as mesh:
            reply = await mesh.ask_json(target, msg_type, data, timeout=timeout)
        out.print_json(json.dumps(reply))

    _run(main())


@app.command()
def tell(
    target: Annotated[str, typer.Argument(help="Agent id, type/key.")],
    msg_type: Annotated[str, typer.Argument(help="Message type name.")],
    body: Annotated[str, typer.Argument(help="Message as a JSON object.")] = "{}",
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Send a message to an agent without waiting (at-most-once)."""

    async def main() -> None:
        data = _json_arg(body)
        AgentId.parse(target)
        async with _existing_cluster(nats, cluster) as mesh:
            await mesh.tell_json(target, msg_type, data)
        out.print("sent")

    _run(main())


@app.command()
def publish(
    topic_type: Annotated[str, typer.Argument(help="Topic type.")],
    source: Annotated[str, typer.Argument(help="Topic source: becomes the agent key.")],
    msg_type: Annotated[str, typer.Argument(help="Message type name.")],
    body: Annotated[str, typer.Argument(help="Message as a JSON object.")] = "{}",
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Publish on a topic: every subscribed agent type gets it, keyed by SOURCE."""

    async def main() -> None:
        data = _json_arg(body)
        async with _existing_cluster(nats, cluster) as mesh:
            n = await mesh.publish_json(topic_type, source, msg_type, data)
        out.print(f"published to {n} subscribed agent type(s)")

    _run(main())


# -- inspecting -------------------------------------------------------------------------------


@app.command()
def status(nats: NatsOpt = None, cluster: ClusterOpt = "default", as_json: JsonOpt = False) -> None:
    """Nodes, shard owners and epochs, and recent failure-detector transitions."""
    from ._status import cluster_status

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            st = await cluster_status(mesh)
        if as_json:
            sys.stdout.write(json.dumps(st) + "\n")
            return
        _print_status(st)

    _run(main())


def _print_status(st: dict[str, Any]) -> None:
    nodes = Table(
        title=f"cluster {st['cluster']} — {st['num_shards']} shards, lease TTL {st['lease_ttl']}s"
    )
    for col in ("node", "state", "shards", "pid"):
        nodes.add_column(col)
    for n in st["nodes"]:
        color = "green" if n["state"] == "alive" else "yellow" if n["alive"] else "red"
        nodes.add_row(
            n["name"], f"[{color}]{n['state']}[/{color}]", str(n["shards"]), str(n["pid"])
        )
    out.print(nodes)
    unowned = st["num_shards"] - len(st["shards"])
    owners = ", ".join(f"{s['shard']}→{s['owner']}@{s['epoch']}" for s in st["shards"][:16])
    more = " …" if len(st["shards"]) > 16 else ""
    out.print(f"shards: {owners}{more}  ({unowned} unowned)")
    if st["history"]:
        hist = Table(title=f"recent failure-detector transitions (seen by {st['reporter']})")
        for col in ("time", "node", "from", "to", "reason"):
            hist.add_column(col)
        for t in st["history"][-10:]:
            hist.add_row(time.strftime("%H:%M:%S", time.localtime(t["at"])), t["node"], t["old"],
                         t["new"], t["reason"])  # fmt: skip
        out.print(hist)


@app.command()
def leases(nats: NatsOpt = None, cluster: ClusterOpt = "default", as_json: JsonOpt = False) -> None:
    """Named leases: holder, fencing token, TTL, last renewal."""

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            held = await mesh._keeper().list()
        if as_json:
            sys.stdout.write(msgspec.json.encode(held).decode() + "\n")
            return
        table = Table(title=f"{len(held)} lease(s)")
        for col in ("name", "holder", "token", "ttl", "renewed"):
            table.add_column(col)
        for info in held:
            ago = max(0.0, time.time() - info.renewed_at)
            table.add_row(
                info.name, info.holder, str(info.token), f"{info.ttl}s", f"{ago:.1f}s ago"
            )
        out.print(table)

    _run(main())


dlq_app = typer.Typer(
    help="Dead letters: messages that failed max_deliver times.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


@contextlib.asynccontextmanager
async def _existing_cluster(nats: str | None, cluster: str) -> AsyncIterator[Any]:
    """A client of a running cluster; reading commands never start an embedded server."""
    from ._connect import connect, running_url

    if nats is None and running_url() is None:
        raise ConfigurationError(
            "no cluster given: pass --nats URL, set ACCORD_NATS, or run `accord up`"
        )
    async with connect(nats, cluster=cluster) as mesh:
        yield mesh


@contextlib.asynccontextmanager
async def _dead_letters(nats: str | None, cluster: str) -> AsyncIterator[Any]:
    from .delivery._dlq import DeadLetters

    async with _existing_cluster(nats, cluster) as mesh:
        js = mesh._transport.js
        yield DeadLetters(js, mesh.names, mesh.config.num_shards)


@dlq_app.command("list")
def dlq_list(
    nats: NatsOpt = None, cluster: ClusterOpt = "default", as_json: JsonOpt = False
) -> None:
    """List dead letters (sequence, target, type, deliveries, reason)."""

    async def main() -> None:
        async with _dead_letters(nats, cluster) as dlq:
            entries = await dlq.list()
        if as_json:
            sys.stdout.write(msgspec.json.encode(entries).decode() + "\n")
            return
        table = Table(title=f"{len(entries)} dead letter(s)")
        for col in ("seq", "target", "type", "deliveries", "failed at", "reason"):
            table.add_column(col)
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.failed_at))
            table.add_row(str(e.seq), e.target, e.type, str(e.deliveries), when, e.reason)
        out.print(table)

    _run(main())


@dlq_app.command("show")
def dlq_show(
    seq: Annotated[int, typer.Argument(help="Sequence number from `accord dlq list`.", min=1)],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Show one dead letter with its message body (JSON)."""

    async def main() -> None:
        async with _dead_letters(nats, cluster) as dlq:
            entry = await dlq.show(seq)
        out.print_json(msgspec.json.encode(entry).decode())

    _run(main())


@dlq_app.command("replay")
def dlq_replay(
    seq: Annotated[
        list[int] | None, typer.Argument(help="Sequence numbers (default: --all).")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Deliver dead letters again (into their mailbox, under a new message id)."""

    async def main() -> None:
        if not seq and not replay_all:
            raise ConfigurationError("give sequence numbers or --all")
        async with _dead_letters(nats, cluster) as dlq:
            targets = seq or [e.seq for e in await dlq.list()]
            for s in targets:
                new_id = await dlq.replay(s)
                out.print(f"replayed {s} as message {new_id}")

    _run(main())


@dlq_app.command("purge")
def dlq_purge(
    seq: Annotated[int | None, typer.Argument(help="One sequence number (default: --all).")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Purge every dead letter.")] = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Delete dead letters for good."""

    async def main() -> None:
        if seq is None and not purge_all:
            raise ConfigurationError("give a sequence number or --all")
        async with _dead_letters(nats, cluster) as dlq:
            n = await dlq.purge(seq)
        out.print(f"purged {n} dead letter(s)")

    _run(main())


@app.command()
def demo(
    app_ref: Annotated[
        str, typer.Option("--app", help="Demo app module.")
    ] = "examples/counter_app.py",
    agents: Annotated[int, typer.Option("--agents", min=1, max=100_000)] = 500,
) -> None:
    """Embedded server + 3 nodes; traffic; SIGKILL one node; show failover; summary."""
    from ._demo import run_demo

    if not Path(app_ref).exists() and not app_ref.replace(".", "").replace("_", "").isalnum():
        err.print(f"[red]error:[/red] demo app {app_ref!r} not found; run from the repository root "
                  "or pass --app", highlight=False)  # fmt: skip
        raise typer.Exit(2)
    code = _run(run_demo(app_ref, agents, out))
    raise typer.Exit(code)


def main() -> None:
    from . import _cli_services  # noqa: F401  (registers the services commands)

    try:
        app()
    except msgspec.MsgspecError as exc:  # defensive: never show a traceback
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)
