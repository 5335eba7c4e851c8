"""`accord.connect()`: a `Mesh` client of a cluster, on the engine `engine._resolve` finds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._mesh import Mesh
from .cluster._config import Names, open_cluster
from .delivery._breaker import BreakerSettings
from .engine._nats import NatsTransport
from .engine._resolve import resolve_servers


@asynccontextmanager
async def connect(
    url: str | list[str] | None = None,
    *,
    cluster: str = "default",
    name: str | None = None,
    breaker: BreakerSettings | None = None,
) -> AsyncIterator[Mesh]:
    """Connect a `Mesh` client to the cluster.

    `url` is a NATS URL, a comma-separated string of them, or a list. None means the local cluster:
    $ACCORD_NATS, else the one `accord up` is running, else a new embedded server that lives as
    long as this context. `breaker` enables per-target circuit breakers (off by default).
    """
    servers, engine = await resolve_servers(url)
    try:
        transport = await NatsTransport.connect(servers, name or f"client-{os.getpid()}")
        try:
            names = Names(cluster)
            config, kvs = await open_cluster(transport.js, names)
        except BaseException:
            await transport.close()
            raise
        mesh = Mesh(transport, names, config, kvs, breaker)
        try:
            yield mesh
        finally:
            await mesh.close()
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.stop)
