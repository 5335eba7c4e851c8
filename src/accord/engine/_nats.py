"""The NATS engine: `Engine` (`Transport` here, `JetStream` mixed in from `_nats_js.py`) over
nats-py.

The only package that imports nats-py is `accord.engine`; nats-py exceptions are translated here,
inside each method, into accord's hierarchy or the seam's internal signals (`NoResponders`, ...).

Hot paths avoid two per-message costs of nats-py: a request goes through one wildcard inbox
subscription whose replies resolve their waiter straight from the read loop (no NUID and random
token, no `wait_for`), and `subscribe_direct` hands messages to a plain function in arrival order
instead of through a queue and a task per subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import ssl
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .._errors import NotConnected, PermissionDenied
from ._api import (
    DirectHandler,
    Handler,
    Message,
    NoResponders,
    Refused,
    RequestTimeout,
    Subscription,
)
from ._auth import Credentials
from ._nats_errors import map_errors
from ._nats_js import NatsJetStream
from ._nats_wire import subscribe_direct as subscribe_direct  # the name callers import

log = logging.getLogger("accord.transport")
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)', re.I)
#: How long a permission violation explains a request without an answer on that subject.
_VIOLATION_MEMORY = 60.0


def _not_ssl_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns on every TLS connection nats-py closes ("returning true from eof_received()
    has no effect when using ssl"): nats-py's protocol, not a fault; keep it out of the logs."""
    return "eof_received() has no effect" not in record.getMessage()


