"""Talking to agents from the shell: `accord ask`, `tell`, `publish` (JSON messages)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .._ids import AgentId
from ._common import ClusterOpt, NatsOpt, _existing_cluster, _json_arg, _run, app, out


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
