"""Service specs, placement policies, conflicts and reputation: pure functions, no server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from accord.services import InvalidSpec, load_spec, parse_spec
from accord.services._placement import NodeView, Slot, conflicts, place
from accord.services._promises import Reputation
from accord.services._store import Assessment


def spec(**kw: Any) -> Any:
    return parse_spec({"name": "web", "command": ["python", "app.py"], **kw})


def nodes(*specs: str) -> list[NodeView]:
    """'n1:zone=a,cost=2' -> NodeView('n1', {'zone': 'a', 'cost': '2'})."""
    out = []
    for s in specs:
        name, _, labels = s.partition(":")
        kv = dict(item.split("=") for item in labels.split(",") if item)
        out.append(NodeView(name, kv))
    return out


# -- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "web", "command": ["x"], "replcas": 3}, "replcas"),
        ({"name": "web", "command": ["x"], "health": {"interval": "soon"}}, "health.interval"),
        ({"name": "web", "command": ["x"], "health": {"interval": -1}}, "health.interval"),
        ({"name": "web", "command": ["x"], "port": 70000}, "port"),
        ({"name": "Web!", "command": ["x"]}, "name"),
        ({"name": "web", "command": []}, "command"),
        ({"name": "web"}, "command"),
        ({"name": "web", "command": ["x"], "replicas": 0}, "replicas"),
        ({"name": "web", "command": ["x"], "single_instance": True, "replicas": 2}, "replicas"),
        ({"name": "web", "command": ["x"], "placement": {"policy": "random"}}, "placement.policy"),
        ({"name": "web", "command": ["x"], "health": {"path": "health"}}, "health.path"),
        ({"name": "web", "command": ["x"], "restart": {"backoff_initial": 0}}, "restart"),
    ],
)
def test_an_invalid_spec_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(data, "web.toml")
    assert f"web.toml: {field}" in str(err.value) or f"{field}:" in str(err.value)


def test_a_spec_file_is_read_from_toml_with_defaults(tmp_path: Path) -> None:
    f = tmp_path / "web.toml"
    f.write_text(
        'name = "web"\ncommand = "python app.py --flag"\nreplicas = 2\n[health]\npath="/h"\n'
    )
    s = load_spec(f)
    assert s.command == ["python", "app.py", "--flag"]
    assert (s.replicas, s.health.path, s.health.interval, s.placement.policy) == (
        2, "/h", 1.0, "horizontal"
    )  # fmt: skip


def test_unreadable_or_malformed_spec_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(InvalidSpec, match="not valid TOML"):
        load_spec(bad)


# -- placement --------------------------------------------------------------------------------


def test_horizontal_spreads_over_distinct_nodes_and_zones() -> None:
    ns = nodes("a1:zone=a", "a2:zone=a", "b1:zone=b", "c1:zone=c")
    slots = place(spec(replicas=3), ns, [])
    assert len({s.node for s in slots}) == 3
    zones = {next(n.zone for n in ns if n.name == s.node) for s in slots}
    assert zones == {"a", "b", "c"}
    assert all(s.reason for s in slots)


def test_placement_is_stable_and_moves_only_the_slots_of_a_dead_node() -> None:
    ns = nodes("n1", "n2", "n3", "n4")
    first = place(spec(replicas=3), ns, [])
    dead = first[1].node
    after = place(spec(replicas=3), [n for n in ns if n.name != dead], first)
    assert (after[0].node, after[2].node) == (first[0].node, first[2].node)
    assert after[1].node not in (dead, first[0].node, first[2].node)
    assert "gone" in after[1].reason


def test_horizontal_shares_a_node_when_fewer_nodes_than_replicas_remain() -> None:
    first = place(spec(replicas=3), nodes("n1", "n2", "n3"), [])
    after = place(spec(replicas=3), nodes("n1", "n2"), first)
    assert all(s.node in ("n1", "n2") for s in after) and len(after) == 3
    back = place(spec(replicas=3), nodes("n1", "n2", "n3"), after)
    assert {s.node for s in back} == {"n1", "n2", "n3"}  # spread again once possible


def test_failover_promotes_the_standby_when_the_primary_node_dies() -> None:
    s = spec(placement={"policy": "failover"})
    first = place(s, nodes("n1", "n2", "n3"), [])
    assert [x.role for x in first] == ["primary", "standby"]
    primary, standby = first[0].node, first[1].node
    assert primary != standby
    after = place(s, [n for n in nodes("n1", "n2", "n3") if n.name != primary], first)
    assert after[0].node == standby and after[0].role == "primary"
    assert "promoted" in after[0].reason
    assert after[1].node not in (primary, standby)


def test_failover_records_a_standby_that_took_the_lease_as_the_primary() -> None:
    s = spec(placement={"policy": "failover"})
    first = place(s, nodes("n1", "n2", "n3"), [])
    primary, standby = first[0].node, first[1].node
    assert standby is not None
    after = place(s, nodes("n1", "n2", "n3"), first, running=frozenset({standby}))
    assert [(x.node, x.role) for x in after] == [(standby, "primary"), (primary, "standby")]


def test_cost_packs_onto_the_cheapest_node_with_capacity() -> None:
    ns = nodes("cheap:cost=1,cpu=2", "mid:cost=2,cpu=8", "dear:cost=5,cpu=8")
    slots = place(spec(replicas=4, resources={"cpu": 1.0}, placement={"policy": "cost"}), ns, [])
    assert [s.node for s in slots] == ["cheap", "cheap", "mid", "mid"]


def test_geo_pins_to_a_zone() -> None:
    ns = nodes("a1:zone=a", "a2:zone=a", "b1:zone=b")
    s = spec(replicas=2, placement={"policy": "geo", "zone": "a"})
    assert {x.node for x in place(s, ns, [])} == {"a1", "a2"}


def test_reputation_breaks_ties_toward_reliable_nodes() -> None:
    ns = [NodeView("flaky", {}, 0.2), NodeView("solid", {}, 0.99)]
    assert place(spec(replicas=1), ns, [])[0].node == "solid"


def test_conflicting_promises_are_found_when_made() -> None:
    ns = nodes("n1", "n2")
    assert "only 2 live node(s)" in conflicts(spec(replicas=3), ns, [])[0]
    pinned = spec(replicas=1, placement={"policy": "geo", "zone": "z"})
    assert any("no live node is eligible" in c for c in conflicts(pinned, ns, []))
    a = spec(port=8080, single_instance=True)
    b = parse_spec({"name": "other", "command": ["x"], "port": 8080, "single_instance": True})
    assert "port 8080 is already promised to service 'other'" in conflicts(a, ns, [b])[0]
    r1 = spec(path_prefix="/api")
    r2 = parse_spec({"name": "api2", "command": ["x"], "path_prefix": "/api"})
    assert "already routed" in conflicts(r1, ns, [r2])[0]
    assert conflicts(spec(replicas=2), ns, [b]) == []


# -- reputation -------------------------------------------------------------------------------


def test_reputation_is_the_kept_ratio_over_a_window() -> None:
    rep = Reputation(window=60)
    now = time.time()
    for i, outcome in enumerate(["kept", "kept", "not_kept", "unknown", "kept"]):
        rep.add(Assessment(promise="p", promiser="node/a", kind="state", outcome=outcome,
                           evidence="", at=now - i))  # fmt: skip
    rep.add(Assessment(promise="p", promiser="node/a", kind="state", outcome="not_kept",
                       evidence="", at=now - 3600))  # fmt: skip
    assert rep.counts("node/a") == (3, 4)
    assert rep.of("node/a") == 0.75
    assert rep.of("node/unknown") == 1.0


def test_slots_round_trip_through_the_placement_record() -> None:
    s = Slot(0, "n1", "replica", "why")
    assert place(spec(), nodes("n1"), [s])[0] == s
