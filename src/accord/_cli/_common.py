"""What every `accord` command shares: the typer app, consoles, common options, and `_run`, which
turns bad input and runtime failures into one clear line on stderr and a non-zero exit code
(2: bad input, 1: runtime failure) — never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from .._errors import AccordError, ConfigurationError

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
CredsOpt = Annotated[
    str | None,
    typer.Option(
        "--creds",
        help="Credentials file (accord creds create, or a NATS .creds). Default: $ACCORD_CREDS, "
        "then the local `accord up` cluster's.",
    ),
]


@app.callback()
def _global(
    creds: CredsOpt = None,
    tls_ca: Annotated[
        str | None,
        typer.Option("--tls-ca", help="CA file that signed the servers' certificates."),
    ] = None,
) -> None:
    """accord: a distributed runtime for agents on NATS JetStream."""
    import os
    from pathlib import Path

    # Through the environment, so node processes `accord up` starts inherit them as well.
    for value, env in ((creds, "ACCORD_CREDS"), (tls_ca, "ACCORD_TLS_CA")):
        if value is not None:
            if not Path(value).expanduser().is_file():
                err.print(f"[red]error:[/red] {value}: no such file", highlight=False)
                raise typer.Exit(2)
            os.environ[env] = str(Path(value).expanduser().resolve())


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


@contextlib.asynccontextmanager
async def _existing_cluster(nats: str | None, cluster: str) -> AsyncIterator[Any]:
    """A client of a running cluster; reading commands never start an embedded server."""
    from .._connect import connect
    from ..engine._resolve import running_url

    if nats is None and running_url() is None:
        raise ConfigurationError(
            "no cluster given: pass --nats URL, set ACCORD_NATS, or run `accord up`"
        )
    async with connect(nats, cluster=cluster) as mesh:
        yield mesh