class NatsTransport(NatsJetStream):
    """`Engine` over one nats-py connection that reconnects forever."""

    def __init__(self, nc: NatsClient, name: str) -> None:
        self.nc = nc
        self.name = name
        self.js: JetStreamContext = nc.jetstream()
        self._inbox = ""  # "<prefix>." of the reply subjects of this connection's requests
        self._inbox_sub: Any = None
        self._inbox_lock = asyncio.Lock()
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Any]] = {}  # token -> waiter for a Msg
        #: ("publish"|"subscription", lowercased subject) -> when the server refused it: a refused
        #: publish is dropped silently, so a request on it times out; this says why.
        self.denied: dict[tuple[str, str], float] = {}
        #: token -> subject of each request waiting for its reply (`_refuse`)
        self._asked: dict[str, str] = {}
        self._refusable_calls = set()

    @classmethod
    async def connect(
        cls,
        servers: list[str],
        name: str,
        timeout: float = 5.0,
        credentials: Credentials | None = None,
    ) -> NatsTransport:
        """Connect to `servers` with `credentials` (NKey seed or .creds file, TLS CA, client
        certificate; None: what the URLs carry). Raises `NotConnected` (unreachable, refused
        credentials, a server certificate the CA did not sign) or `ConfigurationError`."""
        denied: dict[tuple[str, str], float] = {}
        fatal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        held: list[NatsClient] = []
        held_transport: list[NatsTransport] = []

        async def on_disconnect() -> None:  # expected in operation: one line, no traceback
            if held and not (held[0].is_closed or held[0].is_draining):  # not our own close
                log.warning("NATS connection lost; reconnecting")

        async def on_reconnect() -> None:
            log.info("NATS connection re-established")
            if held:
                if wants_tls and not _is_tls(held[0]):
                    # the server answered without TLS: end the connection rather than go on in
                    # clear (nats-py has sent its CONNECT and queued commands by now; this stops
                    # the rest). Closed from a task: nats-py awaits this callback.
                    log.error("the NATS server came back without TLS; closing the connection")
                    task = asyncio.ensure_future(held[0].close())
                    closing.add(task)
                    task.add_done_callback(closing.discard)
                    return
                _one_record_per_flush(held[0])

        async def on_error(exc: Exception) -> None:
            # Refused credentials or an untrusted certificate do not heal by retrying: the first
            # connection fails at once instead of being retried until the timeout.
            if not fatal.done():
                if "authorization violation" in str(exc).lower():
                    fatal.set_result(nats.errors.AuthorizationError())
                elif isinstance(exc, ssl.SSLError):
                    fatal.set_result(exc)
            found = _VIOLATION.search(str(exc))
            if found:
                # nats-py lowercases the server's error text, subject included
                if len(denied) >= 1024:  # refused on ever new subjects: bounded, start over
                    denied.clear()
                kind, subject = found.group(1).lower(), found.group(2).lower()
                denied[(kind, subject)] = time.monotonic()
                log.warning("server refused: %s", exc)
                if held_transport and kind == "publish":
                    held_transport[0]._refuse(subject)
            else:
                log.debug("nats connection error: %s", exc)

        options = credentials.connect_options() if credentials is not None else {}
        wants_tls = "tls" in options
        closing: set[asyncio.Future[None]] = set()  # kept referenced until done
        if wants_tls and _not_ssl_eof_noise not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(_not_ssl_eof_noise)
        try:
            # nats-py retries the first connection as often as reconnections (forever here):
            # bound it, so a wrong URL is an error and not a hang.
            nc = await _first_of(
                fatal,
                nats.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    **options,
                ),
                timeout + 1,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            why = str(exc) or f"no server answered within {timeout + 1:.0f}s"
            if isinstance(exc, nats.errors.AuthorizationError):
                why = "authorization violation: the server refused these credentials"
                why += (
                    ""
                    if "user_credentials" in options or "nkeys_seed_str" in options
                    else (" (none given: pass --creds or set $ACCORD_CREDS)")
                )
            elif isinstance(exc, ssl.SSLError):
                reason = str(exc.reason or exc)
                why = f"TLS: {reason} " + (
                    "(the server wants a client certificate: $ACCORD_TLS_CERT, $ACCORD_TLS_KEY)"
                    if "CERTIFICATE_REQUIRED" in reason
                    else "(the server answered in clear: it does not take TLS first "
                    "(handshake_first); $ACCORD_TLS_FIRST=0 for such a server)"
                    if "WRONG_VERSION_NUMBER" in reason
                    else "(is --tls-ca / $ACCORD_TLS_CA the right CA?)"
                )
            raise NotConnected(f"cannot connect to NATS at {','.join(servers)}: {why}") from None
        held.append(nc)
        if wants_tls and not _is_tls(nc):
            # nats-py upgrades only when the server's INFO asks for TLS; a server (or a man in
            # the middle) that does not would get everything in clear
            await nc.close()
            raise NotConnected(
                f"cannot connect to NATS at {','.join(servers)}: TLS was asked for "
                "(--tls-ca / $ACCORD_TLS_CA) but the server did not offer it"
            )
        _one_record_per_flush(nc)
        transport = cls(nc, name)
        transport.denied = denied
        held_transport.append(transport)
        return transport

    def _refuse(self, subject: str) -> None:
        """The server refused a publish on `subject`: the requests waiting for a reply on it
        end now with `PermissionDenied` (the server dropped them: no reply will come), and so
        do nats-py's JetStream calls about the stream it names (`_api_refused`)."""
        self._api_refused(subject)
        for token, asked in list(self._asked.items()):
            fut = self._waiting.get(token)
            if asked.lower() == subject and fut is not None and not fut.done():
                fut.set_exception(PermissionDenied(f"publish to {subject} refused by the server"))

    def refused(self, kind: str, subject: str) -> bool:
        """Whether the server refused this connection `kind` ("publish"/"subscription") on
        `subject` recently."""
        when = self.denied.get((kind, subject.lower()))
        return when is not None and time.monotonic() - when < _VIOLATION_MEMORY

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        msg = await self.request_msg(subject, data, timeout)
        data_out: bytes = msg.data
        return data_out

    async def request_msg(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """Publish `data` with a reply subject of this connection's inbox; return the reply.

        Raises `NoResponders` (nobody subscribes: not delivered), `RequestTimeout` (sent, no reply
        within `timeout`: outcome unknown) or `NotConnected`. A late reply is dropped.
        """
        if self._inbox_sub is None:
            with map_errors(f"request on {subject}"):
                await self._start_inbox()
        token = str(next(self._tokens))
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        self._asked[token] = subject  # a refusal of this subject ends the request (_refuse)
        try:
            await self.nc.publish(subject, data, reply=self._inbox + token, headers=headers)
            timer = fut.get_loop().call_later(timeout, _expire, fut)
            try:
                msg = await fut
            finally:
                timer.cancel()
        except nats.errors.MaxPayloadError:
            raise Refused(f"request on {subject}: {len(data)} bytes exceed max_payload") from None
        except (nats.errors.Error, OSError) as exc:  # closed, buffer full, bad subject, ...
            raise NotConnected(f"request on {subject}: {type(exc).__name__}: {exc}") from None
        except RequestTimeout:
            if self.denied and self.refused("publish", subject):
                raise PermissionDenied(f"publish to {subject} refused by the server") from None
            raise
        finally:
            self._waiting.pop(token, None)
            self._asked.pop(token, None)
        hdr = msg.headers
        if hdr and hdr.get("Status") == "503" and not msg.data:
            raise NoResponders(subject)
        return msg

    async def _start_inbox(self) -> None:
        async with self._inbox_lock:
            if self._inbox_sub is None:
                prefix = f"{self.nc.new_inbox()}."
                self._inbox_sub = await subscribe_direct(self.nc, f"{prefix}*", self._on_reply)
                self._inbox = prefix

    def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[len(self._inbox) :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def cluster_size(self) -> int:
        info = getattr(self.nc, "_server_info", None) or {}
        return 1 + len(set(info.get("connect_urls", []) or []))

    async def reply_inbox(self) -> tuple[str, asyncio.Future[Message]]:
        if self._inbox_sub is None:
            with map_errors("start the reply inbox"):
                await self._start_inbox()
        token = str(next(self._tokens))
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        fut.add_done_callback(functools.partial(self._forget, token))
        return self._inbox + token, fut

    def _forget(self, token: str, fut: asyncio.Future[Message]) -> None:
        """A reply waiter is done: drop its entry (a reply popped it already; this is for one
        cancelled or timed out by its caller)."""
        if self._waiting.get(token) is fut:
            del self._waiting[token]

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    async def publish(
        self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
        except nats.errors.MaxPayloadError:
            raise Refused(f"publish on {subject}: {len(data)} bytes exceed max_payload") from None
        except (nats.errors.Error, OSError) as exc:  # closed, buffer full, bad subject, ...
            raise NotConnected(f"publish on {subject}: {type(exc).__name__}: {exc}") from None

    async def bounce(self, reply: str) -> None:
        # The status nats-server itself answers a request with when nobody subscribes.
        await self.publish(reply, b"", headers={"Status": "503"})

    async def subscribe(self, subject: str, cb: Handler, queue: str = "") -> Subscription:
        with map_errors(f"subscribe to {subject}"):
            sub: Any = await self.nc.subscribe(subject, queue=queue, cb=cb)
        return NatsSubscription(sub)

    async def check_subscription(self, subject: str, timeout: float = 2.0) -> None:
        """Raise `PermissionDenied` when the server refused a subscription to `subject`: it
        answers a refused SUB with an error before the PONG of the flush this waits for."""
        await self.flush(timeout)
        if self.refused("subscription", subject):
            raise PermissionDenied(f"subscription to {subject} refused by the server")

    async def subscribe_direct(self, subject: str, fn: DirectHandler) -> Subscription:
        """Subscribe so that `fn` runs for each message, in arrival order, in the read loop.

        `fn` must not block; whatever it raises is logged and the message dropped. Saves a queue
        and a task hop per message over `subscribe`. Draining the subscription waits for nothing:
        every message received was handed to `fn` already.
        """

        with map_errors(f"subscribe to {subject}"):
            return NatsSubscription(await subscribe_direct(self.nc, subject, fn))

    async def flush(self, timeout: float) -> None:
        """Return once the server has processed everything sent before this call.

        nats-py writes its PING straight to the socket, ahead of commands still queued for its
        flusher (a SUB, a PUB): the first PONG can come back before the server saw them. The
        first flush pushes the queue out; the second PING follows it on the wire."""
        try:
            for _ in range(2):
                await self.nc.flush(timeout=max(1, round(timeout)))
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotConnected(f"flush failed: {exc}") from None

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # draining a broken connection: closing is all that is left
                await self.nc.close()


class NatsSubscription:
    """A nats-py subscription whose ending never raises: on a closed connection there is
    nothing left to stop."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._sub.unsubscribe()

    async def drain(self) -> None:
        """Stop receiving; every message the server sent before the stop is handed over first.

        nats-py's own drain queues the UNSUB for its flusher but writes the PING of its round
        trip straight to the socket, so the PONG can come back before the server saw the UNSUB:
        messages sent in between arrive after the subscription was removed and are dropped (an
        ask lost at a shard handoff). So: UNSUB first, then two round trips (the first pushes
        the queued UNSUB out, the second follows it), then nats-py's drain to clean up (its
        second UNSUB is one the server ignores)."""
        sub = self._sub
        conn = getattr(sub, "_conn", None)
        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
            if conn is not None and hasattr(conn, "_send_unsubscribe") and not conn.is_closed:
                await conn._send_unsubscribe(sub._id)
                for _ in range(2):
                    await conn.flush(timeout=5)
            await sub.drain()


async def _first_of(fatal: asyncio.Future[Exception], connecting: Any, timeout: float) -> Any:
    """The connection `connecting` makes within `timeout`, unless `fatal` comes first (then its
    exception is raised and the attempt abandoned)."""
    task = asyncio.ensure_future(connecting)
    try:
        done, _ = await asyncio.wait({task, fatal}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if task in done:
            return task.result()
        if fatal in done:
            raise fatal.result()
        raise TimeoutError()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _one_record_per_flush(nc: NatsClient) -> None:
    """Make nats-py's flusher write one TLS record per flush instead of one per command.

    The flusher hands its queued commands (one per publish) to `writelines`; asyncio's TLS
    transport encrypts each item as a record of its own, so 40 publishes queued during one turn
    of the loop cost 40 `SSLObject.write` calls and 40 records, which the server then reads and
    routes one record at a time. Joined, they are one `SSLObject.write` (records of up to
    16 KiB). Same bytes, same order. A plain TCP transport joins them already (asyncio's
    `writelines`), so only TLS connections are changed. nats-py keeps the transport object
    across reconnections (the joined `writelines` stays); this runs again after each one in
    case it made a new one."""
    transport = getattr(nc, "_transport", None)
    if transport is None or not _is_tls(nc):
        return

    def writelines(payload: list[bytes]) -> None:
        transport.write(b"".join(payload))

    transport.writelines = writelines


def _is_tls(nc: NatsClient) -> bool:
    """Whether `nc`'s current connection runs over TLS."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer is not None and writer.get_extra_info("sslcontext") is not None


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout())
