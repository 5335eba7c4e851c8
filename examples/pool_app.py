"""A worker pool fed by workflows (`accord node --app examples/pool_app.py`).

- `thumbnail` is a worker pool (`stateless=True`): every node hosting it serves it, at most
  `max_concurrency` = 8 handlers at once per node. A `Task` sleeps `Task.ms` milliseconds (the
  "work") and answers which node did it. Its tells are durable (`delivery="at_least_once"`):
  a node's death loses none. With $ACCORD_POOL_LOG set, each handler appends
  {"task", "node", "event": "start" | "done"} lines to that file (the tests read them).
- `fanout` is a workflow that asks the pool for `Batch.n` tasks, each a journaled `ctx.ask`
  step (a step whose worker died is asked again), and returns how many each node did. Several
  runs at once fan the work out over every node.
"""

from __future__ import annotations

import asyncio
import json
import os

import msgspec

import accord


class Task(msgspec.Struct):
    n: int
    ms: int = 0


class Done(msgspec.Struct):
    n: int
    node: str


class Batch(msgspec.Struct):
    first: int
    n: int
    ms: int = 0
    timeout: float | None = None  # of each ask (None: the default 10 s)


def _log(task: int, node: str, event: str) -> None:
    path = os.environ.get("ACCORD_POOL_LOG")
    if path:
        with open(path, "a") as f:  # one short write per line: O_APPEND keeps lines whole
            f.write(json.dumps({"task": task, "node": node, "event": event}) + "\n")


class Thumbnail(
    accord.Agent, type="thumbnail", stateless=True, max_concurrency=8, delivery="at_least_once"
):
    """A stateless worker: no `state`, any node, any number of keys at once."""

    @accord.handler
    async def render(self, task: Task) -> Done:
        node = self.mesh.name
        _log(task.n, node, "start")
        await asyncio.sleep(task.ms / 1000)
        _log(task.n, node, "done")
        return Done(task.n, node)


class Fanout(accord.Workflow, type="fanout"):
    async def run(self, ctx: accord.WorkflowContext, batch: Batch) -> dict[str, int]:
        by_node: dict[str, int] = {}
        for n in range(batch.first, batch.first + batch.n):
            done: Done = await ctx.ask(f"thumbnail/{n}", Task(n, batch.ms), timeout=batch.timeout)
            by_node[done.node] = by_node.get(done.node, 0) + 1
        return by_node


AGENTS = [Thumbnail, Fanout]
