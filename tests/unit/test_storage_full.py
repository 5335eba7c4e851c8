"""A full store, above the engine seam: the NATS error mapping of "no room", byte limits and
`first_seq` in the in-memory engine, the cluster's byte budget, memory buckets re-created when
they vanish (revisions above the old ones), and the `state_ttl` keyword."""

from __future__ import annotations

import asyncio

import msgspec
import nats.js.errors
import pytest

import accord
from accord.cluster._config import DATA_SHARES, ClusterConfig, Names, open_cluster
from accord.cluster._volatile import VolatileKV, fresh_first_seq
from accord.engine._api import BucketSpec, StreamSpec
from accord.engine._nats_errors import api_error, map_errors
from accord.engine.memory import MemoryEngine


class Happened(msgspec.Struct):
    pass


@pytest.mark.parametrize(
    ("err_code", "what"),
    [
        (10077, "maximum bytes exceeded"),  # a stream's own max_bytes (discard new)
        (10023, "insufficient resources"),  # the server's store limit
        (10047, "insufficient storage resources available"),  # reservation at creation
    ],
)
def test_no_room_answers_are_storage_full_not_unavailable(err_code: int, what: str) -> None:
    """nats-server says 503 for "no room" as for "JetStream down"; the err_code decides, both
    for a publish's PubAck and for nats-py's ServiceUnavailableError."""
    assert isinstance(api_error(err_code, 503, what, "append"), accord.StorageFull)
    with pytest.raises(accord.StorageFull), map_errors("op"):
        raise nats.js.errors.ServiceUnavailableError(code=503, err_code=err_code, description=what)
    with pytest.raises(accord.NotConnected), map_errors("op"):  # still unavailable, transient
        raise nats.js.errors.ServiceUnavailableError(code=503, err_code=10008)


def test_storage_full_travels_in_replies_and_is_not_safe_to_retry_blindly() -> None:
    from accord._errors import WIRE_ERRORS

    assert WIRE_ERRORS["storage_full"] is accord.StorageFull
    assert not issubclass(accord.StorageFull, accord.NotProcessed)  # a turn may have run


async def test_memory_engine_refuses_writes_past_max_bytes_and_resumes_after_a_delete() -> None:
    engine = MemoryEngine()
    kv = await engine.bucket(BucketSpec(name="b", max_bytes=100))
    await kv.put("a", b"x" * 60)
    with pytest.raises(accord.StorageFull):
        await kv.put("b", b"x" * 60)
    await kv.purge("a")
    await kv.put("b", b"x" * 60)
    await engine.ensure_stream(StreamSpec(name="s", subjects=("s.>",), max_bytes=50,
                                          discard_new=True))  # fmt: skip
    await engine.append("s.1", b"x" * 40)
    with pytest.raises(accord.StorageFull):
        await engine.append("s.1", b"x" * 40)
    await engine.ensure_stream(StreamSpec(name="r", subjects=("r.>",), max_bytes=50))
    await engine.append("r.1", b"x" * 40)
    await engine.append("r.1", b"y" * 40)  # discard old: the oldest goes instead
    assert (await engine.get_message("r", subject="r.1")).data == b"y" * 40  # type: ignore[union-attr]


async def test_open_cluster_puts_leases_on_memory_and_limits_the_state_bucket() -> None:
    engine = MemoryEngine()
    names = Names("c")
    config, buckets = await open_cluster(engine, names, data_bytes=10_000_000)
    assert config.data_bytes == 10_000_000
    assert config.max_bytes("state") == int(10_000_000 * DATA_SHARES["state"])
    assert abs(sum(DATA_SHARES.values()) - 1.0) < 1e-9
    assert all(
        isinstance(kv, VolatileKV) for kv in (buckets.leases, buckets.members, buckets.locks)
    )
    rev = await buckets.leases.create("shard.0", b"n1", ttl=2)
    assert rev >= fresh_first_seq() - 60_000_000, "revisions start from the wall clock (µs)"
    state = engine.server.streams[f"KV_{names.bucket('state')}"]
    assert state.spec.max_bytes == config.max_bytes("state")
    # The stored budget wins over what a later opener asks for.
    again, _ = await open_cluster(engine, names, data_bytes=1)
    assert again.data_bytes == 10_000_000


