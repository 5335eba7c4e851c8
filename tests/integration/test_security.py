"""Security of an `accord up` cluster (auth on by default, `--tls`), proven against the real
server: no credentials or a wrong CA are refused, the local CLI needs no flags, a `client`
credential can ask but cannot take a lease, write state, subscribe to a shard or consume the
mailbox (the cluster unaffected), an `observer` cannot ask, a revoked credential is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import accord
from accord.engine._api import BucketSpec, ConsumerSpec
from accord.engine._auth import Credentials
from accord.engine._nats import NatsTransport
from accord.engine._tls import ensure_ca
from accord.testing import eventually, eventually_async

ROOT = Path(__file__).resolve().parents[2]


class Up:
    def __init__(self, home: Path, env: dict[str, str], proc: subprocess.Popen[bytes], url: str):
        self.home, self.env, self.proc, self.url = home, env, proc, url

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "accord", *args],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=self.env,
        )  # fmt: skip


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`accord up --tls --nodes 2` under its own ACCORD_HOME, stopped by PID afterwards."""
    tmp = tmp_path_factory.mktemp("secure-up")
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCORD_NATS", "ACCORD_CR"))}
    env["ACCORD_HOME"] = str(home)
    log = open(tmp / "up.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord", "up", "--tls", "--nodes", "2",
         "--app", "examples/counter_app.py"],
        cwd=ROOT, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url_file = home / "url"
        url = eventually(lambda: url_file.exists() and url_file.read_text().strip(), 30, "url file")
        it = Up(home, env, proc, url)

        def owned() -> bool:
            done = it.cli("status", "--json")
            if done.returncode != 0:
                return False
            st = json.loads(done.stdout)
            return len(st["shards"]) == st["num_shards"]

        eventually(owned, 60, "every shard owned")
        yield it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _ignore(_msg: Any) -> None:
    return None


def test_secrets_are_private_to_their_owner(up: Up) -> None:
    for f in (up.home / "auth" / "local.creds", up.home / "auth" / "users.json",
              up.home / "tls" / "ca-key.pem", up.home / "tls" / "server-key.pem"):  # fmt: skip
        assert f.stat().st_mode & 0o077 == 0, f


def test_a_connection_without_credentials_is_refused(up: Up) -> None:
    async def main() -> None:
        with pytest.raises(accord.NotConnected, match=r"[Aa]uthoriz"):
            await NatsTransport.connect([up.url], "anon", timeout=2,
                                        credentials=Credentials(tls_ca=up.ca))  # fmt: skip

    asyncio.run(main())


def test_a_client_with_the_wrong_ca_cannot_connect(up: Up, tmp_path: Path) -> None:
    other_ca, _ = ensure_ca(tmp_path / "other")
    creds = up.home / "auth" / "local.creds"

    async def main() -> None:
        with pytest.raises(accord.NotConnected, match=r"(?i)certificate|ssl"):
            await NatsTransport.connect([up.url], "mitm", timeout=2,
                                        credentials=Credentials(creds, other_ca))  # fmt: skip

    asyncio.run(main())


def test_accord_ask_on_the_same_machine_needs_no_flags(up: Up) -> None:
    asked = up.cli("ask", "counter/sec1", "Increment", '{"by": 2}', "--timeout", "30")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["value"] == 2


