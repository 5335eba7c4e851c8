"""Who may connect and what each role may do: NKey users per cluster, their subject permissions
rendered into the nats-server configuration, and the client side of a credentials file.

Roles (see docs/security.md): `node` runs agents (the cluster's subjects, buckets and streams),
`client` asks/tells/publishes (workflows included) and reads status, `observer` reads status
only. A user's replies arrive on an inbox prefix derived from its public key, so no user can
read another's replies.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nkeys  # type: ignore[import-untyped]

from .._errors import ConfigurationError

Role = Literal["node", "client", "observer"]
ROLES: tuple[Role, ...] = ("node", "client", "observer")
#: A role's default cluster: permissions are per cluster name (its subjects and buckets).
DEFAULT_CLUSTER = "default"


def new_seed() -> bytes:
    """A fresh NKey user seed (`SU...`)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    try:
        return str(nkeys.from_seed(bytearray(seed.strip())).public_key.decode())
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"not an NKey user seed: {exc}") from None


def inbox_prefix(public: str) -> str:
    """The reply-subject prefix of the user with this public key (its only subscribable inbox)."""
    return f"_INBOX.{public[:24]}"


def _stream_reads(stream: str) -> list[str]:
    """API subjects that read a stream and nothing else: direct and message gets, consumers (an
    ordered consumer for a watch or a tail; on a limits stream a consumer takes nothing away)."""
    return [
        f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*", f"$JS.API.CONSUMER.DELETE.{stream}.*",
    ]  # fmt: skip


def _kv_reads(cluster: str, buckets: tuple[str, ...]) -> list[str]:
    """API subjects that read (get, watch, stream info) the given buckets and nothing else."""
    return [s for b in buckets for s in _stream_reads(f"KV_accord_{cluster}_{b}")]


#: Buckets and streams whose reads make up the status views (`accord status`, `leases`, `top`,
#: `services`, `promises`, `workflows`, `dlq list|show`, the dashboard): what an `observer` reads.
STATUS_BUCKETS = ("meta", "subs", "members", "leases", "locks", "workflows", "services",
                  "placements", "instances", "promises")  # fmt: skip
STATUS_STREAMS = ("dlq", "ledger")
#: Read by a `client` besides: its services' output lines (`accord logs`).
CLIENT_STREAMS = ("logs",)


def permissions(role: Role, cluster: str, public: str) -> dict[str, Any]:
    """The nats-server `permissions` block of a user of `role` in `cluster`.

    Everything not allowed is refused by the server (permission violation). Neither a client
    nor an observer may write any bucket or stream (leases, membership, the cluster record,
    state, the coordination buckets, the services' records), read agent state, subscribe to
    shard subjects or create consumers on the mailbox stream (docs/security.md has the table).
    """
    pre = f"accord.{cluster}"
    inbox = f"{inbox_prefix(public)}.>"
    if role == "node":
        subjects = [f"{pre}.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>", "_INBOX.>"]
        return {"publish": {"allow": subjects}, "subscribe": {"allow": subjects}}
    # reads only: stream metadata (names, configs, counts: what `status` shows of replication)
    pub = ["$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.LIST", "$JS.API.STREAM.NAMES",
           "$JS.FC.>", f"{pre}.admin.status", f"{pre}.admin.status.*"]  # fmt: skip
    pub += _kv_reads(cluster, STATUS_BUCKETS)
    pub += [s for st in STATUS_STREAMS for s in _stream_reads(f"accord_{cluster}_{st}")]
    sub = [inbox]
    if role == "client":
        pub += [f"{pre}.shard.*", f"{pre}.standby.*", f"{pre}.mbox.*",
                f"{pre}.pool.*.ask", f"{pre}.pool.*.tell", f"{pre}.pjob.*",
                f"{pre}.place.*.*"]  # fmt: skip
        pub += [s for st in CLIENT_STREAMS for s in _stream_reads(f"accord_{cluster}_{st}")]
        sub.append(f"{pre}.wf.done.*")  # a workflow run's end (`handle.result()`, `cancel()`)
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}}


