"""What every `accord` command shares: the typer app, consoles, common options, and `_run`, which
turns bad input and runtime failures into one clear line on stderr and a non-zero exit code
(2: bad input, 1: runtime failure) — never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .._errors import AccordError, ConfigurationError
from .._loops import LOOP_ENV, loop_factory, loop_name

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="accord: a distributed runtime for agents on NATS JetStream.",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error line, never wrapped mid-message


def print_error(text: str) -> None:
    """`error: <text>` on stderr, one line. `text` is printed as it is: square brackets in it
    (`pip install 'accord[fast]'`, a subject, user input) are not read as rich markup."""
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False)


def print_warning(text: str) -> None:
    """`warning: <text>` on stderr, like `print_error`."""
    err.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False)


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
TlsCaOpt = Annotated[
    str | None,
    typer.Option("--tls-ca", help="CA file that signed the servers' certificates."),
]
TlsCertOpt = Annotated[
    str | None, typer.Option("--tls-cert", help="Client certificate (mutual TLS).")
]
TlsKeyOpt = Annotated[str | None, typer.Option("--tls-key", help="Key of --tls-cert.")]
#: Where each connection option lands: the environment, so that node processes started by a
#: command (`accord up`) inherit it, and `resolve_credentials` reads it like $ACCORD_CREDS.
CONNECTION_ENV = {"creds": "ACCORD_CREDS", "tls_ca": "ACCORD_TLS_CA",
                  "tls_cert": "ACCORD_TLS_CERT", "tls_key": "ACCORD_TLS_KEY"}  # fmt: skip


def use_connection_options(**given: str | None) -> None:
    """Apply `--creds/--tls-ca/--tls-cert/--tls-key` (those given; each a file, else exit 2):
    they override $ACCORD_CREDS etc. and the local `accord up` cluster's files. Given both
    before and after the subcommand, the later (the subcommand's) wins."""
    import os
    from pathlib import Path

    for key, value in given.items():
        if value is not None:
            if not Path(value).expanduser().is_file():
                print_error(f"{value}: no such file")
                raise typer.Exit(2)
            os.environ[CONNECTION_ENV[key]] = str(Path(value).expanduser().resolve())


@app.callback()
def _global(
    creds: CredsOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """accord: a distributed runtime for agents on NATS JetStream."""
    use_connection_options(creds=creds, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


def _connection_params() -> list[inspect.Parameter]:
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
        for name, ann in (("creds", CredsOpt), ("tls_ca", TlsCaOpt), ("tls_cert", TlsCertOpt),
                          ("tls_key", TlsKeyOpt))
    ]  # fmt: skip


def _with_connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a command) also taking the connection options, applied before it runs."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        use_connection_options(**{k: kwargs.pop(k, None) for k in CONNECTION_ENV})
        return fn(*args, **kwargs)

    params = list(sig.parameters.values()) + _connection_params()
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def add_connection_options(typer_app: typer.Typer) -> None:
    """Give every command (and group callback) of `typer_app` that talks to a cluster (it has a
    `--nats` or `--bus` option) its own `--creds/--tls-ca/--tls-cert/--tls-key`, so they work
    after the subcommand as well as before it. A command with options of those names (`accord
    up`: its server's PKI) keeps its own. Call once, after every command is registered."""

    def wrap(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None
        names = inspect.signature(fn).parameters
        if not ({"nats", "bus"} & set(names)) or set(CONNECTION_ENV) & set(names):
            return fn
        return _with_connection_options(fn)

    for cmd in typer_app.registered_commands:
        cmd.callback = wrap(cmd.callback)
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        if sub is None:
            continue
        if sub.registered_callback is not None:
            sub.registered_callback.callback = wrap(sub.registered_callback.callback)
        add_connection_options(sub)


#: `--loop` (uvloop comes with the `fast` extra): the loop of this command, and through
#: $ACCORD_LOOP of the node processes it starts (`accord up`).
LoopOpt = Annotated[
    str | None,
    typer.Option(
        "--loop",
        help="Event loop: asyncio or uvloop (pip install 'accord[fast]'). "
        "Default: $ACCORD_LOOP, else asyncio.",
    ),
]


def use_loop(name: str | None) -> None:
    """Run this command (and the node processes it starts) on the event loop `name` (None: keep
    $ACCORD_LOOP or the default). A name that is not one of `_loops.LOOPS`, or uvloop when it is not
    installed, is bad input: one line and exit 2."""
    if name is None:
        return
    try:
        loop_factory(name)
    except ConfigurationError as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
    os.environ[LOOP_ENV] = name.strip().lower()


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, mapping every failure to a one-line error and exit code."""
    try:
        try:
            factory = loop_factory(loop_name())
        except ConfigurationError:
            coro.close()  # never started: no "was never awaited" warning
            raise
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    except ConfigurationError as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
    except AccordError as exc:
        print_error(f"{type(exc).__name__}: {exc}")
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
