"""The services layer above its seams, no server: `ServiceStore` and the claims over a small fake
of the engine's `KV`, the node agent over a fake `ServiceHost`, the replica-count verifier over a
fake `ServiceView`. Engine signals that escape become accord errors."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import msgspec
import pytest

from accord import Fenced, NotConnected
from accord.cluster._config import Names
from accord.cluster._membership import MemberInfo
from accord.engine._api import KV, Entry, JetStream, Refused, Transport, WrongRevision
from accord.services import PromiseConflict, parse_spec
from accord.services._agent import NodeAgent
from accord.services._host import NodeParts
from accord.services._placement import NodeView, Slot
from accord.services._promises import claim
from accord.services._store import Assessment, Instance, LogLine, Placement, ServiceStore
from accord.services._verifiers import ServicePromises

NAMES = Names("svc")


class FakeKV:
    """Keys with revisions that only grow; `fail` makes every call raise that engine signal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Entry] = {}
        self.rev = 0
        self.fail: Exception | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def _write(self, key: str, value: bytes) -> int:
        self.rev += 1
        self.data[key] = Entry(key, value, self.rev)
        return self.rev

    async def get(self, key: str, *, timeout: float = 5.0, leader: bool = False) -> Entry | None:
        self._check()
        return self.data.get(key)

    async def put(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._check()
        return self._write(key, value)

    async def create(self, key: str, value: bytes, *, timeout: float = 5.0, ttl: int = 0) -> int:
        self._check()
        if key in self.data:
            raise WrongRevision(key)
        return self._write(key, value)

    async def update(
        self, key: str, value: bytes, last: int, *, timeout: float = 5.0, ttl: int = 0
    ) -> int:
        self._check()
        if key not in self.data or self.data[key].revision != last:
            raise WrongRevision(key)
        return self._write(key, value)

    async def delete(self, key: str, *, last: int = 0, timeout: float = 5.0) -> None:
        self._check()
        self.data.pop(key, None)

    async def purge(self, key: str, *, timeout: float = 5.0) -> None:
        await self.delete(key)

    async def keys(self, *, timeout: float = 5.0) -> list[str]:
        self._check()
        return sorted(self.data)


def make_store() -> tuple[ServiceStore, dict[str, FakeKV]]:
    kinds = ("services", "placements", "instances", "promises", "members")
    fakes = {k: FakeKV(k) for k in kinds}
    js = cast(JetStream, object())  # no stream is touched by these tests
    return ServiceStore(js, NAMES, cast(dict[str, KV], fakes)), fakes


# -- the store and the claims over the KV seam ------------------------------------------------


async def test_a_claim_held_by_another_promise_is_refused_naming_it_and_none_is_taken() -> None:
    store, kv = make_store()
    await claim(store, "promise/a", ["port:8080"])
    await claim(store, "promise/a", ["port:8080"])  # its own claim again: fine
    with pytest.raises(PromiseConflict, match="already promised by promise/a"):
        await claim(store, "promise/b", ["route:*/api", "port:8080"])
    # all or nothing: the claim b could take was given back
    assert [k for k in kv["promises"].data] == ["claim.port_8080"]


async def test_a_spec_changed_since_it_was_read_is_not_deployed_over() -> None:
    store, _ = make_store()
    spec = parse_spec({"name": "web", "command": ["app"]})
    rev = await store.deploy(spec, None)
    await store.deploy(spec, rev)  # over the revision it checked: applied
    with pytest.raises(PromiseConflict, match="changed concurrently"):
        await store.deploy(spec, rev)
    with pytest.raises(PromiseConflict, match="changed concurrently"):
        await store.deploy(spec, None)  # "not deployed yet", but it is
    assert list(await store.specs()) == ["web"]


async def test_a_placement_by_an_older_controller_token_is_fenced() -> None:
    store, _ = make_store()

    def placement(token: int) -> Placement:
        return Placement("web", 1, [Slot(0, "n1", "replica", "")], token, "n1", time.time())

    await store.write_placement(placement(5), 5)
    with pytest.raises(Fenced):
        await store.write_placement(placement(3), 3)
    await store.write_placement(placement(6), 6)
    assert (await store.placements())["web"][0].token == 6


@pytest.mark.parametrize(
    "call",
    [
        lambda store: store.specs(),
        lambda store: store.instances(),
        lambda store: store.nodes(),
        lambda store: claim(store, "promise/a", ["port:1"]),
    ],
    ids=["specs", "instances", "nodes", "claim"],
)
async def test_an_engine_signal_escaping_a_store_call_surfaces_as_not_connected(
    call: Callable[[ServiceStore], Awaitable[Any]],
) -> None:
    store, kv = make_store()
    for fake in kv.values():
        fake.fail = Refused("a limit of the engine")
    with pytest.raises(NotConnected, match="Refused: a limit of the engine"):
        await call(store)


# -- the node agent over a ServiceHost ------------------------------------------------------------


class FakeMembers:
    def __init__(self, live: list[str], infos: dict[str, MemberInfo]) -> None:
        self._live = live
        self.infos = infos

    def live(self) -> list[str]:
        return self._live


class FakeCoordination:
    def lease(self, name: str, ttl: int = 5, *, timeout: float | None = None) -> Any:
        raise AssertionError("not used here")

    def election(self, name: str, ttl: int = 5) -> AsyncIterator[Any]:
        raise AssertionError("not used here")


class FakeTransport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        self.published.append((subject, data))


def member(name: str, status: str = "up", **labels: str) -> MemberInfo:
    return MemberInfo(name, "i", 1, "h", 0.0, status=status, labels=labels)


def instance(node: str, index: int, status: str = "healthy") -> Instance:
    return Instance(service="web", index=index, node=node, role="replica", status=status,
                    port=8000 + index)  # fmt: skip


@contextlib.asynccontextmanager
async def agent_on(
    live: list[str], infos: dict[str, MemberInfo]
) -> AsyncIterator[tuple[NodeAgent, FakeTransport]]:
    store, _ = make_store()
    transport = FakeTransport()
    host = NodeParts("n1", FakeMembers(live, infos), FakeCoordination(),
                     cast(Transport, transport), dead_after=3.0)  # fmt: skip
    agent = NodeAgent(host, store, "127.0.0.1")
    try:
        yield agent, transport
    finally:
        await agent.stop()


async def test_the_agent_places_on_live_up_members_only_with_their_labels() -> None:
    infos = {"n1": member("n1", zone="a"), "n2": member("n2", "leaving"), "n3": member("n3")}
    async with agent_on(["n1", "n2", "n4"], infos) as (agent, _):
        # n2 is leaving, n3 is not alive, n4 never described itself
        assert agent.live_nodes() == [NodeView("n1", {"zone": "a"})]


async def test_healthy_counts_assigned_replicas_on_live_nodes_and_lost_the_dead_nodes() -> None:
    infos = {n: member(n) for n in ("n1", "n2", "n3")}
    async with agent_on(["n1", "n2"], infos) as (agent, _):
        slots = [Slot(0, "n1", "replica", ""), Slot(1, "n3", "replica", "")]
        agent.placements.set_local("web", msgspec.json.encode(Placement("web", 1, slots, 1, "n1",
                                                                         time.time())))  # fmt: skip
        for inst in (instance("n1", 0), instance("n2", 2), instance("n3", 1),
                     instance("n1", 3, "starting")):  # fmt: skip
            agent.instances.set_local(f"web.{inst.node}.{inst.index}", msgspec.json.encode(inst))
        # n2 is alive but not assigned; n3 is assigned but dead
        assert [(i.node, i.index) for i in agent.healthy("web")] == [("n1", 0)]
        assert [(i.node, i.index) for i in agent.lost("web")] == [("n3", 1)]


async def test_replica_log_lines_go_to_the_services_log_subject_through_the_host() -> None:
    async with agent_on(["n1"], {"n1": member("n1")}) as (agent, transport):
        line = LogLine("web", 0, "n1", 1.0, "hello")
        await agent._log(line)
        assert transport.published == [("accord.svc.logs.web", msgspec.json.encode(line))]


# -- the replica-count promise over a ServiceView ---------------------------------------------


class FakeLedger:
    def __init__(self) -> None:
        self.assessed: list[Assessment] = []

    async def assess(self, a: Assessment) -> None:
        self.assessed.append(a)

    async def ledger(self, last: int = 1000, promise: str | None = None) -> list[Assessment]:
        return []


class FakeView:
    def __init__(self, healthy: list[Instance], lost: list[Instance], placed_at: float) -> None:
        self.name = "n1"
        self.store = cast(ServiceStore, FakeLedger())
        self.replicas: dict[tuple[str, int], Any] = {}
        self._healthy, self._lost = healthy, lost
        self._placed_at = placed_at

    def current_specs(self) -> dict[str, Any]:
        return {"web": parse_spec({"name": "web", "command": ["app"], "replicas": 2})}

    def current_placements(self) -> dict[str, Placement]:
        return {"web": Placement("web", 1, [], 1, "n1", self._placed_at, self._placed_at)}

    def current_instances(self) -> list[Instance]:
        return self._healthy + self._lost

    def healthy(self, service: str) -> list[Instance]:
        return self._healthy

    def lost(self, service: str) -> list[Instance]:
        return self._lost


def outcomes(view: FakeView) -> list[tuple[str, str, str]]:
    ledger = cast(FakeLedger, view.store)
    return [(a.promise, a.outcome, a.evidence) for a in ledger.assessed]


async def test_replicas_short_within_the_start_up_grace_are_unknown_not_broken() -> None:
    view = FakeView([instance("n1", 0)], [], placed_at=time.time())
    await ServicePromises(view).assess(None)
    assert outcomes(view) == [("web.replicas", "unknown", "starting: 1/2 healthy (0@n1:8000)")]


async def test_a_replica_lost_with_its_node_is_a_broken_promise_even_during_the_grace() -> None:
    view = FakeView([instance("n1", 0)], [instance("n3", 1)], placed_at=time.time())
    await ServicePromises(view).assess(None)
    assert outcomes(view) == [
        ("web.replicas", "not_kept", "1/2 healthy (0@n1:8000); lost with their node: 1@n3")
    ]
