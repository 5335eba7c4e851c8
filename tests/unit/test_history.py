"""The history checker flags exactly the anomalies it names."""

from __future__ import annotations

from accord.testing.history import (
    Op,
    convergence_violations,
    lost_write_violations,
    single_owner_violations,
)


def op(agent: str, invoke: float, complete: float, node: str, epoch: int, kind: str = "write",
       outcome: str = "ok") -> Op:  # fmt: skip
    return Op(agent, kind, invoke, complete, outcome, node, epoch)


def test_a_clean_failover_has_no_violation() -> None:
    ops = [op("a", 0, 1, "n1", 5), op("a", 2, 3, "n1", 5), op("a", 10, 11, "n2", 9),
           op("a", 12, 13, "n2", 9)]  # fmt: skip
    assert single_owner_violations(ops) == []


def test_a_stale_epoch_answering_after_the_new_one_is_flagged() -> None:
    ops = [op("a", 0, 1, "n2", 9), op("a", 2, 3, "n1", 5)]
    assert len(single_owner_violations(ops)) == 1


def test_concurrent_ops_around_a_takeover_are_not_flagged() -> None:
    # n1's op was invoked before n2's completed: real-time order does not forbid it
    ops = [op("a", 0, 5, "n1", 5), op("a", 1, 2, "n2", 9)]
    assert single_owner_violations(ops) == []


def test_one_epoch_served_by_two_nodes_is_flagged() -> None:
    ops = [op("a", 0, 1, "n1", 5), op("a", 2, 3, "n2", 5)]
    assert single_owner_violations(ops) != []


def test_lost_acknowledged_writes_are_flagged() -> None:
    ops = [
        op("a", 0, 1, "n1", 5),
        op("a", 1, 2, "n1", 5),
        op("a", 2, 3, "n1", 5, outcome="unknown"),
    ]
    assert lost_write_violations(ops, {"a": 2}) == []
    assert lost_write_violations(ops, {"a": 3}) == []
    assert lost_write_violations(ops, {"a": 1}) != []
    assert lost_write_violations(ops, {"a": 4}) != []


def test_divergent_or_wrong_replicas_are_flagged() -> None:
    assert convergence_violations({"a": {"x": 3, "y": 3}}, {"a": 3}) == []
    assert convergence_violations({"a": {"x": 3, "y": 4}}) != []
    assert convergence_violations({"a": {"x": 3, "y": 3}}, {"a": 4}) != []