def test_client_can_ask_but_not_touch_leases_state_shards_or_the_mailbox(
    up: Up, tmp_path: Path
) -> None:
    made = up.cli("creds", "create", "app1", "--role", "client", "--out", str(tmp_path / "c"))
    assert made.returncode == 0, made.stderr
    client = Credentials(tmp_path / "c", up.ca)

    async def main() -> None:
        async with accord.connect(up.url, creds=tmp_path / "c", tls_ca=up.ca) as mesh:
            reply = await mesh.ask_json("counter/sec2", "Increment", b'{"by": 5}', timeout=30)
            assert reply["value"] == 5
        t = await NatsTransport.connect([up.url], "intruder", credentials=client)
        try:
            leases = await t.bucket(BucketSpec(name="accord_default_leases"), create=False)
            # Refused at once (the server's permission violation ends the request), long before
            # the request's own 60 s timeout; the 20 s bound is only a deadline.
            with pytest.raises(accord.PermissionDenied):
                await asyncio.wait_for(leases.put("shard.0", b"mine", timeout=60.0), 20)
            state = await t.bucket(BucketSpec(name="accord_default_state"), create=False)
            with pytest.raises(accord.PermissionDenied):
                await asyncio.wait_for(state.put("counter.c2VjMg", b"\x00", timeout=60.0), 20)
            sub = await t.subscribe("accord.default.shard.0", _ignore)
            with pytest.raises(accord.PermissionDenied):
                await t.check_subscription("accord.default.shard.0")
            await sub.unsubscribe()
            with pytest.raises(accord.PermissionDenied):  # at once too (nats-py's own request)
                await asyncio.wait_for(
                    t.ensure_consumer("accord_default_mailbox",
                                      ConsumerSpec(name="steal", filter_subject=">"), timeout=60.0),
                    20,
                )  # fmt: skip
        finally:
            await t.close()

    asyncio.run(main())
    # the cluster is unaffected: its state and its shard owners are as before
    again = up.cli("ask", "counter/sec2", "Get", "{}")
    assert again.returncode == 0 and json.loads(again.stdout)["value"] == 5, again.stderr
    st = json.loads(up.cli("status", "--json").stdout)
    assert {s["owner"] for s in st["shards"]} == {"node-1", "node-2"}


def test_observer_cannot_ask_and_a_revoked_credential_is_refused(up: Up, tmp_path: Path) -> None:
    made = up.cli("creds", "create", "watcher", "--role", "observer", "--out", str(tmp_path / "o"))
    assert made.returncode == 0, made.stderr

    async def main() -> None:
        async with accord.connect(up.url, creds=tmp_path / "o", tls_ca=up.ca) as mesh:
            with pytest.raises(accord.PermissionDenied):  # at once, not at the ask's timeout
                await asyncio.wait_for(mesh.ask_json("counter/sec3", "Get", b"{}", timeout=60), 20)

    asyncio.run(main())
    status = up.cli("--creds", str(tmp_path / "o"), "--tls-ca", str(up.ca), "status", "--json",
                    "--nats", up.url)  # fmt: skip
    assert status.returncode == 0, status.stderr  # what an observer is for
    assert len(json.loads(status.stdout)["shards"]) == json.loads(status.stdout)["num_shards"]
    listed = up.cli("creds", "list")
    assert "watcher" in listed.stdout and "observer" in listed.stdout
    assert up.cli("creds", "revoke", "watcher").returncode == 0

    async def refused() -> None:
        with pytest.raises(accord.NotConnected, match=r"[Aa]uthoriz"):
            await NatsTransport.connect([up.url], "revoked", timeout=2,
                                        credentials=Credentials(tmp_path / "o", up.ca))  # fmt: skip

    asyncio.run(refused())


