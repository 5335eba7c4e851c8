"""Inspecting a running cluster: `accord status`, `leases`, and the dead letters (`accord dlq`)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from .._errors import ConfigurationError
from ._common import ClusterOpt, JsonOpt, NatsOpt, _existing_cluster, _run, app, out, print_warning


@app.command()
def status(nats: NatsOpt = None, cluster: ClusterOpt = "default", as_json: JsonOpt = False) -> None:
    """Nodes, shard owners and epochs, and recent failure-detector transitions."""
    from .._status import cluster_status

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
    for col in ("node", "state", "shards", "pid", "agent types"):
        nodes.add_column(col)
    for n in st["nodes"]:
        color = "green" if n["state"] == "alive" else "yellow" if n["alive"] else "red"
        nodes.add_row(n["name"], f"[{color}]{n['state']}[/{color}]", str(n["shards"]),
                      str(n["pid"]), ", ".join(n.get("types", [])))  # fmt: skip
    out.print(nodes)
    unowned = st["num_shards"] - len(st["shards"])
    owners = ", ".join(f"{s['shard']}→{s['owner']}@{s['epoch']}" for s in st["shards"][:16])
    more = " …" if len(st["shards"]) > 16 else ""
    out.print(f"shards: {owners}{more}  ({unowned} unowned)")
    _print_replication(st.get("replication") or {})
    _print_pools(st.get("pools") or {})
    if st["history"]:
        hist = Table(title=f"recent failure-detector transitions (seen by {st['reporter']})")
        for col in ("time", "node", "from", "to", "reason"):
            hist.add_column(col)
        for t in st["history"][-10:]:
            hist.add_row(time.strftime("%H:%M:%S", time.localtime(t["at"])), t["node"], t["old"],
                         t["new"], t["reason"])  # fmt: skip
        out.print(hist)


def _print_pools(pools: dict[str, dict[str, Any]]) -> None:
    if not pools:
        return
    table = Table(title="worker pools (stateless types)")
    for col in ("type", "node", "in flight / max", "handled", "failed", "overloaded"):
        table.add_column(col)
    for agent_type, per_node in sorted(pools.items()):
        for node, c in sorted(per_node.items()):
            table.add_row(agent_type, node, f"{c['inflight']} / {c['max_concurrency']}",
                          str(c["handled"]), str(c["failed"]), str(c["overloaded"]))  # fmt: skip
    out.print(table)


def _print_replication(rep: dict[str, Any]) -> None:
    if "error" in rep:
        print_warning(f"replication unknown: {rep['error']}")
        return
    if not rep:
        return
    how = "automatic: min(3, servers)" if rep["auto"] else "explicit"
    table = Table(title=f"replication — {rep['setting']} replicas ({how})")
    for col in ("bucket/stream", "kind", "replicas", "current", "leader"):
        table.add_column(col)
    for r in rep["resources"]:
        low = 0 < r["replicas"] < rep["setting"]
        replicas = f"[red]{r['replicas']}[/red]" if low else str(r["replicas"] or "?")
        current = "?" if r["current"] is None else str(r["current"])
        table.add_row(r["name"], r["kind"], replicas, current, r["leader"] or "-")
    out.print(table)
    if rep["warning"]:
        print_warning(str(rep["warning"]))


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
async def _dead_letters(nats: str | None, cluster: str) -> AsyncIterator[Any]:
    from ..delivery._dlq import DeadLetters

    async with _existing_cluster(nats, cluster) as mesh:
        yield DeadLetters(mesh._transport, mesh.names, mesh.config.num_shards)


BusDlqOpt = Annotated[
    str | None,
    typer.Option("--bus", help="Also (list) or instead (replay, purge) the event bus's dead "
                 "letters, on this bus: redis://… or nats://… (`-` : the cluster's NATS)."),
]  # fmt: skip


async def _bus_letters(url: str) -> list[Any]:
    from ..bus import connect

    async with connect(None if url == "-" else url) as bus:
        return await bus.dead_letters()


@dlq_app.command("list")
def dlq_list(
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    as_json: JsonOpt = False,
    bus: BusDlqOpt = None,
) -> None:
    """List dead letters (sequence, target, type, deliveries, reason); with --bus, the bus's
    dead letters too (id, topic, group, attempts, last error)."""

    async def main() -> None:
        if bus is not None and nats is None and not _cluster_known():
            entries = []  # only a bus (e.g. Redis) was named: no agents' dead letters to list
        else:
            async with _dead_letters(nats, cluster) as dlq:
                entries = await dlq.list()
        letters = await _bus_letters(bus) if bus is not None else None
        if as_json:
            doc: Any = entries if letters is None else {"agents": entries, "bus": letters}
            sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
            return
        if letters is not None:
            _print_bus_letters(letters)
        table = Table(title=f"{len(entries)} dead letter(s)")
        for col in ("seq", "target", "type", "deliveries", "failed at", "reason"):
            table.add_column(col)
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.failed_at))
            table.add_row(str(e.seq), e.target, e.type, str(e.deliveries), when, e.reason)
        out.print(table)

    _run(main())


def _cluster_known() -> bool:
    from ..engine._resolve import running_url

    return running_url() is not None


def _print_bus_letters(letters: list[Any]) -> None:
    table = Table(title=f"{len(letters)} bus dead letter(s)")
    for col in ("id", "topic", "group", "key", "type", "attempts", "failed at", "last error"):
        table.add_column(col)
    for x in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x.failed_at))
        table.add_row(x.id, x.topic, x.group, x.key, x.type, str(x.attempts), when, x.error)
    out.print(table)


BusIdOpt = Annotated[
    list[str] | None, typer.Option("--id", help="A bus dead letter's id (with --bus).")
]


@dlq_app.command("show")
def dlq_show(
    seq: Annotated[
        int | None, typer.Argument(help="Sequence number from `accord dlq list`.", min=1)
    ] = None,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    bus: BusDlqOpt = None,
    ids: BusIdOpt = None,
) -> None:
    """Show one dead letter with its message body (JSON); with --bus and --id, a bus one."""

    async def main() -> None:
        if bus is not None:
            if not ids or len(ids) != 1 or seq is not None:
                raise ConfigurationError("with --bus, name one bus dead letter: --id ID")
            from ..bus import connect

            async with connect(None if bus == "-" else bus) as b:
                letter = next((x for x in await b.dead_letters(100_000) if x.id == ids[0]),
                              None)  # fmt: skip
            if letter is None:
                raise ConfigurationError(f"no bus dead letter with id {ids[0]}")
            doc = msgspec.structs.asdict(letter)
            try:  # the body is JSON on the bus: show it as such
                doc["body"] = msgspec.json.decode(letter.body)
            except msgspec.DecodeError:
                doc["body"] = letter.body.decode(errors="replace")
            out.print_json(msgspec.json.encode(doc).decode())
            return
        if ids:
            raise ConfigurationError("--id names a bus dead letter: give --bus too")
        if seq is None:
            raise ConfigurationError("give a sequence number (or --bus URL --id ID)")
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
    bus: BusDlqOpt = None,
    ids: BusIdOpt = None,
) -> None:
    """Deliver dead letters again (into their mailbox, under a new message id); with --bus,
    the bus's (published again for their group only)."""

    async def main() -> None:
        if bus is not None:
            await _replay_bus(bus, ids or [], replay_all)
            return
        if ids:
            raise ConfigurationError("--id names a bus dead letter: give --bus too")
        if not seq and not replay_all:
            raise ConfigurationError("give sequence numbers or --all")
        async with _dead_letters(nats, cluster) as dlq:
            targets = seq or [e.seq for e in await dlq.list()]
            for s in targets:
                new_id = await dlq.replay(s)
                out.print(f"replayed {s} as message {new_id}")

    _run(main())


