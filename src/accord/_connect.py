"""`accord.connect()`: a `Mesh` client of a cluster, on the engine `engine._resolve` finds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ._mesh import Mesh
from ._placed import route_placed
from .cluster._config import Names, open_cluster
from .cluster._replication import WAIT_FOR_CLUSTER, wait_for_cluster
from .delivery._breaker import BreakerSettings
from .engine._admin import NatsAdmin
from .engine._nats import NatsTransport
from .engine._resolve import resolve_credentials, resolve_servers


@asynccontextmanager
async def connect(
    url: str | list[str] | None = None,
    *,
    cluster: str = "default",
    name: str | None = None,
    breaker: BreakerSettings | None = None,
    wait: float = WAIT_FOR_CLUSTER,
    creds: str | Path | None = None,
    tls_ca: str | Path | None = None,
) -> AsyncIterator[Mesh]:
    """Connect a `Mesh` client to the cluster.

    `url` is a NATS URL, a comma-separated string of them, or a list. None means the local cluster:
    $ACCORD_NATS, else the one `accord up` is running, else a new embedded server that lives as
    long as this context. `breaker` enables per-target circuit breakers (off by default).

    `creds` (an NKey seed file from `accord creds create`, or a NATS .creds file) and `tls_ca`
    (the CA that signed the servers' certificates) default to $ACCORD_CREDS / $ACCORD_TLS_CA,
    then, for the cluster `accord up` runs on this machine, the files it wrote; user/password
    or token URLs (`nats://user:pw@host:4222`) need neither.

    A client never creates the cluster: until a node has (with its replication factor), it
    waits up to `wait` seconds, then raises `NotConnected` naming the cause.
    """
    credentials = resolve_credentials(url, creds, tls_ca)
    servers, engine = await resolve_servers(url)
    try:
        transport = await NatsTransport.connect(
            servers, name or f"client-{os.getpid()}", credentials=credentials
        )
        try:
            names = Names(cluster)
            admin = NatsAdmin(transport.nc, transport.js, names.bucket("meta"))
            stored = await wait_for_cluster(admin, cluster, wait)
            # Opens what the node created; anything missing is created with the stored factor.
            config, buckets = await open_cluster(transport, names, replicas=stored.replicas)
        except BaseException:
            await transport.close()
            raise
        mesh = Mesh(transport, names, config, buckets, breaker)
        route_placed(mesh)  # asks for agents placed by override go straight to their node
        try:
            yield mesh
        finally:
            await mesh.close()
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.stop)
