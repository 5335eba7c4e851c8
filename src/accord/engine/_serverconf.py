"""nats-server configuration files accord writes: the embedded server's (`accord up`) and one per
machine of a multi-machine cluster (`accord server config`).

The files are JSON, which nats-server's configuration parser accepts; strings are quoted, so a
`$JS.API.>` subject is never read as a variable. Authorization comes from `_auth.UserRegistry`,
TLS files from `_tls`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._errors import ConfigurationError
from ._auth import User, UserRegistry, authorization_block, write_private
from ._tls import TlsFiles

Sync = Literal["always", "default"]
#: The largest message a server accepts; clients refuse bigger ones before sending.
MAX_PAYLOAD = 1024 * 1024
#: Bounds on a connection's control line (a subject plus headers' framing) and pending bytes.
MAX_CONTROL_LINE = 4096
MAX_PENDING = 64 * 1024 * 1024


@dataclass
class ServerSecurity:
    """What the embedded server enforces: its users (`users` or `registry`; neither: no
    authentication), TLS, fsync.

    `verify_clients`: mutual TLS (clients must present a certificate the CA signed).
    `sync`: "always" fsyncs every JetStream write before acknowledging it (no acknowledged
    write is lost when the machine loses power); "default" fsyncs every 2 minutes (a power
    loss can lose up to 2 minutes of acknowledged writes on that server; a process crash
    loses none, the OS page cache survives it).
    """

    users: list[User] | None = None
    registry: UserRegistry | None = None  # read at every render: users issued since count
    tls: TlsFiles | None = None
    verify_clients: bool = False
    sync: Sync = "default"
    max_payload: int = MAX_PAYLOAD
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "max_payload": self.max_payload,
            "max_control_line": MAX_CONTROL_LINE,
            "max_pending": MAX_PENDING,
        }
        if self.sync == "always":
            conf["jetstream"] = {"sync_interval": "always"}
        users = self.registry.load() if self.registry is not None else self.users
        if users is not None:
            if not users:
                raise ConfigurationError("authentication is on but no user is issued")
            conf["authorization"] = authorization_block(users)
        if self.tls is not None:
            conf["tls"] = tls_block(self.tls, self.verify_clients, first=True)
        conf.update(self.extra)
        return conf

    def write(self, path: Path) -> Path:
        write_private(path, json.dumps(self.render(), indent=1).encode())
        return path

    @property
    def authenticated(self) -> bool:
        return self.users is not None or self.registry is not None


#: how long a client listener waits for a client's TLS handshake before it sends its INFO in
#: clear (for clients that do not start with TLS: the nats CLI, $ACCORD_TLS_FIRST=0)
TLS_FIRST_WAIT = "300ms"


def tls_block(tls: TlsFiles, verify: bool, *, first: bool = False) -> dict[str, Any]:
    """A nats-server `tls` block; `first` (client connections): accept the TLS handshake before
    INFO, so accord's clients never read a word in clear that a man in the middle could
    forge to keep the session unencrypted (a route has no such option)."""
    block: dict[str, Any] = {
        "cert_file": str(tls.cert), "key_file": str(tls.key), "ca_file": str(tls.ca),
        "timeout": 2,
    }  # fmt: skip
    if verify:
        block["verify"] = True
    if first:
        block["handshake_first"] = TLS_FIRST_WAIT
    return block


def machine_configs(
    hosts: list[str],
    *,
    users: list[User],
    tls: dict[str, TlsFiles] | None,
    client_port: int = 4222,
    route_port: int = 6222,
    data_dir: str = "/var/lib/accord/nats",
    cluster_name: str = "accord",
    route_password: str | None = None,
) -> dict[str, dict[str, Any]]:
    """One nats-server configuration per host of a cluster: routes to every other host,
    JetStream with `sync_interval: always`, the users and their permissions, TLS on client
    connections and routes (`tls[host]` holds each host's certificate), and a route password
    shared by the servers. Hosts are names or addresses the machines reach each other by."""
    if len(hosts) < 1 or len(set(hosts)) != len(hosts):
        raise ConfigurationError("give one or more distinct hosts")
    password = route_password or secrets.token_urlsafe(24)
    configs: dict[str, dict[str, Any]] = {}
    for i, host in enumerate(hosts):
        sec = ServerSecurity(users=users, tls=tls[host] if tls else None, sync="always")
        conf = sec.render()
        scheme = "nats"
        conf.update(
            server_name=f"{cluster_name}-{i + 1}",
            host="0.0.0.0",
            port=client_port,
            jetstream={"store_dir": data_dir, "sync_interval": "always"},
        )
        if len(hosts) > 1:
            cluster: dict[str, Any] = {
                "name": cluster_name,
                "host": "0.0.0.0",
                "port": route_port,
                "authorization": {"user": "route", "password": password},
                "routes": [f"{scheme}://route:{password}@{h}:{route_port}" for h in hosts
                           if h != host],
            }  # fmt: skip
            if tls:
                cluster["tls"] = tls_block(tls[host], verify=True)
            conf["cluster"] = cluster
        configs[host] = conf
    return configs
