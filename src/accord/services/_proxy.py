"""The HTTP entry point of a node (`accord node --http-port P`): routes each request to a healthy
replica of the service it names, anywhere in the cluster.

Routing: a service with `host` takes requests whose `Host` header (port stripped) matches;
otherwise the longest matching `path_prefix` wins. Backends are the replicas the node's
`ServiceView` (its node agent) shows as healthy on live nodes (instance records, refreshed by
watch). Balancing per service: round-robin or least-connections.

Failures: a backend that refuses or drops a connection is marked down for `DOWN_FOR` seconds and
the request is retried on another replica — always when the connection could not be made (the
request never reached the app), and for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) also
when it broke mid-way. At most `MAX_ATTEMPTS` replicas are tried; then 502 (or 503 when the service
has no healthy replica), with the reason in the body. Answers carry `X-Accord-Replica`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ._store import Instance

if TYPE_CHECKING:
    from ._spec import ServiceSpec
    from ._view import ServiceView

log = logging.getLogger("accord.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
MAX_ATTEMPTS = 3
DOWN_FOR = 5.0
MAX_BODY = 16 * 1024 * 1024  # larger bodies: 413
#: Request head bounds (larger: 400) and timeouts: an idle keep-alive connection is closed after
#: IDLE_TIMEOUT, a body that does not arrive whole within BODY_TIMEOUT gets 408.
MAX_HEADERS = 64
MAX_HEADER_LINE = 8190
IDLE_TIMEOUT = 15.0
HEAD_TIMEOUT = 10.0  # a request head (line and headers) sent slower than this: closed
BODY_TIMEOUT = 30.0
_BROKEN = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
    TimeoutError,
)


class Balancer:
    head_timeout = HEAD_TIMEOUT  # seconds a client has to send a request head

    def __init__(self, view: ServiceView, host: str, port: int) -> None:
        self.view = view
        self.host = host
        self.port = port
        self._rr = itertools.count()
        self._active: dict[tuple[str, int], int] = {}
        self._down: dict[tuple[str, int], float] = {}
        self.requests = 0
        self.retries = 0
        self.failures = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_answered)
        self._runner = _GuardedRunner(
            app, access_log=None, keepalive_timeout=IDLE_TIMEOUT, max_headers=MAX_HEADERS,
            max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_LINE,
        )  # fmt: skip
        self._runner.head_timeout = self.head_timeout
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError:
            await self._runner.cleanup()
            raise
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=2),
            auto_decompress=False,
        )
        log.info("load balancer on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._http.close()

    def route(self, host: str, path: str) -> ServiceSpec | None:
        host = host.rsplit(":", 1)[0] if host and not host.startswith("[") else host
        specs = list(self.view.current_specs().values())
        by_host = [s for s in specs if s.host and s.host == host]
        candidates = by_host or [s for s in specs if not s.host]
        best: ServiceSpec | None = None
        for s in candidates:
            prefix = s.path_prefix or ""
            if prefix and not (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
                continue
            if not prefix and not by_host:
                continue  # a service without host or prefix is not routed
            if best is None or len(prefix) > len(best.path_prefix or ""):
                best = s
        return best

    def _pick(self, spec: ServiceSpec, tried: set[tuple[str, int]]) -> Instance | None:
        now = time.monotonic()
        ready = [
            i
            for i in self.view.healthy(spec.name)
            if (i.address, i.port or 0) not in tried
            and self._down.get((i.address, i.port or 0), 0.0) <= now
        ]
        if not ready:
            return None
        ready.sort(key=lambda i: (i.node, i.index))
        if spec.balancing == "least_connections":
            return min(ready, key=lambda i: self._active.get((i.address, i.port or 0), 0))
        return ready[next(self._rr) % len(ready)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        spec = self.route(request.headers.get("Host", ""), request.path)
        if spec is None:
            return web.Response(status=404, text="accord: no service routes this host/path\n")
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except TimeoutError:
            return web.Response(status=408, text="accord: request body too slow\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        tried: set[tuple[str, int]] = set()
        reason = "no healthy replica"
        for attempt in range(MAX_ATTEMPTS):
            inst = self._pick(spec, tried)
            if inst is None:
                break
            key = (inst.address, inst.port or 0)
            tried.add(key)
            if attempt:
                self.retries += 1
            url = f"http://{inst.address}:{inst.port}{request.rel_url}"
            self._active[key] = self._active.get(key, 0) + 1
            sent = False
            try:
                async with self._http.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                ) as resp:
                    sent = True
                    data = await resp.read()
                    out = web.Response(status=resp.status, body=data)
                    for k, v in resp.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            out.headers.add(k, v)
                    out.headers["X-Accord-Replica"] = f"{inst.service}/{inst.index}@{inst.node}"
                    return out
            except _BROKEN as exc:
                self._down[key] = time.monotonic() + DOWN_FOR
                reason = f"{inst.service}/{inst.index}@{inst.node}: {type(exc).__name__}"
                connect_failed = isinstance(exc, aiohttp.ClientConnectorError) and not sent
                if not connect_failed and request.method not in IDEMPOTENT:
                    break
            finally:
                self._active[key] -= 1
        self.failures += 1
        status = 503 if not tried else 502
        return web.Response(status=status, text=f"accord: {spec.name}: {reason}\n")


class _GuardedRunner(web.AppRunner):
    """An AppRunner whose connections get a deadline on every request head (`_HeadDeadline`)."""

    head_timeout = HEAD_TIMEOUT

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        return lambda: _HeadDeadline(inner(), self.head_timeout)


#: The guard of each open connection, by its transport (`_answered` finds it from a request).
_guards: dict[int, _HeadDeadline] = {}


async def _answered(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """A response is about to go out: the request's head and body were read, so the next bytes
    on its connection begin the next request's head (its deadline starts then)."""
    guard = _guards.get(id(request.transport))
    if guard is not None:
        guard.answered()


class _HeadDeadline(asyncio.Protocol):
    """An aiohttp connection that is closed when a request head has not arrived whole within
    `seconds` of its first byte (the connection's opening for the first request): a slowloris
    client trickling header bytes holds a connection forever otherwise (aiohttp times out only
    idle keep-alive connections). Every request on a keep-alive connection is bounded: once a
    response to the last head went out (`answered`), the next byte received starts the next
    head's deadline. Body bytes are bounded by the handler (`BODY_TIMEOUT`). Delegates the
    rest to aiohttp's protocol."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner, self._seconds = inner, seconds
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: Any = None
        self._between = False  # the last head was answered; no byte of the next one yet

    def _arm(self) -> None:
        self._tail = b""
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()

    def answered(self) -> None:
        if self._timer is None:
            self._between = True

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        _guards[id(transport)] = self
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._between:
            self._between = False
            self._arm()
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None and _guards.get(id(self._transport)) is self:
            del _guards[id(self._transport)]
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
