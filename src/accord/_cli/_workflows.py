"""`accord workflows`: list runs (from the run index), show one run's journal, signal, retry or
cancel a run. Bad input (unknown id, malformed JSON, unknown state) is one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Coroutine
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from .._errors import BadRequest, ConfigurationError, WorkflowNotFound
from .._ids import AgentId
from ..workflows._model import TERMINAL, WfCompensation, WfStep, WfStepFailed
from ._common import ClusterOpt, JsonOpt, NatsOpt, _existing_cluster, _json_arg, _run, app, out

workflows = typer.Typer(
    help="Workflow runs: list, show, signal, retry, cancel.", invoke_without_command=True,
    no_args_is_help=False,
)  # fmt: skip
app.add_typer(workflows, name="workflows")
STATES = ("running", "waiting", *sorted(TERMINAL))


def _bad_input(coro: Coroutine[Any, Any, None]) -> None:
    """Run a command: an unknown run id, or a request the run refuses, is bad input (exit 2)."""

    async def main() -> None:
        try:
            await coro
        except (WorkflowNotFound, BadRequest) as exc:
            raise ConfigurationError(str(exc)) from None

    _run(main())


def _run_id(text: str) -> str:
    try:
        return str(AgentId.parse(text))
    except Exception:
        raise ConfigurationError(f"bad run id {text!r}: expected type/key") from None


@workflows.callback()
def list_runs(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option("--state", help=f"One of {', '.join(STATES)}.")
    ] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Workflow type.")] = None,
    as_json: JsonOpt = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """List workflow runs (the run index: state at start, end, cancel and retry)."""
    if ctx.invoked_subcommand is not None:
        return

    async def main() -> None:
        from ..workflows._monitor import list_runs as listed

        if state is not None and state not in STATES:
            raise ConfigurationError(f"unknown state {state!r}: one of {', '.join(STATES)}")
        async with _existing_cluster(nats, cluster) as mesh:
            runs = [
                r
                for r in await listed(mesh)
                if (state is None or r.state == state) and (type_ is None or r.type == type_)
            ]
        if as_json:
            out.print_json(msgspec.json.encode(runs).decode())
            return
        table = Table("run", "state", "steps", "attempts", "updated", "error")
        for r in runs:
            updated = time.strftime("%H:%M:%S", time.localtime(r.updated))
            table.add_row(r.id, r.state, str(r.steps_done), str(r.attempts), updated, r.error[:60])
        out.print(table)

    _run(main())


@workflows.command()
def show(
    run_id: Annotated[str, typer.Argument(help="Run id, type/key.")],
    as_json: JsonOpt = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Show a run: its status and its journal (each step, attempts, durations, errors)."""

    async def main() -> None:
        rid = _run_id(run_id)
        async with _existing_cluster(nats, cluster) as mesh:
            handle = mesh.workflow(rid)
            status = await handle.status()
            journal = await handle.journal()
        rows = _step_rows(journal.entries, journal.started_at)
        if as_json:
            doc = {"status": msgspec.to_builtins(status), "steps": rows,
                   "journal": [_entry(e) for e in journal.entries]}  # fmt: skip
            out.print_json(json.dumps(doc))
            return
        out.print(
            f"{status.id}: [bold]{status.state}[/bold]  steps {status.steps_done}  failed "
            f"attempts {status.attempts}  version {status.version}  {status.error}"
        )
        table = Table("step", "name", "outcome", "attempts", "took (s)", "error")
        for r in rows:
            table.add_row(str(r["n"]), str(r["name"]), str(r["outcome"]), str(r["attempts"]),
                          f"{r['took']:.3f}", str(r["error"])[:60])  # fmt: skip
        out.print(table)

    _bad_input(main())


def _entry(e: Any) -> Any:
    doc = msgspec.to_builtins(e)
    for k in ("input", "result", "body"):
        if k in doc and isinstance(getattr(e, k, None), bytes):
            with contextlib.suppress(msgspec.DecodeError):
                doc[k] = msgspec.msgpack.decode(getattr(e, k))
    return doc


def _step_rows(entries: list[Any], started: float) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    last = started
    for e in entries:
        if isinstance(e, (WfStep, WfStepFailed)):
            row = rows.setdefault(e.n, {"n": e.n, "name": e.name, "outcome": "", "attempts": 0,
                                        "took": 0.0, "error": ""})  # fmt: skip
            row["attempts"] += 1
            row["took"] += max(0.0, e.at - last) if e.at else 0.0
            last = e.at or last
            if isinstance(e, WfStep):
                row["outcome"] = "completed"
            else:
                row["outcome"], row["error"] = ("failed" if e.final else "retrying"), e.error
        elif isinstance(e, WfCompensation):
            undone = rows.get(e.n)
            if undone is not None:
                undone["outcome"] = "compensated" if e.ok else "compensation failed"
                undone["error"] = e.error or undone["error"]
    return [rows[n] for n in sorted(rows)]


@workflows.command()
def signal(
    run_id: Annotated[str, typer.Argument(help="Run id, type/key.")],
    msg_type: Annotated[str, typer.Argument(help="Signal message type name, e.g. Approve.")],
    body: Annotated[str, typer.Argument(help="Signal as a JSON object.")] = "{}",
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Send a signal to a run (kept until its `wait_signal` takes it)."""

    async def main() -> None:
        data = _json_arg(body)
        rid = _run_id(run_id)
        async with _existing_cluster(nats, cluster) as mesh:
            await mesh.workflow(rid).signal_json(msg_type, data)
        out.print("signalled")

    _bad_input(main())


@workflows.command()
def retry(
    run_id: Annotated[str, typer.Argument(help="Run id, type/key.")],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Go on with a failed or compensated run from its failed step (after fixing the cause)."""
    _bad_input(_act(run_id, nats, cluster, "retry"))


@workflows.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id, type/key.")],
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
) -> None:
    """Cancel a run (its completed steps' compensations run, then it ends `cancelled`)."""
    _bad_input(_act(run_id, nats, cluster, "cancel"))


async def _act(run_id: str, nats: str | None, cluster: str, action: str) -> None:
    """`retry` or `cancel` one run and print the state it is in afterwards."""
    rid = _run_id(run_id)
    async with _existing_cluster(nats, cluster) as mesh:
        handle = mesh.workflow(rid)
        status = await (handle.retry() if action == "retry" else handle.cancel())
    out.print(f"{status.id}: {status.state}")
