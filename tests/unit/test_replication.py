"""The replication policy (cluster/_replication.py) over an in-memory `Admin`: how the factor is
decided, raised and enforced, what a client waits for, and what `accord status` reports."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from accord import NotConnected
from accord.cluster._config import ClusterConfig
from accord.cluster._replication import (
    Replication,
    count_servers,
    decide,
    replication_status,
    resources_of,
    wait_for_cluster,
)
from accord.engine._admin import StreamReplicas


class FakeAdmin:
    """JetStream as the policy sees it: `servers` online, streams with replicas, one record."""

    def __init__(self, servers: int, streams: dict[str, int], config: ClusterConfig | None) -> None:
        self.servers = servers
        self.replicas = dict(streams)
        self.record = None if config is None else (msgspec.json.encode(config), 1)
        self.probes: list[int] = []
        self.down = False
        self.listed = 0

    async def read_config(self) -> tuple[bytes, int] | None:
        if self.down:
            raise NotConnected("JetStream did not answer")
        return self.record

    async def write_config(self, value: bytes, revision: int) -> bool:
        assert self.record is not None
        if self.record[1] != revision:
            return False
        self.record = (value, revision + 1)
        return True

    async def streams(self) -> list[StreamReplicas]:
        self.listed += 1
        return [StreamReplicas(n, r, r, "s1") for n, r in self.replicas.items()]

    async def set_replicas(self, stream: str, replicas: int) -> None:
        if replicas > self.servers:
            raise NotConnected("no suitable peers for placement")
        self.replicas[stream] = replicas

    async def can_place(self, replicas: int) -> bool:
        self.probes.append(replicas)
        return replicas <= self.servers

    def stored(self) -> ClusterConfig:
        assert self.record is not None
        return msgspec.json.decode(self.record[0], type=ClusterConfig)


CLUSTER_STREAMS = {
    "KV_accord_default_state": 1,
    "KV_accord_default_leases": 1,
    "accord_default_events": 1,
    "accord_default_mailbox": 3,
}


async def _servers(n: int) -> int:
    return n


def test_an_old_record_decodes_with_no_factor_yet() -> None:
    old = b'{"v":1,"num_shards":8,"lease_ttl":2,"created_at":1.0}'
    config = msgspec.json.decode(old, type=ClusterConfig)
    assert (config.num_shards, config.replicas, config.replicas_auto) == (8, 0, True)


async def test_a_new_cluster_gets_min_of_three_and_the_servers() -> None:
    for servers, want in ((1, 1), (2, 2), (3, 3), (5, 3)):

        async def count(k: int, servers: int = servers) -> int:
            return servers

        assert await decide(None, None, count) == (want, True)


async def test_an_explicit_factor_wins_at_creation_and_never_follows_the_servers() -> None:
    assert await decide(None, 2, _servers) == (2, False)
    explicit_one = ClusterConfig(replicas=1, replicas_auto=False)

    async def five(k: int) -> int:
        return 5

    assert await decide(explicit_one, None, five) == (1, False)


async def test_a_stored_factor_is_never_lowered() -> None:
    three = ClusterConfig(replicas=3)
    assert await decide(three, 1, _servers) == (3, True)  # --replicas 1 on an R3 cluster

    async def one(k: int) -> int:
        return 1

    assert await decide(three, None, one) == (3, True)  # a server lost: stays at 3


async def test_an_automatic_factor_grows_with_the_servers() -> None:
    async def three(k: int) -> int:
        return 3

    assert await decide(ClusterConfig(replicas=1), None, three) == (3, True)
    assert await decide(ClusterConfig(replicas=0), None, three) == (3, True)  # old record


async def test_counting_servers_probes_from_the_top_and_stops_at_what_is_known() -> None:
    admin = FakeAdmin(servers=3, streams={}, config=None)
    assert await count_servers(admin, 1) == 3
    assert admin.probes == [3]  # a full cluster costs one probe
    admin = FakeAdmin(servers=1, streams={}, config=None)
    assert await count_servers(admin, 1) == 1
    assert admin.probes == [3, 2]
    admin.probes.clear()
    assert await count_servers(admin, 3) == 3 and admin.probes == []


def test_only_this_clusters_streams_are_its_resources() -> None:
    streams = [
        StreamReplicas("KV_accord_a_state", 1, 1, None),
        StreamReplicas("accord_a_events", 3, 3, None),
        StreamReplicas("KV_accord_a_b_state", 1, 1, None),  # cluster "a_b"
        StreamReplicas("accord_a_b_events", 1, 1, None),
        StreamReplicas("ACCORD-PROBE-1234", 3, 3, None),
        StreamReplicas("orders", 1, 1, None),
    ]
    got = [(r.kind, r.name, r.stream) for r in resources_of("a", streams)]
    assert got == [
        ("bucket", "state", "KV_accord_a_state"),
        ("stream", "events", "accord_a_events"),
    ]


async def test_a_check_raises_every_resource_below_the_factor() -> None:
    admin = FakeAdmin(3, {**CLUSTER_STREAMS, "KV_accord_other_state": 1}, ClusterConfig(replicas=3))
    check = await Replication(admin, "default").check()
    assert check is not None and check.setting == 3
    assert sorted(check.raised) == [
        "KV_accord_default_leases",
        "KV_accord_default_state",
        "accord_default_events",
    ]
    assert all(admin.replicas[s] == 3 for s in CLUSTER_STREAMS)
    assert admin.replicas["KV_accord_other_state"] == 1  # another cluster's: untouched


async def test_a_cluster_that_grows_from_one_server_to_three_ends_at_three_replicas() -> None:
    admin = FakeAdmin(1, CLUSTER_STREAMS, ClusterConfig(replicas=1))
    keeper = Replication(admin, "default")
    check = await keeper.check()
    assert check is not None and check.setting == 1 and check.raised == []
    assert keeper.interval() < 10  # below three and automatic: checked often
    admin.servers = 3
    check = await keeper.check()
    assert check is not None and check.setting == 3
    assert admin.stored().replicas == 3 and admin.stored().replicas_auto
    assert all(admin.replicas[s] == 3 for s in CLUSTER_STREAMS)
    assert keeper.interval() >= 30  # nothing left to grow: checked rarely


async def test_an_old_record_gets_a_factor_and_its_resources_are_raised() -> None:
    admin = FakeAdmin(3, CLUSTER_STREAMS, ClusterConfig(num_shards=8))  # replicas=0: pre-factor
    check = await Replication(admin, "default").check()
    assert check is not None and check.setting == 3
    assert admin.stored().num_shards == 8 and admin.stored().replicas == 3
    assert all(admin.replicas[s] == 3 for s in CLUSTER_STREAMS)


async def test_a_running_keeper_probes_growth_often_and_lists_streams_every_30_s() -> None:
    admin = FakeAdmin(2, CLUSTER_STREAMS, ClusterConfig(replicas=2))
    keeper = Replication(admin, "default")
    now = [0.0]
    listed_at: list[float] = []

    async def sleep(s: float) -> None:
        if admin.listed > len(listed_at):
            listed_at.append(now[0])
        now[0] += s
        if now[0] == 40:  # a third server joins
            admin.servers = 3
        if now[0] > 100:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await keeper.run(sleep, lambda: now[0])
    # listed at start and every 30 s while the factor is 2, at once when it became 3 (40 s),
    # then every 30 s (the checks themselves are 5 s apart until 40 s, then 30 s).
    assert listed_at == [0, 30, 40, 70, 100]
    assert all(admin.replicas[s] == 3 for s in CLUSTER_STREAMS)


async def test_a_resource_that_cannot_be_raised_yet_is_reported_and_retried_soon() -> None:
    admin = FakeAdmin(1, CLUSTER_STREAMS, ClusterConfig(replicas=3, replicas_auto=False))
    keeper = Replication(admin, "default")
    check = await keeper.check()
    assert check is not None and set(check.failed) == {
        "KV_accord_default_leases",
        "KV_accord_default_state",
        "accord_default_events",
    }
    assert keeper.interval() < 10


async def test_losing_the_record_race_leaves_the_record_to_the_winner() -> None:
    admin = FakeAdmin(3, CLUSTER_STREAMS, ClusterConfig(replicas=1))

    async def lose(value: bytes, revision: int) -> bool:
        return False

    admin.write_config = lose  # type: ignore[method-assign]
    assert await Replication(admin, "default").check() is None
    assert admin.replicas["KV_accord_default_state"] == 1


async def test_a_node_creates_with_the_stored_factor_else_its_own_decision() -> None:
    assert await Replication(FakeAdmin(3, {}, None), "default").initial() == 3
    stored = FakeAdmin(3, {}, ClusterConfig(replicas=2, replicas_auto=False))
    assert await Replication(stored, "default").initial() == 2
    assert await Replication(stored, "default", explicit=3).initial() == 3


async def test_a_client_waits_for_the_cluster_then_gets_its_record() -> None:
    admin = FakeAdmin(3, {}, None)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 3:  # a node creates the cluster meanwhile
            admin.record = (msgspec.json.encode(ClusterConfig(replicas=3)), 1)

    config = await wait_for_cluster(admin, "default", 30, sleep)
    assert config.replicas == 3 and len(slept) == 3


async def test_a_client_gives_up_with_the_cause_named() -> None:
    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(NotConnected, match="no accord node has created cluster 'default'"):
        await wait_for_cluster(FakeAdmin(3, {}, None), "default", 2, sleep, lambda: now[0])
    down = FakeAdmin(3, {}, None)
    down.down = True
    with pytest.raises(NotConnected, match="JetStream did not answer"):
        await wait_for_cluster(down, "default", 2, sleep, lambda: now[0])
    unsettled = FakeAdmin(3, {}, ClusterConfig())  # an old record nobody has upgraded
    with pytest.raises(NotConnected, match="no replication factor yet"):
        await wait_for_cluster(unsettled, "default", 2, sleep, lambda: now[0])


async def test_status_lists_every_resource_and_warns_about_those_below() -> None:
    admin = FakeAdmin(3, CLUSTER_STREAMS, ClusterConfig(replicas=3))
    st = await replication_status(admin, "default")
    assert st["setting"] == 3 and st["auto"] is True
    assert {r["name"]: r["replicas"] for r in st["resources"]} == {
        "state": 1,
        "leases": 1,
        "events": 1,
        "mailbox": 3,
    }
    assert sorted(st["below"]) == sorted(s for s, r in CLUSTER_STREAMS.items() if r < 3)
    assert "3 bucket(s)/stream(s) below the cluster's 3 replicas" in st["warning"]
    await Replication(admin, "default").check()
    st = await replication_status(admin, "default")
    assert st["below"] == [] and st["warning"] is None
