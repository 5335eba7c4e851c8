"""The node's small HTTP endpoint (aiohttp): `GET /metrics` (Prometheus text format),
`GET /healthz` and `GET /readyz` (200 or 503, with a JSON body saying why). Started by
`_telemetry.py` when `NodeSettings.metrics_port` is set; bound to `metrics_host` only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .._errors import ConfigurationError

#: A check: (passing, details for the JSON body).
Check = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """Serves `render()` on /metrics and the two checks; `start` returns the base URL."""

    def __init__(
        self, host: str, port: int, render: Callable[[], bytes], healthz: Check, readyz: Check
    ) -> None:
        self._host = host
        self._port = port
        self._render = render
        self._checks = {"healthz": healthz, "readyz": readyz}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen; return `http://host:port` (the bound port when `port` was 0).

        Raises `ConfigurationError` when the address cannot be bound (port taken, bad host).
        """
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._check)
        app.router.add_get("/readyz", self._check)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigurationError(
                f"cannot serve metrics on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.wait_for(runner.cleanup(), 5.0)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self._render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _check(self, request: web.Request) -> web.Response:
        ok, details = self._checks[request.path.strip("/")]()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)
