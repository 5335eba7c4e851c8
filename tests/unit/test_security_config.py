"""What accord writes for security, without a server: role permissions, 0600 secrets, where
credentials are found, the embedded server's refusal to listen openly without authentication,
and the multi-machine configurations."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from accord import ConfigurationError
from accord.engine._auth import Credentials, UserRegistry, inbox_prefix, permissions, public_key
from accord.engine._resolve import resolve_credentials
from accord.engine._server import EmbeddedServer
from accord.engine._serverconf import ServerSecurity, machine_configs
from accord.engine._tls import issue_cert


def test_client_may_ask_and_read_status_but_never_write_leases_state_or_subscribe_shards() -> None:
    perms = permissions("client", "C", "UABCDEFGHIJKLMNOPQRSTUVWXYZ")
    pub, sub = perms["publish"]["allow"], perms["subscribe"]["allow"]
    assert "accord.C.shard.*" in pub and "accord.C.admin.status" in pub
    assert not [s for s in pub if s.startswith("$KV.")]  # no bucket write at all
    assert not [s for s in pub if "KV_accord_C_state" in s]  # nor a read of the state
    assert not [s for s in pub if "accord_C_mailbox" in s]  # nor a mailbox consumer
    # its own replies, and workflow runs' end announcements (what `handle.result()` waits for)
    assert sub == [f"{inbox_prefix('UABCDEFGHIJKLMNOPQRSTUVWXYZ')}.>", "accord.C.wf.done.*"]


@pytest.mark.parametrize("role", ["client", "observer"])
def test_client_and_observer_read_status_views_but_write_no_bucket_or_stream(role: str) -> None:
    pub = permissions(role, "C", "UKEY")["publish"]["allow"]  # type: ignore[arg-type]
    writes = ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE",
              "STREAM.MSG.DELETE", "CONSUMER.DURABLE")  # fmt: skip
    assert not [s for s in pub if any(f"$JS.API.{w}" in s for w in writes)]
    assert not [s for s in pub if s.startswith(("$KV.", "$JS.ACK", "accord.C.dlq",
                                                "accord.C.ledger", "accord.C.logs"))]  # fmt: skip
    assert not [s for s in pub if "KV_accord_C_coord" in s]  # counters, fenced values: no read
    for view in ("KV_accord_C_locks", "KV_accord_C_workflows", "KV_accord_C_services",
                 "accord_C_dlq", "accord_C_ledger"):  # fmt: skip
        assert f"$JS.API.STREAM.MSG.GET.{view}" in pub, view
    assert "$JS.API.STREAM.LIST" in pub  # `accord status`'s replication section


def test_observer_may_not_publish_to_any_agent() -> None:
    pub = permissions("observer", "C", "UKEY")["publish"]["allow"]
    assert not [s for s in pub if s.startswith(("accord.C.shard", "accord.C.standby",
                                                "accord.C.mbox"))]  # fmt: skip


def test_issued_credentials_are_private_and_only_public_keys_are_listed(tmp_path: Path) -> None:
    reg = UserRegistry(tmp_path / "auth")
    path = reg.issue("app", "client", "default")
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "auth" / "users.json").stat().st_mode & 0o777 == 0o600
    [user] = reg.load()
    assert user.public == public_key(path.read_bytes()) and user.public.startswith("U")
    assert path.read_bytes().strip() not in (tmp_path / "auth" / "users.json").read_bytes()
    with pytest.raises(ConfigurationError, match="exists"):
        reg.issue("app", "client", "default")
    reg.revoke("app")
    assert reg.load() == [] and not path.exists()


def test_local_credentials_apply_only_to_the_local_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCORD_HOME", str(tmp_path))
    for var in ("ACCORD_CREDS", "ACCORD_TLS_CA", "ACCORD_TLS_CERT", "ACCORD_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    UserRegistry(tmp_path / "auth").issue("local", "node", "*", out=tmp_path / "auth/local.creds")
    (tmp_path / "url").write_text("nats://127.0.0.1:4999")
    assert resolve_credentials(None).creds == tmp_path / "auth/local.creds"
    assert resolve_credentials("nats://127.0.0.1:4999").creds == tmp_path / "auth/local.creds"
    assert resolve_credentials("nats://elsewhere:4222").creds is None
    monkeypatch.setenv("ACCORD_CREDS", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="not found"):
        resolve_credentials("nats://elsewhere:4222")


def test_a_seed_file_gives_nkey_options_and_a_private_inbox(tmp_path: Path) -> None:
    path = UserRegistry(tmp_path).issue("x", "client", "default")
    opts = Credentials(path).connect_options()
    assert opts["nkeys_seed_str"].startswith("SU")
    assert opts["inbox_prefix"] == inbox_prefix(public_key(path.read_bytes()))


def test_the_embedded_server_refuses_a_public_address_without_authentication() -> None:
    with pytest.raises(ConfigurationError, match="without authentication"):
        EmbeddedServer(host="0.0.0.0")
    EmbeddedServer(host="127.0.0.1")  # loopback stays allowed (nothing is started here)


def test_machine_configs_route_every_host_with_tls_fsync_and_users(tmp_path: Path) -> None:
    reg = UserRegistry(tmp_path / "auth")
    reg.issue("n", "node", "default")
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    tls = {h: issue_cert(tmp_path / "pki", h, hosts, client=True) for h in hosts}
    confs = machine_configs(hosts, users=reg.load(), tls=tls)
    for h, conf in confs.items():
        routes = conf["cluster"]["routes"]
        assert len(routes) == 2 and not any(h in r for r in routes)
        assert conf["jetstream"]["sync_interval"] == "always"
        assert conf["tls"]["ca_file"] and conf["cluster"]["tls"]["verify"] is True
        # clients may start with TLS (no INFO in clear); a route has no such option
        assert conf["tls"]["handshake_first"] == "300ms"
        assert "handshake_first" not in conf["cluster"]["tls"]
        assert conf["authorization"]["users"][0]["nkey"].startswith("U")
        assert conf["max_payload"] == 1024 * 1024
        json.dumps(conf)  # what nats-server reads


def test_sync_always_is_written_for_the_embedded_server(tmp_path: Path) -> None:
    conf = ServerSecurity(sync="always").render()
    assert conf["jetstream"] == {"sync_interval": "always"}
    assert "authorization" not in conf


def test_a_missing_credentials_file_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from accord._cli import app

    done = CliRunner().invoke(app, ["--creds", str(tmp_path / "nope"), "status"])
    assert done.exit_code == 2
    assert "no such file" in done.output and "Traceback" not in done.output


def test_creds_create_refuses_an_unknown_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from accord._cli import app

    monkeypatch.setenv("ACCORD_HOME", str(tmp_path))
    done = CliRunner().invoke(app, ["creds", "create", "x", "--role", "admin"])
    assert done.exit_code == 2 and "role" in done.output


def test_every_command_that_talks_to_a_cluster_takes_the_connection_options() -> None:
    import typer

    from accord._cli import app

    def walk(cmd: Any, path: str) -> list[tuple[str, set[str]]]:
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        found = [(path, opts)]
        for name, sub in getattr(cmd, "commands", {}).items():
            found += walk(sub, f"{path} {name}")
        return found

    commands = walk(typer.main.get_command(app), "accord")
    connecting = [(p, o) for p, o in commands if o & {"--nats", "--bus"}]
    assert len(connecting) > 20  # ask, tell, status, workflows show, dlq list, bus tail, ...
    for path, opts in connecting:
        assert {"--creds", "--tls-ca", "--tls-cert", "--tls-key"} <= opts, path
    up = dict(commands)["accord up"]  # its --tls-* are its server's PKI: kept, no --creds
    assert "--tls-cert" in up and "--creds" not in up


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> str:
    """A TLS handshake between the two contexts over memory BIOs; the version agreed."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return str(c.version())


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_generated_certificates_pass_strict_x509_verification(tmp_path: Path, host: str) -> None:
    """Python 3.13's default client context verifies strictly (RFC 5280: key identifiers, key
    usage); the generated CA and certificates must pass it on every version, mutual TLS too."""
    srv = issue_cert(tmp_path, "server", ["127.0.0.1", "localhost"])
    cli = issue_cert(tmp_path, "client", ["client"], client=True)
    server = _server_context(srv.cert, srv.key)
    server.load_verify_locations(srv.ca)
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = Credentials(tls_ca=srv.ca, tls_cert=cli.cert, tls_key=cli.key).ssl_context()
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _handshake(client, server, host) == "TLSv1.3"


