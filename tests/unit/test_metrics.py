"""Metrics and the status rates above the seam: every metric the operations guide documents is
exported (and the Grafana dashboard queries only those), labels carry types, never keys; the
rates average over the window; JSON log lines carry node, agent id and trace id; a bad
--log-format is one error line with exit code 2; lost leases are one WARNING line per loss."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from accord import _trace
from accord._cli import app
from accord._cli._logs import JsonFormatter
from accord._clock import VirtualClock
from accord._context import current_sender
from accord.cluster._losslog import LOSS_GATHER, LossLog
from accord.engine._api import Entry
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._metrics import NodeMetrics
from accord.runtime._rates import Rates
from accord.runtime._runs import RunCounts
from accord.runtime._settings import NodeSettings, Stats

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `(accord_[a-z_]+)` \|", text, re.M))


def _exercised() -> NodeMetrics:
    readers = {
        "accord_shards_owned": ("shards", (), lambda: {(): 3.0}),
        "accord_mailbox_pending": ("pending", ("agent_type",), lambda: {("counter",): 2.0}),
        "accord_promise_kept_ratio": ("kept", ("promise",), lambda: {("node/n1",): 1.0}),
        "accord_workflows": ("runs", ("type", "state"), lambda: {("order", "running"): 1.0}),
        "accord_service_replicas": (
            "replicas",
            ("service", "health"),
            lambda: {("web", "healthy"): 2.0},
        ),
    }
    m = NodeMetrics(["counter"], readers)
    m.turn_ended("counter", "ask", "ok", 0.002)
    m.message_sent("counter", "ask", "rejected")
    m.activations_changed("counter", 1)
    m.shard_acquired(1, 10, 2.1)
    m.shard_released(1, False)
    m.bulkhead_rejected("counter")
    m.breaker_changed("counter", True)
    m.dead_lettered("counter")
    m.loop_lag(0.01)
    return m


def _samples(m: NodeMetrics) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def test_every_documented_metric_is_exported_with_type_labels_only() -> None:
    samples = _samples(_exercised())
    documented = _documented()
    assert len(documented) >= 15
    for name in documented:
        assert name in samples or f"{name}_count" in samples, f"{name} is documented, not exported"
    allowed = {"agent_type", "kind", "outcome", "target_type", "promise", "service", "health",
               "type", "state", "le"}  # fmt: skip
    for name, label_sets in samples.items():
        for labels in label_sets:
            assert set(labels) <= allowed, f"{name} has labels {labels}"
    assert samples["accord_messages_total"] == [
        {"agent_type": "counter", "kind": "ask", "outcome": "ok"}
    ]
    assert samples["accord_failover_seconds_count"] == [{}]


def test_the_grafana_dashboard_queries_documented_metrics_only() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "accord.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"accord_\w+", e)
    }
    assert used and used <= _documented()


def test_rates_average_turns_over_the_window_and_take_p99() -> None:
    now = [100.0]
    bulkhead = Bulkhead(NodeSettings(), Stats(), "n1")
    rates = Rates(["a", "b"], bulkhead, Stats(), clock=lambda: now[0])
    for i in range(100):
        rates.turn_ended("a", "ask", "ok", 0.001 if i < 98 else 0.5)
    rates.activations_changed("a", 2)
    bulkhead.add("a", 3)
    now[0] += 2.0
    snap = rates.snapshot()
    assert snap["msgs_per_s"] == 50.0
    assert snap["per_type"]["a"] == {"activations": 2, "msgs_per_s": 50.0, "mailbox_pending": 3}
    assert snap["per_type"]["b"] == {"activations": 0, "msgs_per_s": 0.0, "mailbox_pending": 0}
    assert snap["p99_turn_ms"] == 500.0 and snap["activations"] == 2 and snap["dlq"] == 0
    rates.sample()  # a second later nothing happened: the old turns leave the window eventually
    for _ in range(12):
        now[0] += 1.0
        rates.sample()
    assert rates.snapshot()["msgs_per_s"] == 0.0


class _Traced:
    """Stands in for `_trace.active` inside a span."""

    def trace_id(self) -> str:
        return "4bf92f3577b34da6a3ce929d0e0e4736"


def test_json_log_lines_carry_node_logger_agent_and_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("node-7"))
    logger = logging.getLogger("accord.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    token = current_sender.set("counter/a1")
    try:
        logger.warning("lost shard %d", 3)
        monkeypatch.setattr(_trace, "active", _Traced())
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        current_sender.reset(token)
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["node"] == "node-7"
    assert first["logger"] == "accord.test-json" and first["message"] == "lost shard 3"
    assert first["agent"] == "counter/a1" and first["time"].endswith("Z")
    assert "trace_id" not in first  # outside any span
    assert "ValueError: boom" in second["exc"]  # the traceback stays inside one JSON line
    assert second["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    "command",
    [["node"], ["up", "--nodes", "0"], ["dashboard"], ["top"], ["bus", "tail", "orders"]],
    ids=lambda c: " ".join(c),
)
def test_every_long_running_command_takes_log_format_and_refuses_a_bad_one(
    command: list[str],
) -> None:
    result = CliRunner().invoke(app, [*command, "--log-format", "xml"])
    assert result.exit_code == 2
    assert "--log-format must be text or json" in result.output
    assert "Traceback" not in result.output


def test_workflow_runs_are_counted_by_type_and_state_from_the_index() -> None:
    runs = RunCounts()
    entry = {"id": "order/1", "type": "order", "state": "running"}
    runs._apply(Entry("a", json.dumps(entry).encode(), 1))
    runs._apply(Entry("b", json.dumps({**entry, "id": "order/2"}).encode(), 2))
    runs._apply(Entry("a", json.dumps({**entry, "state": "completed"}).encode(), 3))
    assert runs.counts() == {("order", "running"): 1.0, ("order", "completed"): 1.0}
    runs._apply(Entry("b", b"", 4, deleted=True))
    assert runs.counts() == {("order", "completed"): 1.0}


async def test_lost_leases_are_one_warning_line_per_loss_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    logger = logging.getLogger("accord.test-losses")
    losses = LossLog(clock, logger)
    with caplog.at_level(logging.WARNING, logger="accord.test-losses"):
        for shard, epoch in ((12, 52), (3, 41), (7, 44)):  # expiring milliseconds apart
            losses.add(shard, epoch, "lease not renewed in time")
            await clock.advance(0.01)
        assert not caplog.records  # gathered, not yet logged
        await clock.advance(LOSS_GATHER)
        losses.add(5, 60, "lease taken by node-2")  # a later event: a line of its own
        await clock.advance(LOSS_GATHER)
    lines = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records]
    assert lines == [
        ("WARNING", "lost leases of shards 3, 7, 12 (epochs 41, 44, 52): lease not renewed in "
         "time", None),
        ("WARNING", "lost the lease of shard 5 (epoch 60): lease taken by node-2", None),
    ]  # fmt: skip
