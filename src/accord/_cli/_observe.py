"""Watching a running cluster: `accord top` (a live terminal view, or one JSON snapshot) and
`accord dashboard` (the web dashboard). Both read through `accord.dashboard.Observer`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    ClusterOpt,
    JsonOpt,
    NatsOpt,
    _existing_cluster,
    _run,
    _until_signalled,
    app,
    out,
    print_error,
)
from ._logs import LogFormatOpt, setup_or_exit

if TYPE_CHECKING:
    from rich.console import RenderableType

    from ..dashboard import Observer


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: JsonOpt = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=60.0, help="Seconds between refreshes.")
    ] = 1.0,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
    log_format: LogFormatOpt = "text",
) -> None:
    """Live view: nodes (state, shards, activations, msgs/s, p99 turn, loop lag), hottest agent
    types, mailbox depth and dead letters, recent failure-detector transitions."""
    from ..dashboard import Observer
    from ..dashboard._top import render

    if as_json and not once:
        print_error("--json prints one snapshot: use it with --once")
        raise typer.Exit(2)
    setup_or_exit(log_level, log_format)  # on stderr: the view is drawn on stdout

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            observer = Observer(mesh)
            try:
                if not once:
                    await _live(observer, render, interval)
                    return
                # Rates are differences between two samples, so one snapshot takes two.
                await observer.snapshot()
                await asyncio.sleep(min(interval, 1.0))
                snap = await observer.snapshot()
            finally:
                await observer.close()
        if as_json:
            sys.stdout.write(json.dumps(snap) + "\n")
        else:
            out.print(render(snap))

    _run(main())


async def _live(
    observer: Observer, render: Callable[[dict[str, Any]], RenderableType], interval: float
) -> None:
    """Redraw every `interval` until SIGINT/SIGTERM; a failed snapshot ends the view."""
    from rich.live import Live

    first = render(await observer.snapshot())

    async def refresh(live: Live) -> None:
        while True:
            await asyncio.sleep(interval)
            live.update(render(await observer.snapshot()), refresh=True)

    with Live(first, console=out, screen=False, auto_refresh=False) as live:
        task = asyncio.ensure_future(refresh(live))
        stop = asyncio.ensure_future(_until_signalled())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
            stop.cancel()
        if task.done() and not task.cancelled():
            task.result()  # raises what ended the refresh (e.g. NotConnected)


@app.command()
def dashboard(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: a free port.")] = 8787,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; other than loopback only on purpose.")
    ] = "127.0.0.1",
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, max=1.0, help="Seconds between live updates.")
    ] = 0.5,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Refuse actions (dead-letter replay).")
    ] = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Serve the web dashboard (panels and a JSON API under /api/) of a running cluster."""
    from ..dashboard import Observer, Poller
    from ..dashboard._server import serving

    if not host.strip():
        print_error("--host must not be empty")
        raise typer.Exit(2)
    setup_or_exit(log_level, log_format)

    async def main() -> None:
        async with _existing_cluster(nats, cluster) as mesh:
            observer = Observer(mesh, watch_leases=True)
            try:
                async with serving(Poller(observer), host, port, interval=interval,
                                   read_only=read_only) as url:  # fmt: skip
                    out.print(f"accord dashboard of cluster {cluster} at [bold]{url}[/bold]"
                              "   # Ctrl-C to stop", highlight=False)  # fmt: skip
                    sys.stdout.flush()
                    if host not in ("127.0.0.1", "localhost", "::1"):
                        logging.getLogger("accord.dashboard").warning(
                            "bound to %s: anyone who reaches it can replay dead letters%s",
                            host, "" if not read_only else " (not: --read-only)",
                        )  # fmt: skip
                    await _until_signalled()
            finally:
                await observer.close()

    _run(main())
