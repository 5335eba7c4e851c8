"""`accord bus`: publish an event, tail a topic, and per-topic/group statistics, on the bus that
`--bus` names (`redis://…`, `nats://…`; default $ACCORD_BUS, else the cluster's NATS)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from .._errors import ConfigurationError
from ..bus import Delivery, connect
from ._common import JsonOpt, _json_arg, _run, _until_signalled, app, out
from ._logs import LogFormatOpt, setup_or_exit

bus_app = typer.Typer(
    help="The event bus: durable topics with consumer groups (JetStream or Redis Streams).",
    no_args_is_help=True,
)
app.add_typer(bus_app, name="bus")

BusOpt = Annotated[
    str | None,
    typer.Option("--bus", help="redis://host:port or nats://host:port. Default: $ACCORD_BUS, "
                 "else the cluster's NATS ($ACCORD_NATS or `accord up`)."),
]  # fmt: skip


def bus_url(url: str | None) -> str | None:
    return url or os.environ.get("ACCORD_BUS") or None


@bus_app.command("publish")
def publish(
    topic: Annotated[str, typer.Argument(help="Topic name.")],
    msgtype: Annotated[str, typer.Argument(help="Wire type name of the event, e.g. OrderPlaced.")],
    body: Annotated[str, typer.Argument(help="The event as a JSON object.")],
    key: Annotated[str | None, typer.Option("--key", help="Ordering key.")] = None,
    bus: BusOpt = None,
) -> None:
    """Publish one event; prints its id once the store confirmed it."""

    async def main() -> None:
        data = _json_arg(body)
        if not msgtype.replace("_", "").replace(".", "").isalnum():
            raise ConfigurationError(f"message type {msgtype!r} is not a type name")
        async with connect(bus_url(bus)) as b:
            ack = await b.publish_json(topic, msgtype, data, key=key)
        how = "durable" if ack.durable else f"loss window {ack.loss_window:g}s ({ack.fsync})"
        out.print(f"published {ack.id} to {topic} partition {ack.partition} ({how})")

    _run(main())


@bus_app.command("tail")
def tail(
    topic: Annotated[str, typer.Argument(help="Topic name.")],
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            help="Consume as a member of this group (default: a group of "
            "its own, starting from the oldest stored event, removed on exit).",
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("--count", help="Exit after this many events (0: until Ctrl-C).", min=0)
    ] = 0,
    bus: BusOpt = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
    log_format: LogFormatOpt = "text",
) -> None:
    """Print events as they are handled, one JSON line each (key, id, attempt, body); its own
    log lines go to stderr."""
    setup_or_exit(log_level, log_format)

    async def main() -> None:
        seen = 0
        done = asyncio.Event()

        async def show(msg: Any, d: Delivery) -> None:
            nonlocal seen
            line = {"key": d.key, "id": d.id, "attempt": d.attempt, "body": msg}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            seen += 1
            if count and seen >= count:
                done.set()

        async with connect(bus_url(bus)) as b:
            g = group or f"tail-{uuid.uuid4().hex[:8]}"
            sub = await b.subscribe(topic, group=g, handler=show, max_concurrency=1)
            try:
                if count:
                    await done.wait()
                else:
                    await _until_signalled()
            finally:
                await sub.stop()
                if group is None:  # a group of its own: not left behind (on Redis it would
                    await b.remove_group(topic, g)  # hold back trimming for good)

    _run(main())


@bus_app.command("stats")
def stats(bus: BusOpt = None, as_json: JsonOpt = False) -> None:
    """Per topic and group: published, pending, oldest pending age, redeliveries, dead letters."""

    async def main() -> None:
        async with connect(bus_url(bus)) as b:
            rows = await b.stats()
        if as_json:
            sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
            return
        table = Table(title=f"{len(rows)} topic/group(s)")
        for col in ("topic", "group", "published", "pending", "oldest pending", "redelivered",
                    "dead letters"):  # fmt: skip
            table.add_column(col)
        for r in rows:
            table.add_row(r.topic, r.group or "-", str(r.published), str(r.pending),
                          f"{r.oldest_pending_age:.1f}s", str(r.redeliveries),
                          str(r.dead_letters))  # fmt: skip
        out.print(table)

    _run(main())