def test_a_message_over_max_payload_is_refused_before_sending(up: Up) -> None:
    big = b'{"by": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}'

    async def main() -> None:
        async with accord.connect(up.url, creds=up.home / "auth" / "local.creds",
                                  tls_ca=up.ca) as mesh:  # fmt: skip
            with pytest.raises(accord.MessageTooLarge, match="max_payload"):
                await mesh.ask_json("counter/big", "Increment", big, timeout=5)
            # the connection survived: nats-py was never handed the oversized message
            reply = await mesh.ask_json("counter/big", "Increment", b'{"by": 1}', timeout=30)
            assert reply["value"] == 1

    asyncio.run(main())


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    from accord.engine._auth import UserRegistry
    from accord.engine._server import EmbeddedServer
    from accord.engine._serverconf import ServerSecurity
    from accord.engine._tls import issue_cert

    reg = UserRegistry(tmp_path / "auth")
    creds = reg.issue("n", "node", "*")
    tls = issue_cert(tmp_path / "tls", "server", ["127.0.0.1"])
    mine = issue_cert(tmp_path / "tls", "client", ["client"], client=True)
    security = ServerSecurity(registry=reg, tls=tls, verify_clients=True)
    server = EmbeddedServer(tmp_path / "data", security=security)
    url = server.start()

    async def main() -> None:
        ok = await NatsTransport.connect(
            [url],
            "with-cert",
            timeout=2,
            credentials=Credentials(creds, tls.ca, mine.cert, mine.key),
        )
        await ok.close()
        with pytest.raises(accord.NotConnected, match="client certificate"):
            await NatsTransport.connect([url], "no-cert", timeout=2,
                                        credentials=Credentials(creds, tls.ca))  # fmt: skip

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_tls_connection_writes_a_flush_as_one_record_also_after_a_reconnection(
    tmp_path: Path,
) -> None:
    """nats-py queues one command per publish; over TLS each used to become a TLS record of its
    own (the CPU cost of TLS per ask). Proves a flush of many publishes is one `SSLObject.write`,
    that every message arrives once and in order, and that a reconnected transport does the same."""
    from accord.engine._auth import UserRegistry
    from accord.engine._server import EmbeddedServer
    from accord.engine._serverconf import ServerSecurity
    from accord.engine._tls import issue_cert

    reg = UserRegistry(tmp_path / "auth")
    creds = reg.issue("n", "node", "*")
    tls = issue_cert(tmp_path / "tls", "server", ["127.0.0.1"])
    server = EmbeddedServer(tmp_path / "data", security=ServerSecurity(registry=reg, tls=tls))
    url = server.start()

    async def burst(t: NatsTransport, got: list[bytes], n: int) -> int:
        """Publish n messages in one turn of the loop; return the SSLObject writes they took."""
        sslobj = t.nc._transport._io_writer.transport._ssl_protocol._sslobj
        writes = 0
        write = sslobj.write

        def counting(data: bytes) -> int:
            nonlocal writes
            writes += 1
            return write(data)

        sslobj.write = counting
        try:
            del got[:]
            await asyncio.gather(*(t.publish("accord.x.burst", b"%d" % i) for i in range(n)))
            await eventually_async(lambda: len(got) >= n, 30, f"{n} messages back")
        finally:
            sslobj.write = write
        assert got == [b"%d" % i for i in range(n)]  # once each, in order
        return writes

    async def main() -> None:
        t = await NatsTransport.connect([url], "burst", timeout=5,
                                        credentials=Credentials(creds, tls.ca))  # fmt: skip
        try:
            got: list[bytes] = []
            await t.subscribe_direct("accord.x.burst", lambda m: got.append(m.data))
            await t.flush(5)
            assert await burst(t, got, 200) <= 2  # the burst, maybe the subscription's echo
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            await eventually_async(lambda: t.nc.is_connected and t.nc.stats["reconnects"] >= 1,
                               60, "reconnected")  # fmt: skip
            await t.flush(10)
            assert await burst(t, got, 200) <= 2
        finally:
            await t.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_client_asking_for_tls_refuses_a_server_without_it(tmp_path: Path) -> None:
    """nats-py upgrades to TLS only when the server asks for it: a client given a CA must not go
    on in clear with a server (or a man in the middle) that does not, at first connect or after
    a reconnection. By default the client starts with the TLS handshake (the server's INFO never
    read in clear) and a server in clear is refused at once; `tls_first=False` (for servers
    without `handshake_first`, which accord's own servers still serve after 300 ms) checks after
    INFO and closes the connection."""
    from accord.engine._server import EmbeddedServer
    from accord.engine._serverconf import ServerSecurity
    from accord.engine._tls import issue_cert

    tls = issue_cert(tmp_path / "tls", "server", ["127.0.0.1"])
    secure = EmbeddedServer(tmp_path / "tls-data", security=ServerSecurity(tls=tls))
    secure_url = secure.start()
    plain = EmbeddedServer(tmp_path / "plain", port=secure.port)  # started when secure stops

    async def main() -> None:
        late = Credentials(tls_ca=tls.ca, tls_first=False)
        t = await NatsTransport.connect([secure_url], "strict", timeout=5, credentials=late)
        try:
            await asyncio.to_thread(secure.stop)
            url = await asyncio.to_thread(plain.start)  # the same port, in clear
            await eventually_async(lambda: t.nc.is_closed, 60, "the connection closed")
        finally:
            await t.close()
        with pytest.raises(accord.NotConnected, match="did not offer"):
            await NatsTransport.connect([url], "strict", timeout=5, credentials=late)
        with pytest.raises(accord.NotConnected, match="answered in clear"):
            await NatsTransport.connect([url], "strict", timeout=5,
                                        credentials=Credentials(tls_ca=tls.ca))  # fmt: skip

    try:
        asyncio.run(main())
    finally:
        secure.stop()
        plain.stop()