def test_a_ca_without_a_key_identifier_is_re_signed_and_what_it_signed_still_verifies(
    tmp_path: Path,
) -> None:
    """A CA made before accord wrote key identifiers (Python 3.13's clients refuse it) is
    re-signed in place with its own key when it next issues a certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accord accord CA")])
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)

    def cert(subject: x509.Name, public: Any, *, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        )  # fmt: skip
        if ca:
            b = b.add_extension(usage, critical=True)
        else:
            ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            b = b.add_extension(x509.SubjectAlternativeName([ip]), critical=False)
        return b.sign(key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    pkcs8 = (pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "ca.pem").write_bytes(cert(name, key.public_key(), ca=True).public_bytes(pem))
    (tmp_path / "ca-key.pem").write_bytes(key.private_bytes(*pkcs8))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]),
                leaf_key.public_key(), ca=False)  # fmt: skip
    (tmp_path / "old.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "old-key.pem").write_bytes(leaf_key.private_bytes(*pkcs8))

    srv = issue_cert(tmp_path, "server", ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(srv.ca.read_bytes())
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)  # raises if absent
    assert ca.subject == name and ca.public_key() == key.public_key()
    strict = Credentials(tls_ca=srv.ca).ssl_context()
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _handshake(strict, _server_context(srv.cert, srv.key), "127.0.0.1") == "TLSv1.3"
    lenient = Credentials(tls_ca=srv.ca).ssl_context()  # what 3.11 and 3.12 check by default
    lenient.verify_flags &= ~ssl.VERIFY_X509_STRICT
    old = _server_context(tmp_path / "old.pem", tmp_path / "old-key.pem")
    assert _handshake(lenient, old, "127.0.0.1") == "TLSv1.3"
