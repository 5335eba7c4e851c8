"""Security commands: `accord creds create|list|revoke` (NKey users and their roles) and
`accord server config` (one nats-server configuration per machine); `up_security` prepares what
`accord up` enforces: credentials, TLS files and the fsync policy."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from .._errors import ConfigurationError
from ..engine._auth import ROLES, Role, UserRegistry
from ..engine._resolve import auth_dir, local_creds_file, local_tls_file, state_dir, tls_dir
from ..engine._serverconf import ServerSecurity, Sync, machine_configs
from ..engine._tls import TlsFiles, ensure_ca, issue_cert
from ._common import _run, app, out, print_error

creds_app = typer.Typer(help="Credentials: NKey users with a role (node, client, observer).")
app.add_typer(creds_app, name="creds")
server_app = typer.Typer(help="nats-server configurations for clusters on several machines.")
app.add_typer(server_app, name="server")

LOCAL_USER = "local"


def up_security(
    *,
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_verify: bool,
    sync: Sync,
) -> tuple[ServerSecurity, dict[str, str]]:
    """The embedded server's security for `accord up`, and the environment its nodes get.

    The local credential (role `node`, every cluster) is issued once into the state directory
    (0600); with `--tls` a CA and a server certificate for the loopback addresses are made there
    too; `--tls-ca/--tls-cert/--tls-key` use an existing PKI instead."""
    registry = UserRegistry(auth_dir())
    if not any(u.name == LOCAL_USER for u in registry.load()) or not local_creds_file().exists():
        if any(u.name == LOCAL_USER for u in registry.load()):
            registry.revoke(LOCAL_USER)  # its seed file is gone: a new one replaces it
        registry.issue(LOCAL_USER, "node", "*", out=local_creds_file())
    env = {"ACCORD_CREDS": str(local_creds_file())}
    files: TlsFiles | None = None
    if tls_cert or tls_key or tls_ca:
        if not (tls_cert and tls_key and tls_ca):
            raise ConfigurationError("--tls-ca, --tls-cert and --tls-key go together")
        for f in (tls_ca, tls_cert, tls_key):
            if not Path(f).is_file():
                raise ConfigurationError(f"TLS file {f} not found")
        files = TlsFiles(Path(tls_ca).resolve(), Path(tls_cert).resolve(), Path(tls_key).resolve())
    elif tls:
        files = issue_cert(tls_dir(), "server", ["127.0.0.1", "localhost", "::1"])
    local_tls_file().unlink(missing_ok=True)
    if files is not None:
        doc = {"ca": str(files.ca)}
        env["ACCORD_TLS_CA"] = str(files.ca)
        if tls_verify:  # mutual TLS: local clients and nodes present a certificate too
            client = issue_cert(tls_dir(), "local-client", ["local"], client=True)
            doc.update(cert=str(client.cert), key=str(client.key))
            env.update(ACCORD_TLS_CERT=str(client.cert), ACCORD_TLS_KEY=str(client.key))
        local_tls_file().write_text(json.dumps(doc))
    sec = ServerSecurity(registry=registry, tls=files, verify_clients=tls_verify, sync=sync)
    return sec, env


def _reload_local_server() -> bool:
    """Rewrite the running `accord up` server's configuration with the current users and have
    it reload (SIGHUP); False when no such server runs."""
    conf_path = state_dir() / "data" / "nats-server.conf"
    engine = state_dir() / "engine.json"
    if not conf_path.exists() or not engine.exists():
        return False
    try:
        pid = json.loads(engine.read_text()).get("pid")
        conf = json.loads(conf_path.read_text())
    except ValueError:
        return False
    if not pid or "authorization" not in conf:
        return False
    from ..engine._auth import authorization_block, write_private

    conf["authorization"] = authorization_block(UserRegistry(auth_dir()).load())
    write_private(conf_path, json.dumps(conf, indent=1).encode())
    try:
        os.kill(int(pid), signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


@creds_app.command("create")
def creds_create(
    name: Annotated[str, typer.Argument(help="A name for this credential (unique).")],
    role: Annotated[str, typer.Option("--role", help="node, client or observer.")] = "client",
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster it is valid for.")] = (
        "default"
    ),
    out_file: Annotated[str | None, typer.Option("--out", help="Where to write it.")] = None,
) -> None:
    """Issue a credential (an NKey seed file, mode 0600); a running `accord up` accepts it at
    once. For servers of several machines, run `accord server config` again."""

    path_out = Path(out_file).resolve() if out_file else None

    async def main() -> None:
        if role not in ROLES:
            raise ConfigurationError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        if role != "node" and cluster == "*":
            raise ConfigurationError("client and observer credentials name one cluster")
        role_: Role = role
        path = UserRegistry(auth_dir()).issue(name, role_, cluster, path_out)
        live = _reload_local_server()
        out.print(f"wrote {path} (role {role}, cluster {cluster})"
                  + ("; the local server reloaded" if live else ""))  # fmt: skip

    _run(main())


@creds_app.command("list")
def creds_list() -> None:
    """The credentials issued from this machine's state directory."""

    async def main() -> None:
        table = Table(title="credentials")
        for col in ("name", "role", "cluster", "public key"):
            table.add_column(col)
        for u in UserRegistry(auth_dir()).load():
            table.add_row(u.name, u.role, u.cluster, u.public[:16] + "…")
        out.print(table)

    _run(main())


