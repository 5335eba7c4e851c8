"""`accord top`'s screen: one rich renderable built from an `Observer` snapshot — nodes, hottest
agent types, mailbox depth and dead letters, recent failure-detector transitions."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def _v(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def render(snap: dict[str, Any], *, hottest: int = 8, transitions: int = 8) -> RenderableType:
    """The whole screen for one snapshot."""
    when = time.strftime("%H:%M:%S", time.localtime(snap["at"]))
    head = Text.assemble(
        ("accord top", "bold"),
        f"  cluster {snap['cluster']} · {len(snap['nodes'])} node(s) · "
        f"{len(snap['shards'])}/{snap['num_shards']} shards owned · seen by {snap['reporter']}"
        f" · {when}",
    )
    nodes = Table(title="nodes", expand=True, title_justify="left")
    for col in ("node", "state", "shards", "activations", "msgs/s", "p99 turn", "loop lag"):
        nodes.add_column(col, justify="left" if col in ("node", "state") else "right")
    for n in snap["nodes"]:
        style = STATE_STYLE.get(n["state"], "")
        state = n["state"] if n["reachable"] or n["state"] != "alive" else "alive (no answer)"
        nodes.add_row(n["name"], Text(state, style=style), str(n["shards"]),
                      _v(n["activations"]), _v(n["msgs_per_s"]), _v(n["p99_turn_ms"], " ms"),
                      _v(n["loop_lag_ms"], " ms"))  # fmt: skip
    types = Table(title="hottest agent types", expand=True, title_justify="left")
    for col in ("type", "nodes", "activations", "msgs/s", "mailbox"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for t in snap["agent_types"][:hottest]:
        types.add_row(t["type"], str(t["nodes"]), _v(t["activations"]), _v(t["msgs_per_s"]),
                      _v(t["mailbox_pending"]))  # fmt: skip
    box = snap["mailbox"]
    dlq = snap["dlq"] or []
    queues = Text(f"mailbox pending {_v(box.get('pending'))} · dead letters "
                  f"{_v(box.get('dead_letters'))}")  # fmt: skip
    if dlq:
        last = dlq[-1]
        queues.append(f" · newest: #{last['seq']} {last['target']} ({last['reason'][:60]})")
    hist = Table(title="recent failure-detector transitions", expand=True, title_justify="left")
    for col in ("time", "node", "from", "to", "reason"):
        hist.add_column(col)
    for t in snap["history"][:transitions]:
        hist.add_row(time.strftime("%H:%M:%S", time.localtime(t["at"])), t["node"], t["old"],
                     Text(t["new"], style=STATE_STYLE.get(t["new"], "")), t["reason"])  # fmt: skip
    parts: list[RenderableType] = [head, nodes, types, queues, hist]
    for section, error in snap["errors"].items():
        parts.append(Text(f"{section}: {error}", style="yellow"))
    return Group(*parts)
