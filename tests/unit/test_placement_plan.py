"""The communication graph (weights, decay, pruning, bounded memory) and one round's placement
plan (co-location by gain, load bound, bounded moves, hysteresis, opt-out, rebalancing)."""

from __future__ import annotations

from accord.cluster._graph import CommGraph, GraphSettings
from accord.runtime._colocate import plan
from accord.runtime._settings import PlacementSettings


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_edges_reinforce_decay_and_prune() -> None:
    clock = Clock()
    g = CommGraph(GraphSettings(), clock)
    g.record("a/1", "b/1", local=False)
    assert g.edges[("a/1", "b/1")].weight == 0.5
    for _ in range(10):
        g.record("a/1", "b/1", local=True)
    assert g.edges[("a/1", "b/1")].weight == 1.0  # capped
    g.record("a/2", "b/2", local=False)
    clock.t = 5.0
    g.tick()
    edge = g.edges[("a/1", "b/1")]
    assert abs(edge.weight - 0.98) < 1e-9 and abs(edge.rate - 11 / 5) < 1e-9
    for _ in range(20):  # 0.48 decays below 0.1 after 20 ticks
        clock.t += 5.0
        g.tick()
    assert ("a/2", "b/2") not in g.edges and ("a/1", "b/1") in g.edges
    [src, dst, weight, _rate, messages, local] = g.export()[0]
    assert (src, dst, messages, local) == ("a/1", "b/1", 11, True) and weight > 0.5


def test_memory_is_bounded_and_heavy_edges_survive() -> None:
    g = CommGraph(GraphSettings(capacity=100), Clock())
    for _ in range(5):
        g.record("hot/1", "hot/2", local=False)
    for i in range(1000):
        g.record(f"cold/{i}", "x/1", local=False)
    assert len(g.edges) <= 100
    assert ("hot/1", "hot/2") in g.edges


SETTINGS = PlacementSettings(min_gain=0.5, tolerance=0.1, slack=2, max_move_fraction=0.5)


def _pairs(n: int) -> tuple[list[tuple[str, str, float]], dict[str, str]]:
    nodes = ["n1", "n2", "n3"]
    edges = [(f"a/{i}", f"b/{i}", 5.0) for i in range(n)]
    where = {f"a/{i}": nodes[i % 3] for i in range(n)}
    where |= {f"b/{i}": nodes[(i + 1) % 3] for i in range(n)}
    return edges, where


def test_pairs_are_co_located_within_the_load_bound() -> None:
    edges, where = _pairs(30)
    moves = plan(edges, where, ["n1", "n2", "n3"], lambda a, n: True, SETTINGS, set())
    after = dict(where)
    for m in moves:
        after[m.agent] = m.target
        assert m.gain == 5.0 and "with" in m.reason
    assert all(after[f"a/{i}"] == after[f"b/{i}"] for i in range(30))
    counts = [list(after.values()).count(n) for n in ("n1", "n2", "n3")]
    assert max(counts) <= 20 + max(2, 2)  # mean 20, bound mean + max(10 %, slack)
    assert len(moves) == 30  # one side of each pair


def test_moves_are_bounded_and_hysteresis_and_opt_out_hold() -> None:
    edges, where = _pairs(30)
    few = PlacementSettings(min_gain=0.5, slack=2, max_move_fraction=0.1)
    assert len(plan(edges, where, ["n1", "n2", "n3"], lambda a, n: True, few, set())) == 6
    recent = {f"a/{i}" for i in range(30)} | {f"b/{i}" for i in range(30)}
    assert plan(edges, where, ["n1", "n2", "n3"], lambda a, n: True, SETTINGS, recent) == []
    pinned = plan(edges, where, ["n1", "n2", "n3"], lambda a, n: False, SETTINGS, set())
    assert pinned == []


def test_weak_edges_do_not_move_and_a_settled_placement_stays() -> None:
    edges, where = _pairs(30)
    weak = [(a, b, 0.2) for a, b, _ in edges]
    assert plan(weak, where, ["n1", "n2", "n3"], lambda a, n: True, SETTINGS, set()) == []
    settled = {a: where[a] for a in where if a.startswith("a/")}
    settled |= {f"b/{i}": where[f"a/{i}"] for i in range(30)}
    assert plan(edges, settled, ["n1", "n2", "n3"], lambda a, n: True, SETTINGS, set()) == []


def test_an_overloaded_node_sheds_its_least_connected_agents() -> None:
    where = {f"x/{i}": "n1" for i in range(30)} | {"y/1": "n2", "y/2": "n3"}
    every = PlacementSettings(slack=2, max_move_fraction=1.0)
    moves = plan([], where, ["n1", "n2", "n3"], lambda a, n: True, every, set())
    assert moves and all(m.reason.startswith("rebalance") for m in moves)
    after = dict(where)
    for m in moves:
        after[m.agent] = m.target
    assert list(after.values()).count("n1") <= 32 / 3 + 2