async def test_no_budget_when_the_engine_sets_no_limit() -> None:
    config, _ = await open_cluster(MemoryEngine(), Names("c"))
    assert config.data_bytes == 0 and config.max_bytes("mailbox") == 0


async def test_a_vanished_memory_bucket_is_recreated_above_every_earlier_revision() -> None:
    """A server restart loses a memory bucket: the next failing call makes it come back, with
    revisions (lease epochs, fencing tokens) above every one handed out before."""
    engine = MemoryEngine()
    _, buckets = await open_cluster(engine, Names("c"))
    leases = buckets.leases
    assert isinstance(leases, VolatileKV)
    old = [await leases.put("shard.0", b"v") for _ in range(5)]
    del engine.server.streams["KV_accord_c_leases"]  # what a restart of the server does
    assert await leases.heal() is True  # (a failing call starts this; the chaos test shows it)
    assert await leases.heal() is False  # checked at most once a second
    new = await leases.create("shard.0", b"n1", ttl=2)
    assert new > max(old)
    assert leases.recreated == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_state_ttl_must_be_whole_seconds(bad: object) -> None:
    with pytest.raises(accord.ConfigurationError, match="state_ttl"):

        class Bad(accord.Agent, type="bad_ttl", state_ttl=bad):  # type: ignore[call-arg]
            pass


def test_state_ttl_is_refused_for_event_sourced_agents() -> None:
    with pytest.raises(accord.ConfigurationError, match="event_sourced"):

        class Sourced(accord.Agent, type="es_ttl", consistency="event_sourced",  # type: ignore[call-arg]
                      events=(Happened,), state_ttl=60):  # fmt: skip
            pass


def test_state_ttl_is_an_inherited_option() -> None:
    class Short(accord.Agent, type="short_ttl", state_ttl=30):  # type: ignore[call-arg]
        pass

    class Shorter(Short, type="shorter_ttl"):
        pass

    assert Shorter.__accord_spec__.options.state_ttl == 30
    assert ClusterConfig().max_bytes("state") == 0


async def test_a_record_deleted_under_its_reader_is_never_written_back() -> None:
    """`delete_state` while an activation holds the record: the holder's next save gets
    `StateDeleted` (a `Fenced`), and the record stays deleted."""
    from accord._ids import AgentId
    from accord.state._store import StateDeleted, StateRecord, StateStore

    engine = MemoryEngine()
    store = StateStore(await engine.bucket(BucketSpec(name="state")))
    agent = AgentId.parse("t/a")
    rev = await store.save(agent, StateRecord(agent="t/a", epoch=5), 0)
    await store.delete(agent)
    with pytest.raises(StateDeleted):
        await store.save(agent, StateRecord(agent="t/a", epoch=5), rev)
    assert await store.load(agent) == (None, 0)
    assert issubclass(StateDeleted, accord.Fenced)


async def test_a_full_mailbox_fails_a_durable_send_at_once() -> None:
    """A full store is not transient: the sender gets `StorageFull`, not a retry until its
    deadline ends in `OutcomeUnknown`."""
    from accord import _codec as codec
    from accord.delivery._client import DurableSender

    engine = MemoryEngine()
    await engine.ensure_stream(StreamSpec(name="mbox", subjects=("m.>",), max_bytes=10,
                                          work_queue=True, discard_new=True))  # fmt: skip
    req = codec.Request(v=codec.PROTOCOL_VERSION, kind="tell", target="t/a", type="T",
                        body=msgspec.Raw(codec.encode(Happened())), id="id-1")  # fmt: skip
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(accord.StorageFull):
        await DurableSender(engine).send("m.0", req, "msgpack", start + 30, "s.0")
    assert loop.time() - start < 5, "retried a full store as if it were transient"