@dataclass
class User:
    """One issued credential: its name, role, cluster and public key (the seed is not kept)."""

    name: str
    role: Role
    public: str
    cluster: str = DEFAULT_CLUSTER
    created: float = field(default_factory=time.time)


class UserRegistry:
    """The users a cluster's server accepts, kept as JSON in `<state dir>/auth/users.json`."""

    def __init__(self, auth_dir: Path) -> None:
        self.dir = auth_dir
        self.file = auth_dir / "users.json"

    def load(self) -> list[User]:
        if not self.file.exists():
            return []
        try:
            return [User(**u) for u in json.loads(self.file.read_text())]
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{self.file}: unreadable user list: {exc}") from None

    def save(self, users: list[User]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.file, json.dumps([u.__dict__ for u in users], indent=1).encode())

    def issue(self, name: str, role: Role, cluster: str, out: Path | None = None) -> Path:
        """Create user `name` with a new seed written (mode 0600) to `out` (default
        `<auth dir>/<name>.creds`); return the file. Raises ConfigurationError on a taken name."""
        if role not in ROLES:
            raise ConfigurationError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        users = self.load()
        if any(u.name == name for u in users):
            raise ConfigurationError(f"a credential named {name!r} exists; revoke it first")
        seed = new_seed()
        path = out or self.dir / f"{name}.creds"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, seed + b"\n")
        users.append(User(name, role, public_key(seed), cluster))
        self.save(users)
        return path

    def revoke(self, name: str) -> User:
        users = self.load()
        found = [u for u in users if u.name == name]
        if not found:
            raise ConfigurationError(f"no credential named {name!r}")
        self.save([u for u in users if u.name != name])
        with_file = self.dir / f"{name}.creds"
        if with_file.exists():
            with_file.unlink()
        return found[0]


def authorization_block(users: list[User]) -> dict[str, Any]:
    """The server's `authorization` section: one NKey user per issued credential."""
    return {
        "users": [
            {"nkey": u.public, "permissions": permissions(u.role, u.cluster, u.public)}
            for u in users
        ]
    }


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable by its owner only (created 0600, never world-readable
    even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Credentials:
    """How a client proves who it is and checks the server: the connect options of nats-py.

    `creds`: an NKey seed file (`accord creds create`) or a NATS `.creds` file (JWT + seed);
    `tls_ca`: the CA that signed the server certificate (the server is verified against it);
    `tls_cert`/`tls_key`: a client certificate for mutual TLS. User/password and token in the
    URL (`nats://user:pw@host`) need none of this and keep working.
    `tls_first`: with TLS, start the handshake before the server's INFO (its `handshake_first`,
    on in every configuration accord writes), so nothing, not even INFO or CONNECT, ever
    crosses the network in clear; `$ACCORD_TLS_FIRST=0` is for a server without it.
    """

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_first: bool = field(default_factory=lambda: os.environ.get("ACCORD_TLS_FIRST") != "0")

    def connect_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.creds is not None:
            try:
                text = self.creds.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"cannot read credentials {self.creds}: {exc}") from None
            if b"BEGIN NATS USER JWT" in text:
                opts["user_credentials"] = str(self.creds)
            else:
                opts["nkeys_seed_str"] = text.decode().strip()
                opts["inbox_prefix"] = inbox_prefix(public_key(text))
        if self.tls_ca is not None or self.tls_cert is not None:
            opts["tls"] = self.ssl_context()
            opts["tls_handshake_first"] = self.tls_first
        return opts

    def ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(
                cafile=str(self.tls_ca) if self.tls_ca is not None else None
            )
            if self.tls_cert is not None:
                key = str(self.tls_key) if self.tls_key is not None else None
                ctx.load_cert_chain(str(self.tls_cert), key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load TLS files: {exc}") from None
        return ctx
