"""What each role may do on a secure cluster (NKeys + TLS, `Cluster(secure=True)`), against the
real server's permissions: a `client` credential runs workflows end to end (start, status,
signal, result through the end announcement, cancel) and reads every status view; an
`observer` reads them too (the CLI's and the dashboard's) but cannot start a run; what neither
may do (the coordination facade, mailbox consumers, state watches, creating buckets) is refused
with `PermissionDenied` at once, not at the call's timeout. The connection options work after
the subcommand, the later one winning."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import accord
from accord.engine._api import BucketSpec, ConsumerSpec, StreamSpec
from accord.engine._auth import Credentials
from accord.engine._nats import NatsTransport
from accord.testing import Cluster, wait_for_placement

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "workflow_app.py")
sys.path.insert(0, str(ROOT / "examples"))

from workflow_app import Approve, Job  # noqa: E402

#: A refusal must end a call long before its own timeout (LONG); BOUND only keeps a broken
#: build from hanging the suite.
LONG, BOUND = 60.0, 20.0


class Roles:
    def __init__(self, cluster: Cluster, client: Path, observer: Path) -> None:
        self.cluster, self.client, self.observer = cluster, client, observer

    def connect(self, creds: Path) -> Any:
        return accord.connect(self.cluster.url, creds=creds, tls_ca=self.cluster.tls_ca)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`accord ARGS` with no credential nor CA but what ARGS give."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCORD_NATS", "ACCORD_CR",
                                                                       "ACCORD_TLS"))}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "accord", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roles]:
    tmp = tmp_path_factory.mktemp("roles")
    with Cluster(APP, 1, secure=True, log_dir=tmp) as c:

        async def placed() -> None:
            async with c.connect() as mesh:
                await wait_for_placement(mesh, set(c.nodes))

        asyncio.run(placed())
        yield Roles(c, c.issue("app", "client"), c.issue("watcher", "observer"))


async def test_a_client_runs_workflows_start_signal_status_result_and_cancel(roles: Roles) -> None:
    async with roles.connect(roles.client) as mesh:
        chain = await mesh.start_workflow("chain", "sec-c1", Job(n=3), timeout=LONG)
        assert await chain.result(timeout=LONG) == 2 * 3 + 1 + 10
        again = await mesh.workflow("chain/sec-c1")
        assert (await again.status()).state == "completed"
        waiting = await mesh.start_workflow("approval", "sec-a1", Job(n=120), timeout=LONG)
        await waiting.signal(Approve(by="client"))
        assert "client" in str(await waiting.result(timeout=LONG))
        booking = await mesh.start_workflow("booking", "sec-b1", Job(n=120), timeout=LONG)
        assert (await booking.cancel(timeout=LONG)).state == "cancelled"
        # the end announcements were heard (no refused subscription): result() did not poll
        assert not [k for k in mesh._transport.denied if k[0] == "subscription"]


async def test_an_observer_cannot_start_a_workflow_refused_at_once(roles: Roles) -> None:
    async with roles.connect(roles.observer) as mesh:
        with pytest.raises(accord.PermissionDenied):
            await asyncio.wait_for(
                mesh.start_workflow("chain", "sec-o1", Job(n=1), timeout=LONG), BOUND
            )


def test_an_observer_reads_every_status_view_with_its_options_after_the_subcommand(
    roles: Roles,
) -> None:
    async def run_one() -> None:  # a run of this test's own, for the views to show
        async with roles.connect(roles.client) as mesh:
            done = await mesh.start_workflow("chain", "sec-v1", Job(n=2), timeout=LONG)
            assert await done.result(timeout=LONG) == 2 * 2 + 1 + 10

    asyncio.run(run_one())
    opts = ["--creds", str(roles.observer), "--tls-ca", str(roles.cluster.tls_ca),
            "--nats", roles.cluster.url]  # fmt: skip
    for cmd in (["status"], ["leases"], ["workflows"], ["services"], ["promises"]):
        done = roles.cli(*cmd, "--json", *opts)
        assert done.returncode == 0, (cmd, done.stderr)
    assert roles.cli("dlq", "list", *opts).returncode == 0
    # The run is in the run index, as `workflows` and `top` show it (polled: the index entry
    # of its end may land after its result on a loaded machine).
    deadline = time.monotonic() + 30
    while True:
        top = roles.cli("top", "--once", "--json", *opts)
        assert top.returncode == 0, top.stderr
        snap = json.loads(top.stdout)
        assert snap["errors"] == {}, snap["errors"]
        if "chain/sec-v1" in {r["id"] for r in snap["workflows"]}:
            break
        listed = roles.cli("workflows", "--json", *opts)
        assert time.monotonic() < deadline, (snap["workflows"], listed.stdout, listed.stderr)
        time.sleep(0.5)


def test_the_later_connection_option_wins_and_a_missing_file_is_bad_input(
    roles: Roles, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.creds"
    junk.write_text("not a seed\n")
    where = ["--tls-ca", str(roles.cluster.tls_ca), "--nats", roles.cluster.url]
    after = roles.cli("--creds", str(junk), "status", "--creds", str(roles.client), *where)
    assert after.returncode == 0, after.stderr  # the subcommand's --creds overrides the global
    before = roles.cli("--creds", str(roles.client), "status", "--creds", str(junk), *where)
    assert before.returncode == 2 and "NKey" in before.stderr, before.stderr
    missing = roles.cli("status", "--creds", str(tmp_path / "none"), *where)
    assert missing.returncode == 2 and "no such file" in missing.stderr


async def test_the_dashboard_works_as_an_observer(roles: Roles) -> None:
    from accord.dashboard import Observer, Poller
    from accord.dashboard._server import serving

    async with roles.connect(roles.observer) as mesh:
        observer = Observer(mesh, watch_leases=True)
        try:
            async with (
                serving(Poller(observer), "127.0.0.1", 0) as url,
                aiohttp.ClientSession() as http,
            ):
                async with http.get(f"{url}/api/snapshot") as resp:
                    assert resp.status == 200
                    snap = await resp.json()
                assert snap["errors"] == {}, snap["errors"]
                assert len(snap["shards"]) == snap["num_shards"]
        finally:
            await observer.close()


async def test_what_a_client_may_not_do_is_refused_at_once(roles: Roles) -> None:
    async with roles.connect(roles.client) as mesh:
        with pytest.raises(accord.PermissionDenied):  # the coordination facade writes buckets
            await asyncio.wait_for(mesh.counter_add("sec-jobs"), BOUND)
    t = await NatsTransport.connect(
        [roles.cluster.url], "sec-intruder", credentials=Credentials(roles.client,
                                                                     roles.cluster.tls_ca),
    )  # fmt: skip
    try:
        # nats-py's JetStream helpers: woken by the server's violation, not at LONG
        with pytest.raises(accord.PermissionDenied):
            await asyncio.wait_for(
                t.ensure_consumer("accord_default_mailbox",
                                  ConsumerSpec(name="steal", filter_subject=">"), timeout=LONG),
                BOUND,
            )  # fmt: skip
        state = await t.bucket(BucketSpec(name="accord_default_state"), create=False)
        with pytest.raises(accord.PermissionDenied):
            await asyncio.wait_for(state.watch(">", timeout=LONG), BOUND)
        with pytest.raises(accord.PermissionDenied):
            await asyncio.wait_for(t.bucket(BucketSpec(name="sec_new"), timeout=LONG), BOUND)
        with pytest.raises(accord.PermissionDenied):
            await asyncio.wait_for(
                t.ensure_stream(StreamSpec(name="sec_s", subjects=("sec.s",)), timeout=LONG),
                BOUND,
            )
        # and what it may do still works on the same connection afterwards
        leases = await t.bucket(BucketSpec(name="accord_default_leases"), create=False)
        assert (await leases.get("shard.0")) is not None
    finally:
        await t.close()
