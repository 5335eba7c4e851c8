"""The services' store loops read records anyone with a node credential (or a bug, or an older
version) could have written: random and mutated records in the ledger stream and the services'
buckets are skipped, never fatal to the loop, and the well-formed ones around them still come
back; the first malformed record of each source is logged once. `ServiceStore` on the in-memory
engine (the seam), hypothesis for the records."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord.cluster._config import Names
from accord.engine._api import BucketSpec
from accord.engine.memory import MemoryEngine
from accord.services import _store
from accord.services._promises import records
from accord.services._store import Assessment, Instance, ServiceStore, decoded

from .test_fuzz_payloads import json_values

NAMES = Names("fz")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = Assessment(promise="web.replicas", promiser="service/web", kind="state", outcome="kept",
                  evidence="2 of 2", at=1.0e9, assessor="node-1")  # fmt: skip
GOOD_INSTANCE = Instance(service="web", index=0, node="node-1", role="primary", status="healthy")


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` with one byte changed, cut short, or a field's value replaced."""
    flip = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
        lambda p: valid[: p[0]] + bytes([p[1]]) + valid[p[0] + 1 :]
    )
    cut = st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
    swap = st.tuples(st.sampled_from(sorted(msgspec.json.decode(valid))), json_values).map(
        lambda kv: msgspec.json.encode({**msgspec.json.decode(valid), kv[0]: kv[1]})
    )
    return flip | cut | swap


def _records(valid: bytes) -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=120) | json_values.map(lambda v: msgspec.json.encode(v))
        | _mutated(valid)
    )  # fmt: skip


async def _store_on(engine: MemoryEngine) -> ServiceStore:
    members = await engine.bucket(BucketSpec(name=NAMES.bucket("members")))
    return await ServiceStore.open(engine, NAMES, members)


@PROPS
@given(st.lists(_records(msgspec.json.encode(GOOD)), min_size=1, max_size=8))
def test_the_ledger_loop_skips_malformed_records_and_keeps_the_good_ones(bad: list[bytes]) -> None:
    async def main() -> None:
        engine = MemoryEngine()
        store = await _store_on(engine)
        subject = f"{NAMES.prefix}.ledger.web_replicas"
        good = 0
        for data in bad:
            await engine.append(subject, data)
            await store.assess(GOOD)  # a well-formed record after each one
            good += 1
        read = await store.ledger()
        expected = good + sum(1 for d in bad if decoded(Assessment, d, "test") is not None)
        assert len(read) == expected
        assert sum(1 for a in read if a.evidence == GOOD.evidence and a.at == GOOD.at) >= good

    asyncio.run(main())


@PROPS
@given(st.dictionaries(st.text("abcxyz.", min_size=1, max_size=6),
                       _records(msgspec.json.encode(GOOD_INSTANCE)), max_size=6))  # fmt: skip
def test_bucket_loops_skip_malformed_entries(bad: dict[str, bytes]) -> None:
    async def main() -> None:
        engine = MemoryEngine()
        store = await _store_on(engine)
        await store.put_instance(GOOD_INSTANCE)
        for key, data in bad.items():
            for kv in (store.instances_kv, store.placements_kv, store.specs_kv, store.members_kv):
                await kv.put(f"z{key}", data)
            await store.promises_kv.put(f"p.z{key}", data)
        # (a mutation may still decode, e.g. to another service name: only the good one is known)
        assert "web" in [i.service for i in await store.instances() if i.node == "node-1"]
        await store.placements()
        await store.specs()
        await store.nodes()
        await records(store)

    asyncio.run(main())


def test_the_first_malformed_record_of_a_source_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "_malformed", set())

    async def main() -> None:
        engine = MemoryEngine()
        store = await _store_on(engine)
        for _ in range(5):
            await engine.append(f"{NAMES.prefix}.ledger.x", b"\xff not json")
        await store.assess(GOOD)
        for _ in range(3):
            assert [a.promise for a in await store.ledger()] == [GOOD.promise]

    with caplog.at_level(logging.WARNING, logger="accord.services"):
        asyncio.run(main())
    skipped = [r for r in caplog.records if "malformed ledger" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in caplog.records]
