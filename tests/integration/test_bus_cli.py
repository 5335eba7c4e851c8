"""`accord bus` and `accord dlq --bus` against a real redis-server: publish, tail, stats, a poison
event's dead letter listed and replayed by the CLI, and bad input / unreachable stores as one
clear line with exit code 2 / 1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import accord
from accord.testing.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("ACCORD_NATS", "ACCORD_BUS")}
    return subprocess.run(
        [sys.executable, "-m", "accord", *args], capture_output=True, text=True, timeout=40,
        env={**base, "ACCORD_HOME": str(home)}, cwd=ROOT,
    )  # fmt: skip


async def cli_async(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, home=home)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


class Charge(msgspec.Struct):
    order: str
    amount: int


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["bus", "publish", "t", "Charge", "{not json", "--bus", "redis://127.0.0.1:1"], 2,
         "not valid JSON"),
        (["bus", "stats", "--bus", "redis://127.0.0.1:1"], 1, "Redis unavailable"),
        (["bus", "stats"], 2, "no bus given"),
    ],
)  # fmt: skip
def test_bad_input_and_unreachable_stores_are_one_clear_line(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    result = cli(*args, home=tmp_path)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_publish_tail_stats_and_dead_letter_replay(redis_url: str, tmp_path: Path) -> None:
    """The CLI publishes; two groups each receive every event;
    the poison one is dead-lettered by group `billing` after max_deliver, listed by `accord dlq
    list --bus` with topic, group, attempts and error, replayed by `accord dlq replay --bus`,
    and then handled by `billing` once its handler is fixed."""
    async with accord.bus.connect(redis_url) as bus:
        await bus.publish("charges", Charge("o1", 5), key="c1")
    r = await cli_async("bus", "publish", "charges", "Charge", '{"order": "poison", "amount": 5}',
                        "--key", "c1", "--bus", redis_url, home=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "published" in r.stdout, r.stderr
    async with accord.bus.connect(redis_url) as bus:
        await bus.publish("charges", Charge("o2", 5), key="c1")
    healed = False
    billing: list[str] = []
    audit: list[str] = []

    async def bill(msg: Charge, d: accord.bus.Delivery) -> None:
        if msg.order == "poison" and not healed:
            raise RuntimeError("card declined")
        billing.append(msg.order)

    async def record(msg: Charge) -> None:
        audit.append(msg.order)

    async with accord.bus.connect(redis_url) as bus:
        s1 = await bus.subscribe("charges", group="billing", handler=bill, max_deliver=2,
                                 min_idle=1)  # fmt: skip
        s2 = await bus.subscribe("charges", group="audit", handler=record, min_idle=1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (billing != ["o1", "o2"] or len(audit) < 3) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert billing == ["o1", "o2"] and audit == ["o1", "poison", "o2"]
        tail = await cli_async("bus", "tail", "charges", "--count", "3", "--bus", redis_url,
                               home=tmp_path)  # fmt: skip
        lines = [json.loads(x) for x in tail.stdout.splitlines()]
        assert [x["body"]["order"] for x in lines] == ["o1", "poison", "o2"], tail.stderr
        listed = await cli_async("dlq", "list", "--bus", redis_url, "--json", home=tmp_path)
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)["bus"]
        assert len(letters) == 1
        letter = letters[0]
        assert (letter["topic"], letter["group"], letter["attempts"]) == ("charges", "billing", 2)
        assert "card declined" in letter["error"]
        stats = await cli_async("bus", "stats", "--json", "--bus", redis_url, home=tmp_path)
        rows = {r["group"]: r for r in json.loads(stats.stdout) if r["topic"] == "charges"}
        assert rows["billing"]["dead_letters"] == 1 and rows["billing"]["published"] == 3
        assert set(rows) == {"billing", "audit"}  # tail removed the group of its own on exit
        shown = await cli_async("dlq", "show", "--bus", redis_url, "--id", letter["id"],
                                home=tmp_path)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["body"] == {"order": "poison", "amount": 5}
        healed = True
        replay = await cli_async("dlq", "replay", "--bus", redis_url, "--id", letter["id"],
                                 home=tmp_path)  # fmt: skip
        assert replay.returncode == 0, replay.stderr
        deadline = loop.time() + 20
        while billing[-1:] != ["poison"] and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert billing == ["o1", "o2", "poison"]
        assert await bus.dead_letters() == []
        await s1.stop()
        await s2.stop()
    assert audit == ["o1", "poison", "o2"]  # the replay was billing's only


async def test_dlq_purge_removes_a_bus_dead_letter(redis_url: str, tmp_path: Path) -> None:
    """`accord dlq purge --bus URL --id ID` deletes that bus dead letter; an unknown id is one
    clear line and exit 2."""
    async with accord.bus.connect(redis_url) as bus:
        await bus.publish("refunds", Charge("r1", 1), key="c")

        async def declined(msg: Charge) -> None:
            raise RuntimeError("declined")

        sub = await bus.subscribe("refunds", group="g", handler=declined, max_deliver=1,
                                  min_idle=1)  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not [x for x in await bus.dead_letters() if x.topic == "refunds"]:
            assert loop.time() < deadline, "no dead letter"
            await asyncio.sleep(0.05)
        await sub.stop()
        (letter,) = [x for x in await bus.dead_letters() if x.topic == "refunds"]
        gone = await cli_async("dlq", "purge", "--bus", redis_url, "--id", letter.id,
                               home=tmp_path)  # fmt: skip
        assert gone.returncode == 0 and "purged 1" in gone.stdout, gone.stderr
        assert not [x for x in await bus.dead_letters() if x.id == letter.id]
    again = await cli_async("dlq", "purge", "--bus", redis_url, "--id", letter.id, home=tmp_path)
    assert again.returncode == 2 and "no bus dead letter" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
