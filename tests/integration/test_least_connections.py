"""The `least_connections` balancing of the services load balancer (`services/_proxy.Balancer`):
a request goes to the replica with the fewest open connections. Real aiohttp backends and the
real balancer on 127.0.0.1; the node agent (its healthy replicas) is a small fake above that seam.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from accord.services import parse_spec
from accord.services._proxy import Balancer
from accord.services._spec import ServiceSpec
from accord.services._store import Instance


class Backend:
    """One replica: `/hold` requests stay open until released; others answer at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holding = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path == "/svc/hold":
            self.holding += 1
            self.arrived.set()
            await self.release.wait()
        return web.Response(text=self.name)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        return runner


class FakeAgent:
    """What the balancer asks of its node agent: the specs and each service's healthy replicas."""

    def __init__(self, spec: ServiceSpec, backends: list[Backend]) -> None:
        self.spec = spec
        self.backends = backends

    def current_specs(self) -> dict[str, ServiceSpec]:
        return {self.spec.name: self.spec}

    def healthy(self, name: str) -> list[Instance]:
        return [
            Instance(
                service=name, index=i, node=b.name, role="replica", status="healthy", port=b.port
            )
            for i, b in enumerate(self.backends)
        ]


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Backend, Backend, str]]:
    a, b = Backend("node-a"), Backend("node-b")
    runners = [await a.start(), await b.start()]
    spec = parse_spec({"name": "svc", "command": ["true"], "path_prefix": "/svc",
                       "balancing": "least_connections", "replicas": 2})  # fmt: skip
    balancer = Balancer(FakeAgent(spec, [a, b]), "127.0.0.1", 0)  # type: ignore[arg-type]
    await balancer.start()
    port = balancer._runner.addresses[0][1]
    try:
        yield a, b, f"http://127.0.0.1:{port}"
    finally:
        a.release.set()
        b.release.set()
        await balancer.stop()
        for r in runners:
            await r.cleanup()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[str, Any]:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text(), resp.headers.get("X-Accord-Replica")


async def test_requests_go_to_the_replica_with_the_fewest_open_connections(
    setup: tuple[Backend, Backend, str],
) -> None:
    a, b, base = setup
    async with aiohttp.ClientSession() as http:
        # Both idle: the tie goes to the first replica (by node); its request stays open.
        held = asyncio.create_task(_get(http, f"{base}/svc/hold"))
        await asyncio.wait_for(a.arrived.wait(), 10)
        assert (a.holding, b.holding) == (1, 0)
        # node-a has one open connection, node-b none: every request now goes to node-b, one
        # after the other (each is done before the next, so node-b stays at zero open).
        answers = [await _get(http, f"{base}/svc/quick") for _ in range(6)]
        assert {text for text, _ in answers} == {"node-b"}, answers
        assert {replica for _, replica in answers} == {"svc/1@node-b"}
        # A held request now goes to node-b (1 open vs 0); the next one, on a 1-1 tie, to node-a.
        held_b = asyncio.create_task(_get(http, f"{base}/svc/hold"))
        await asyncio.wait_for(b.arrived.wait(), 10)
        held_a2 = asyncio.create_task(_get(http, f"{base}/svc/hold"))
        await asyncio.wait_for(_until(lambda: a.holding == 2), 10)
        assert (a.holding, b.holding) == (2, 1)
        text, _ = await _get(http, f"{base}/svc/quick")  # node-a 2 open, node-b 1 -> node-b
        assert text == "node-b"
        # Once node-a's requests end, it has fewer open connections than node-b and gets the work.
        a.release.set()
        assert (await held)[0] == "node-a" and (await held_a2)[0] == "node-a"
        text, _ = await _get(http, f"{base}/svc/quick")
        assert text == "node-a"
        b.release.set()
        assert (await held_b)[0] == "node-b"


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)
