"""Finding the engine: an explicit URL, $ACCORD_NATS, the URL file of a running `accord up`, or a
fresh embedded server owned by the caller; and the credentials and CA to connect with (explicit,
$ACCORD_CREDS / $ACCORD_TLS_CA, or those `accord up` wrote to its state directory)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

from .._errors import ConfigurationError
from ._auth import Credentials
from ._server import EmbeddedServer


def state_dir() -> Path:
    return Path(os.environ.get("ACCORD_HOME", Path.home() / ".accord"))


def url_file() -> Path:
    return state_dir() / "url"


def auth_dir() -> Path:
    return state_dir() / "auth"


def tls_dir() -> Path:
    return state_dir() / "tls"


def local_tls_file() -> Path:
    """While `accord up --tls` runs: the TLS files local clients use (JSON: ca, cert, key)."""
    return state_dir() / "tls.json"


def local_creds_file() -> Path:
    """The credential (role `node`) `accord up` issues to its nodes and to the local user."""
    return auth_dir() / "local.creds"


def _path(value: str | Path | None, env: str) -> Path | None:
    raw = value if value is not None else os.environ.get(env)
    if raw is None or raw == "":
        return None
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigurationError(f"{env.lower().removeprefix('accord_')} file {path} not found")
    return path


def resolve_credentials(
    nats: str | list[str] | None,
    creds: str | Path | None = None,
    tls_ca: str | Path | None = None,
) -> Credentials:
    """Credentials to connect to `nats` with: `creds`/`tls_ca` if given, else $ACCORD_CREDS /
    $ACCORD_TLS_CA (and $ACCORD_TLS_CERT/$ACCORD_TLS_KEY for mutual TLS), else, when `nats` is
    the cluster `accord up` runs here (or None), the files it wrote in the state directory."""
    found = Credentials(
        creds=_path(creds, "ACCORD_CREDS"),
        tls_ca=_path(tls_ca, "ACCORD_TLS_CA"),
        tls_cert=_path(None, "ACCORD_TLS_CERT"),
        tls_key=_path(None, "ACCORD_TLS_KEY"),
    )
    local = url_file().read_text().strip() if url_file().exists() else None
    if nats is None or (local and parse_servers(nats) == parse_servers(local)):
        if found.creds is None and local_creds_file().exists():
            found = dataclasses.replace(found, creds=local_creds_file())
        if found.tls_ca is None and local_tls_file().exists():
            try:
                tls = json.loads(local_tls_file().read_text())
            except ValueError as exc:
                raise ConfigurationError(f"{local_tls_file()}: unreadable: {exc}") from None
            ca, cert, key = (Path(tls[k]) if tls.get(k) else None for k in ("ca", "cert", "key"))
            found = dataclasses.replace(found, tls_ca=ca, tls_cert=cert, tls_key=key)
    return found


def parse_servers(nats: str | list[str]) -> list[str]:
    items = nats if isinstance(nats, list) else nats.split(",")
    servers = [s.strip() for s in items if s.strip()]
    if not servers:
        raise ConfigurationError("empty NATS URL")
    for s in servers:
        if "://" not in s:
            raise ConfigurationError(f"NATS URL must look like nats://host:port, got {s!r}")
    return servers


def running_url() -> str | None:
    """The URL of a server to join when none was given: $ACCORD_NATS, else `accord up`'s file."""
    env = os.environ.get("ACCORD_NATS")
    if env:
        return env
    f = url_file()
    return f.read_text().strip() or None if f.exists() else None


async def resolve_servers(nats: str | list[str] | None) -> tuple[list[str], EmbeddedServer | None]:
    """Servers to connect to, and an `EmbeddedServer` the caller now owns (or None)."""
    if nats:
        return parse_servers(nats), None
    known = running_url()
    if known:
        return parse_servers(known), None
    server = EmbeddedServer()
    url = await asyncio.to_thread(server.start)
    return [url], server
