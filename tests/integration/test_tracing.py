"""Tracing across processes: a client (OpenTelemetry SDK, in-memory exporter) asks a relay agent
on one node process, whose handler asks one on the other node process (both exporting spans as
JSON lines to a file). One trace id, and each span's parent is the one before it. The same
through a worker pool (`relay-pool`, stateless: whichever node the queue group picks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from accord import _trace
from accord._ids import shard_of
from accord._status import cluster_status
from accord.testing import Cluster, wait_for_placement
from tests.chaos._support import eventually

APP = str(Path(__file__).with_name("relay_app.py"))


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The client process's spans; tracing is turned off again afterwards."""
    mem = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the global provider can be set only once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jsonl")  # on: the app's provider is used
    yield mem
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    _trace.configure()
    assert _trace.active is None


def _two_owned_by(st: dict[str, Any], first: str, second: str) -> tuple[str, str]:
    owner = {s["shard"]: s["owner"] for s in st["shards"]}
    keys = (f"relay/k{i}" for i in range(10_000))

    def on(node: str) -> str:
        return next(k for k in keys if owner[shard_of(k, st["num_shards"])] == node)

    return on(first), on(second)


async def test_one_trace_with_a_parent_chain_across_client_and_two_nodes(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "ACCORD_TRACES_FILE": str(spans_file)}
    with Cluster(APP, 2, env=env, log_dir=tmp_path / "logs", cluster="traced") as cluster:
        async with cluster.connect() as mesh:
            await wait_for_placement(mesh, set(cluster.nodes))
            st = await cluster_status(mesh, timeout=15)
            a, b = _two_owned_by(st, "node-1", "node-2")
            pids = await mesh.ask(a, _hop(b), timeout=10)
            assert pids == [cluster.nodes["node-1"].pid, cluster.nodes["node-2"].pid]
            pooled = await mesh.ask("relay-pool/p", _hop(b), timeout=10)
            assert pooled[1] == cluster.nodes["node-2"].pid

        (client_send,) = [s for s in exporter.get_finished_spans() if s.name == "send relay"]
        (pool_send,) = [s for s in exporter.get_finished_spans() if s.name == "send relay-pool"]
        trace_id = f"{client_send.context.trace_id:032x}"
        pool_trace = f"{pool_send.context.trace_id:032x}"

        async def node_spans() -> list[dict[str, Any]] | None:
            if not spans_file.exists():
                return None
            text = await asyncio.to_thread(spans_file.read_text)
            spans = [json.loads(line) for line in text.splitlines()]
            main = [s for s in spans if s["trace_id"] == trace_id]
            pool = {s["name"] for s in spans if s["trace_id"] == pool_trace}
            return spans if len(main) >= 3 and "process relay" in pool else None

        spans = await eventually(node_spans, 20, "the nodes' spans of both traces")
    remote = [s for s in spans if s["trace_id"] == trace_id]
    by_name = {}
    for s in remote:
        by_name.setdefault((s["name"], s["pid"]), s)
    p1 = by_name[("process relay", cluster.nodes["node-1"].pid)]
    s2 = by_name[("send relay", cluster.nodes["node-1"].pid)]
    p2 = by_name[("process relay", cluster.nodes["node-2"].pid)]
    assert p1["parent_span_id"] == f"{client_send.context.span_id:016x}"
    assert s2["parent_span_id"] == p1["span_id"]  # the nested ask, made inside the turn
    assert p2["parent_span_id"] == s2["span_id"]
    for span in (p1, s2, p2):
        assert span["attributes"]["messaging.system"] == "nats"
        assert span["attributes"]["accord.agent_type"] == "relay"
    assert client_send.attributes is not None
    assert client_send.attributes["messaging.operation.type"] == "send"
    assert p1["attributes"]["messaging.operation.type"] == "process"

    # Through the pool: the client's send, the pool worker's process span as its child, the
    # worker's nested ask as a child of that, and node-2's turn as the ask's child.
    # Through the pool: the client's send, the pool worker's process span as its child, and
    # node-2's turn below it — through the worker's send span of the nested ask when the queue
    # group picked node-1, directly when it picked node-2 (an in-process ask has no send span:
    # its turn's span is the caller's child, see docs/operations.md).
    assert pool_trace != trace_id
    chain = {s["name"]: s for s in spans if s["trace_id"] == pool_trace}
    # every span belongs to one of the two traces:
    assert {s["trace_id"] for s in spans} == {trace_id, pool_trace}
    worker = chain["process relay-pool"]
    assert worker["parent_span_id"] == f"{pool_send.context.span_id:016x}"
    assert worker["attributes"]["messaging.operation.type"] == "process"
    assert chain["process relay"]["pid"] == cluster.nodes["node-2"].pid
    if worker["pid"] == cluster.nodes["node-2"].pid:
        assert set(chain) == {"process relay-pool", "process relay"}, chain
        assert chain["process relay"]["parent_span_id"] == worker["span_id"]
    else:
        assert set(chain) == {"process relay-pool", "send relay", "process relay"}, chain
        assert chain["send relay"]["parent_span_id"] == worker["span_id"]
        assert chain["process relay"]["parent_span_id"] == chain["send relay"]["span_id"]


def _hop(b: str) -> Any:
    from tests.integration.relay_app import Hop

    return Hop([b])