async def _replay_bus(url: str, ids: list[str], replay_all: bool) -> None:
    from ..bus import connect

    if not ids and not replay_all:
        raise ConfigurationError("give --id ID (repeatable) or --all")
    async with connect(None if url == "-" else url) as b:
        targets = ids or [x.id for x in await b.dead_letters()]
        for letter_id in targets:
            new_id = await b.replay(letter_id)
            out.print(f"replayed bus dead letter {letter_id} as event {new_id}")


@dlq_app.command("purge")
def dlq_purge(
    seq: Annotated[int | None, typer.Argument(help="One sequence number (default: --all).")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Purge every dead letter.")] = False,
    nats: NatsOpt = None,
    cluster: ClusterOpt = "default",
    bus: BusDlqOpt = None,
    ids: BusIdOpt = None,
) -> None:
    """Delete dead letters for good; with --bus, the bus's (--id ID, repeatable, or --all)."""

    async def main() -> None:
        if bus is not None:
            await _purge_bus(bus, ids or [], purge_all)
            return
        if ids:
            raise ConfigurationError("--id names a bus dead letter: give --bus too")
        if seq is None and not purge_all:
            raise ConfigurationError("give a sequence number or --all")
        async with _dead_letters(nats, cluster) as dlq:
            n = await dlq.purge(seq)
        out.print(f"purged {n} dead letter(s)")

    _run(main())


async def _purge_bus(url: str, ids: list[str], purge_all: bool) -> None:
    from ..bus import connect

    if not ids and not purge_all:
        raise ConfigurationError("give --id ID (repeatable) or --all")
    async with connect(None if url == "-" else url) as b:
        targets = ids or [x.id for x in await b.dead_letters(100_000)]
        n = 0
        for letter_id in targets:
            if await b.purge_dead_letter(letter_id):
                n += 1
            elif ids:
                raise ConfigurationError(f"no bus dead letter with id {letter_id}")
    out.print(f"purged {n} bus dead letter(s)")