@creds_app.command("revoke")
def creds_revoke(name: Annotated[str, typer.Argument(help="The credential's name.")]) -> None:
    """Revoke a credential: a running `accord up` reloads and closes its connections."""

    async def main() -> None:
        if name == LOCAL_USER:
            raise ConfigurationError("the local credential is accord up's own; stop it first")
        UserRegistry(auth_dir()).revoke(name)
        live = _reload_local_server()
        out.print(f"revoked {name}" + ("; the local server reloaded" if live else ""))

    _run(main())


@server_app.command("config")
def server_config(
    hosts: Annotated[str, typer.Option("--hosts", help="Comma-separated host names or IPs.")],
    out_dir: Annotated[str, typer.Option("--out", help="Directory for the files.")] = "accord-conf",
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="TLS on clients and routes.")] = True,
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster name.")] = "default",
    data_dir: Annotated[str, typer.Option("--data-dir", help="JetStream directory.")] = (
        "/var/lib/accord/nats"
    ),
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 4222,
    route_port: Annotated[int, typer.Option("--route-port", min=1, max=65535)] = 6222,
) -> None:
    """Write `<host>.conf` for each host (routes, JetStream sync always, users and
    permissions, TLS), plus `node.creds`, `client.creds` and `ca.pem` to hand out."""

    dest = Path(out_dir).resolve()

    def main() -> None:
        names = [h.strip() for h in hosts.split(",") if h.strip()]
        if not names:
            raise ConfigurationError("--hosts needs at least one host")
        dest.mkdir(parents=True, exist_ok=True)
        registry = UserRegistry(auth_dir())
        have = {u.name for u in registry.load()}
        for role in ("node", "client"):
            if f"{cluster}-{role}" not in have:
                registry.issue(f"{cluster}-{role}", role, cluster)
            shutil.copy2(auth_dir() / f"{cluster}-{role}.creds", dest / f"{role}.creds")
        files: dict[str, TlsFiles] | None = None
        if tls:
            pki = dest / "pki"
            ca, _ = ensure_ca(pki, cluster)
            # Every certificate names every host: a client that learns the other servers from
            # the one it was given verifies them under that first name (nats-py does, for
            # servers discovered by IP address).
            files = {h: issue_cert(pki, h, [h, *(o for o in names if o != h)], client=True)
                     for h in names}  # fmt: skip
            shutil.copy2(ca, dest / "ca.pem")
        configs = machine_configs(names, users=registry.load(), tls=files, client_port=port,
                                  route_port=route_port, data_dir=data_dir)  # fmt: skip
        for host, conf in configs.items():
            (dest / f"{host}.conf").write_text(json.dumps(conf, indent=1))
            (dest / f"{host}.conf").chmod(0o600)
        out.print(f"wrote {len(configs)} server configuration(s) to {dest}: "
                  f"{', '.join(f'{h}.conf' for h in configs)}")  # fmt: skip

    _run(asyncio.to_thread(main))


SyncOpt = Annotated[
    str,
    typer.Option("--sync", help="JetStream fsync: always (no loss on power cut) or default."),
]


def check_sync(value: str) -> Literal["always", "default"]:
    if value not in ("always", "default"):
        print_error(f"--sync must be always or default, got {value!r}")
        raise typer.Exit(2)
    return "always" if value == "always" else "default"
