"""Finding the engine: an explicit URL, $ACCORD_NATS, the URL file of a running `accord up`, or a
fresh embedded server owned by the caller."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from .._errors import ConfigurationError
from ._server import EmbeddedServer


def state_dir() -> Path:
    return Path(os.environ.get("ACCORD_HOME", Path.home() / ".accord"))


def url_file() -> Path:
    return state_dir() / "url"


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
