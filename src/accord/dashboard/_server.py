"""`accord dashboard`: an aiohttp server of one page (assets inside the package, no CDN), a JSON
API under /api/ (paginated lists, JSON errors), server-sent snapshots every `interval`, and the
dead-letter replay action (POST, guarded against cross-site requests)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from .._errors import AccordError, ConfigurationError, NotConnected
from ._poller import Poller

log = logging.getLogger("accord.dashboard")
STATIC = resources.files("accord.dashboard") / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
#: Paginated sections of the snapshot: /api/<name>?offset=&limit=
LISTS = ("nodes", "shards", "history", "agent_types", "dlq", "services", "workflows")
MAX_LIMIT = 1000
REPLAY_HEADER = "X-Accord-Action"
POLLER: web.AppKey[Poller] = web.AppKey("poller", Poller)
SETTINGS: web.AppKey[dict[str, Any]] = web.AppKey("settings", dict)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


async def _snapshot_or_503(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        return await request.app[POLLER].latest()
    except AccordError as exc:
        return _error(503, f"cluster not reachable: {exc}")


async def index(request: web.Request) -> web.Response:
    html = (STATIC / "index.html").read_text()
    return web.Response(text=html, content_type="text/html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        return _error(404, f"no asset {name!r}")
    return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name])


async def api_snapshot(request: web.Request) -> web.Response:
    """The whole snapshot (what the page shows), unpaginated."""
    snap = await _snapshot_or_503(request)
    return snap if isinstance(snap, web.Response) else web.json_response(snap)


async def api_list(request: web.Request) -> web.Response:
    """One list of the snapshot: {"items", "total", "offset", "limit", "at"}."""
    section = request.match_info["section"]
    if section not in LISTS:
        return _error(404, f"no list {section!r}: one of {', '.join(LISTS)}")
    try:
        offset = _int_param(request, "offset", 0, 0, 10**9)
        limit = _int_param(request, "limit", 100, 1, MAX_LIMIT)
    except ValueError as exc:
        return _error(400, str(exc))
    snap = await _snapshot_or_503(request)
    if isinstance(snap, web.Response):
        return snap
    items = snap.get(section) or []
    return web.json_response({"items": items[offset : offset + limit], "total": len(items),
                              "offset": offset, "limit": limit, "at": snap["at"]})  # fmt: skip


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a `snapshot` event every interval (an `unreachable` one while no
    node answers), until the client goes away."""
    poller = request.app[POLLER]
    interval = request.app[SETTINGS]["interval"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})  # fmt: skip
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):  # the viewer went away
        while True:
            started = loop.time()
            try:
                event, data = "snapshot", await poller.latest()
            except AccordError as exc:
                event, data = "unreachable", {"error": str(exc)}
            await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            await asyncio.sleep(max(0.0, started + interval - loop.time()))
    return resp


async def api_replay(request: web.Request) -> web.Response:
    """Put dead letter `seq` back into its mailbox. Needs the custom header (a cross-site form or
    fetch cannot send it without a CORS preflight, which this server never grants)."""
    if request.app[SETTINGS]["read_only"]:
        return _error(403, "the dashboard runs --read-only")
    if request.headers.get(REPLAY_HEADER) != "replay":
        return _error(403, f"missing header {REPLAY_HEADER}: replay")
    try:
        seq = int(request.match_info["seq"])
        if seq < 1:
            raise ValueError
    except ValueError:
        return _error(400, f"bad sequence {request.match_info['seq']!r}: a positive integer")
    poller = request.app[POLLER]
    try:
        new_id = await poller.observer.dlq.replay(seq)
    except ConfigurationError as exc:
        return _error(404, str(exc))
    except AccordError as exc:
        return _error(503, f"{type(exc).__name__}: {exc}")
    log.info("dead letter %d replayed as %s", seq, new_id)
    poller.invalidate("dlq")
    return web.json_response({"replayed": seq, "message_id": new_id})


def _loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bound to loopback, answer only requests addressed to loopback (a DNS-rebinding page would
    send its own host name) and POSTs only from our own origin."""
    settings = request.app[SETTINGS]
    if settings["loopback"]:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if not _loopback(host):
            return _error(403, f"host {request.host!r} refused: the dashboard is bound to loopback")
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin is not None and origin != f"http://{request.host}":
        return _error(403, f"origin {origin!r} refused")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise


def make_app(
    poller: Poller, *, interval: float, read_only: bool, loopback: bool
) -> web.Application:
    """The dashboard's aiohttp application over one `Poller`."""
    app = web.Application(middlewares=[_guard])
    app[POLLER] = poller
    app[SETTINGS] = {"interval": interval, "read_only": read_only, "loopback": loopback}
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/snapshot", api_snapshot)
    app.router.add_get("/api/events", api_events)
    app.router.add_post("/api/dlq/{seq}/replay", api_replay)
    app.router.add_get("/api/{section}", api_list)
    return app


@contextlib.asynccontextmanager
async def serving(
    poller: Poller, host: str, port: int, *, interval: float = 0.5, read_only: bool = False
) -> AsyncIterator[str]:
    """Serve the dashboard on host:port (0: a free port) and yield its URL; stop on exit.
    Raises `ConfigurationError` when the address cannot be bound."""
    app = make_app(poller, interval=interval, read_only=read_only, loopback=_loopback(host))
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if not runner.addresses:
            raise NotConnected(f"the dashboard did not bind {host}:{port}")
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield f"http://{shown}:{bound[1]}"
    finally:
        await runner.cleanup()
