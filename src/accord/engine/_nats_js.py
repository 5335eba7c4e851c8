"""`JetStream` over nats-py, mixed into `NatsTransport`: streams, buckets, stored messages and
consumers.

Per-message calls (appends, KV writes and reads, message gets) are raw JetStream requests through
the transport's shared inbox, replies decoded with msgspec; rarer administration goes through
nats-py's manager, bounded by the call's timeout. Every nats-py error is mapped inside the method.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .._errors import NotConnected, PermissionDenied, StorageFull
from ._api import (
    KV,
    BucketSpec,
    Consumer,
    ConsumerSpec,
    ConsumerState,
    Dispatch,
    NoResponders,
    NotFound,
    PubAck,
    Refused,
    RequestTimeout,
    StoredMessage,
    StreamSpec,
    StreamState,
)
from ._nats_consumer import PullConsumer
from ._nats_errors import STORAGE_FULL, error_from_reply, map_errors
from ._nats_kv import NatsKV
from ._nats_wire import decode_ack, msg_reply, parse_headers

API = "$JS.API."
T = TypeVar("T")


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A call abandoned by `_refusable`: its outcome is of no interest (nor worth a warning)."""
    if not task.cancelled():
        task.exception()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _kv_stream(spec: BucketSpec) -> StreamConfig:
    """The stream of a KV bucket as nats-py's `create_key_value` makes it, plus `first_seq`
    (which nats-py's KV config cannot carry)."""
    return StreamConfig(
        name=f"KV_{spec.name}",
        subjects=[f"$KV.{spec.name}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        max_bytes=spec.max_bytes or None,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=spec.history,
        num_replicas=spec.replicas,
        storage=StorageType(spec.storage),
        subject_delete_marker_ttl=spec.marker_ttl or None,
        first_seq=spec.first_seq,
    )


class NatsJetStream:
    """The JetStream half of the NATS engine (needs the transport's connection and requests)."""

    nc: NatsClient
    js: JetStreamContext
    denied: dict[tuple[str, str], float]  # subjects the server refused (see NatsTransport)
    #: nats-py JetStream calls under way: (API family, stream, its refusal), lowercased
    _refusable_calls: set[tuple[str, str, asyncio.Future[str]]]

    async def request_msg(  # provided by NatsTransport
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        raise NotImplementedError

    async def api_call(self, op: str, body: bytes, timeout: float) -> dict[str, Any]:
        """One JetStream API request (`op` after `$JS.API.`); its JSON reply, errors raised."""
        try:
            msg = await self.request_msg(API + op, body, timeout)
        except NoResponders:
            raise NotConnected(f"{op}: JetStream is not available") from None
        except RequestTimeout:
            raise NotConnected(f"{op}: JetStream did not answer within {timeout:g}s") from None
        try:
            reply: dict[str, Any] = msgspec.json.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise Refused(f"{op}: unreadable reply: {exc}") from None
        if "error" in reply:
            raise error_from_reply(reply["error"], op)
        return reply

    async def _refusable(
        self, stream: str, call: Awaitable[T], timeout: float, api: str = "STREAM"
    ) -> T:
        """Await nats-py's JetStream `call` about `stream` for at most `timeout` seconds
        (`TimeoutError` after). nats-py's requests go through its own inbox, which the server's
        refusal never reaches: a refused request of the `api` family ("STREAM" or "CONSUMER":
        `$JS.API.<api>.…`) naming `stream` (`_api_refused`) ends the call at once with
        `PermissionDenied` instead of at its timeout. (A call of the same family on the same
        stream, by the same connection at the same moment, ends with it: the same permission.)"""
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (api.lower(), stream.lower(), refused)
        self._refusable_calls.add(entry)
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait((task, refused), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if task in done:
                return task.result()
            if refused in done:
                raise PermissionDenied(f"{refused.result()} refused by the server")
            raise TimeoutError
        finally:
            self._refusable_calls.discard(entry)
            refused.cancel()
            if not task.done():  # refused, timed out or cancelled: nats-py's wait ends too
                task.cancel()
                task.add_done_callback(_retrieved)

    def _api_refused(self, subject: str) -> None:
        """The server refused a publish on `subject` (lowercased): the nats-py JetStream calls
        of its family about the stream it names end now (no reply will come)."""
        if not subject.startswith("$js.api."):
            return
        tokens = subject.split(".")
        for api, stream, refused in list(self._refusable_calls):
            if tokens[2] == api and stream in tokens[3:] and not refused.done():
                refused.set_result(f"JetStream request {subject}")

    # -- buckets and streams -------------------------------------------------------------

    async def bucket(self, spec: BucketSpec, *, create: bool = True, timeout: float = 5.0) -> KV:
        what = f"open bucket {spec.name}"
        stream = f"KV_{spec.name}"
        with map_errors(what):
            try:
                kv = await self._refusable(stream, self.js.key_value(spec.name), timeout)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise NotFound(f"{what}: no such bucket") from None
                cfg = KeyValueConfig(
                    bucket=spec.name,
                    history=spec.history,
                    replicas=spec.replicas,
                    storage=StorageType(spec.storage),
                    max_bytes=spec.max_bytes or None,
                    limit_marker_ttl=spec.marker_ttl or None,
                )
                try:
                    if spec.first_seq:
                        await self._refusable(stream, self.js.add_stream(_kv_stream(spec)), timeout)
                        kv = await self._refusable(stream, self.js.key_value(spec.name), timeout)
                    else:
                        kv = await self._refusable(stream, self.js.create_key_value(cfg), timeout)
                except nats.js.errors.BadRequestError as exc:  # created concurrently
                    if exc.err_code in STORAGE_FULL:
                        raise
                    kv = await self._refusable(stream, self.js.key_value(spec.name), timeout)
        return NatsKV(self, spec.name, direct=bool(kv._direct))

    async def ensure_stream(self, spec: StreamSpec, *, timeout: float = 5.0) -> None:
        cfg = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
            storage=StorageType(spec.storage),
            num_replicas=spec.replicas,
            max_msgs=spec.max_msgs or None,
            max_bytes=spec.max_bytes or None,
            max_age=spec.max_age or None,
            max_msgs_per_subject=spec.max_msgs_per_subject or -1,
            discard=DiscardPolicy.NEW if spec.discard_new else DiscardPolicy.OLD,
        )
        if spec.duplicate_window:
            cfg.duplicate_window = spec.duplicate_window
        with map_errors(f"create stream {spec.name}"):
            try:
                await self._refusable(spec.name, self.js.stream_info(spec.name), timeout)
                return
            except nats.js.errors.NotFoundError:
                pass
            try:
                await self._refusable(spec.name, self.js.add_stream(cfg), timeout)
            except nats.js.errors.BadRequestError as exc:
                # created concurrently ("already in use"): keep it; any other refusal is real
                if exc.err_code != 10058:
                    raise

    async def stream_state(self, name: str, *, timeout: float = 5.0) -> StreamState | None:
        with map_errors(f"stream info {name}"):
            try:
                info = await self._refusable(name, self.js.stream_info(name), timeout)
            except nats.js.errors.NotFoundError:
                return None
        leader = info.cluster.leader if info.cluster is not None else None
        return StreamState(
            name=name,
            replicas=int(info.config.num_replicas or 1),
            messages=int(info.state.messages),
            bytes=int(info.state.bytes),
            leader=leader or "",
        )

    async def set_replicas(self, name: str, replicas: int, *, timeout: float = 5.0) -> None:
        with map_errors(f"set replicas of {name}"):
            info = await self._refusable(name, self.js.stream_info(name), timeout)
            info.config.num_replicas = replicas
            await self._refusable(name, self.js.update_stream(info.config), timeout)

    # -- messages ------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        expect_last_subject_seq: int | None = None,
        ttl: int = 0,
        timeout: float = 5.0,
    ) -> PubAck:
        if msg_id is not None or expect_last_subject_seq is not None or ttl:
            headers = dict(headers) if headers else {}
            if msg_id is not None:
                headers["Nats-Msg-Id"] = msg_id
            if expect_last_subject_seq is not None:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(expect_last_subject_seq)
            if ttl:
                headers["Nats-TTL"] = f"{ttl}s"
        # request_msg raises only NoResponders, RequestTimeout and NotConnected, as documented
        msg = await self.request_msg(subject, data, timeout, headers=headers)
        return decode_ack(msg.data, f"append to {subject}")

    async def get_message(
        self,
        stream: str,
        *,
        seq: int = 0,
        subject: str | None = None,
        after: bool = False,
        timeout: float = 5.0,
    ) -> StoredMessage | None:
        if after:
            body: dict[str, Any] = {"seq": max(seq, 1), "next_by_subj": subject or ">"}
        elif subject is not None:
            body = {"last_by_subj": subject}
        else:
            body = {"seq": seq}
        return await self.stored_message(stream, msgspec.json.encode(body), timeout)

    async def stored_message(
        self, stream: str, body: bytes, timeout: float
    ) -> StoredMessage | None:
        """A STREAM.MSG.GET (answered by the stream leader); None if there is no such message."""
        op = f"STREAM.MSG.GET.{stream}"
        try:
            msg = await self.request_msg(API + op, body, timeout)
        except NoResponders:
            raise NotConnected(f"{op}: JetStream is not available") from None
        except RequestTimeout:
            raise NotConnected(f"{op}: JetStream did not answer within {timeout:g}s") from None
        try:
            reply = msg_reply.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise Refused(f"{op}: unreadable reply: {exc}") from None
        if reply.error is not None:
            err = error_from_reply(msgspec.structs.asdict(reply.error), op)
            if isinstance(err, NotFound) and reply.error.err_code != 10059:
                return None  # no such message (a missing stream stays NotFound)
            raise err
        raw = reply.message
        if raw is None:
            return None
        return StoredMessage(
            seq=raw.seq,
            subject=raw.subject,
            data=base64.b64decode(raw.data) if raw.data else b"",
            headers=parse_headers(base64.b64decode(raw.hdrs)) if raw.hdrs else None,
        )

    async def delete_message(self, stream: str, seq: int, *, timeout: float = 5.0) -> bool:
        body = msgspec.json.encode({"seq": seq})
        try:
            await self.api_call(f"STREAM.MSG.DELETE.{stream}", body, timeout)
        except Refused:  # "no message found" on delete comes back as a generic failure
            return False
        except NotFound as exc:
            if "stream not found" in str(exc):
                raise
            return False
        return True

    async def purge(self, stream: str, *, subject: str | None = None, timeout: float = 5.0) -> int:
        body = msgspec.json.encode({"filter": subject}) if subject else b""
        reply = await self.api_call(f"STREAM.PURGE.{stream}", body, timeout)
        return int(reply.get("purged", 0))

    # -- consumers -----------------------------------------------------------------------

    async def ensure_consumer(
        self, stream: str, spec: ConsumerSpec, *, timeout: float = 5.0
    ) -> None:
        config = ConsumerConfig(
            durable_name=spec.name,
            filter_subject=spec.filter_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if spec.start_seq else DeliverPolicy.ALL,
            opt_start_seq=spec.start_seq or None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_ack_pending=spec.max_ack_pending,
            inactive_threshold=spec.inactive_threshold,
        )
        with map_errors(f"create consumer {spec.name} on {stream}"):
            await self._refusable(stream, self.js.add_consumer(stream, config), timeout, "CONSUMER")

    async def delete_consumer(self, stream: str, name: str, *, timeout: float = 5.0) -> bool:
        with map_errors(f"delete consumer {name} on {stream}"):
            try:
                await self._refusable(
                    stream, self.js.delete_consumer(stream, name), timeout, "CONSUMER"
                )
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == 10059:  # the stream, not the consumer
                    raise
                return False
        return True

    async def consumers(self, stream: str, *, timeout: float = 5.0) -> dict[str, str]:
        with map_errors(f"list consumers of {stream}"):
            infos = await self._refusable(
                stream, self.js.consumers_info(stream), timeout, "CONSUMER"
            )
        return {str(i.name): str(i.config.filter_subject or "") for i in infos}

    async def consume(
        self,
        stream: str,
        consumer: str,
        dispatch: Dispatch,
        *,
        has_capacity: Callable[[], Awaitable[None]],
        still_going: Callable[[], bool],
        batch: int = 128,
    ) -> Consumer:
        await self.api_call(f"CONSUMER.INFO.{stream}.{consumer}", b"", 5.0)  # NotFound if none
        pull = PullConsumer(self.nc, stream, consumer, dispatch, has_capacity, still_going, batch)
        with map_errors(f"consume {stream}/{consumer}"):
            await pull.start()
        return pull

    async def consumer_info(
        self, stream: str, name: str, *, timeout: float = 5.0
    ) -> ConsumerState | None:
        try:
            info = await self.api_call(f"CONSUMER.INFO.{stream}.{name}", b"", timeout)
        except NotFound:
            return None
        return ConsumerState(
            name=name,
            ack_floor=int((info.get("ack_floor") or {}).get("stream_seq", 0)),
            pending=int(info.get("num_pending", 0)),
            ack_pending=int(info.get("num_ack_pending", 0)),
            redelivered=int(info.get("num_redelivered", 0)),
        )

    async def tail(
        self, stream: str, subject: str, last: int, *, within: int = 0, timeout: float = 5.0
    ) -> list[StoredMessage]:
        # An ephemeral ordered consumer from the first sequence worth reading: one pass over
        # the stream's tail instead of a request per message.
        out: list[StoredMessage] = []
        with map_errors(f"read {subject} from {stream}"):
            info = await self._refusable(stream, self.js.stream_info(stream), timeout)
            if info.state.messages == 0 or last <= 0:
                return []
            start = info.state.first_seq
            if within > 0:
                start = max(start, info.state.last_seq - within + 1)
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            )
            sub = await self._refusable(
                stream,
                self.js.subscribe(subject, stream=stream, ordered_consumer=True, config=config),
                timeout,
                "CONSUMER",
            )
            try:
                while True:
                    try:
                        msg = await sub.next_msg(timeout=min(0.5, timeout))
                    except (TimeoutError, nats.errors.TimeoutError):
                        break  # nothing more on the subject after `start`
                    meta = msg.metadata
                    out.append(StoredMessage(meta.sequence.stream, msg.subject, msg.data,
                                             msg.headers))  # fmt: skip
                    if meta.num_pending == 0:
                        break
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return out[-last:]

    async def reservable_bytes(self, *, replicas: int = 1, timeout: float = 10.0) -> int:
        # nats-server reports no server limit to clients (account limits say -1), but refuses a
        # stream whose max_bytes would take its reservations past it (10047): search with a probe
        # stream, created and deleted at once, from 1 TiB down, then bisect the last step.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = f"accordprobe_{os.getpid()}_{uuid.uuid4().hex[:12]}"  # unique per call

        async def fits(size: int) -> bool:
            cfg = StreamConfig(name=name, subjects=[f"{name}.none"], max_bytes=size,
                               num_replicas=replicas, storage=StorageType.FILE)  # fmt: skip
            left = max(0.1, deadline - loop.time())
            try:
                with map_errors(f"probe storage ({size} bytes)"):
                    await asyncio.wait_for(self.js.add_stream(cfg), left)
            except StorageFull:
                return False
            except Refused as exc:  # clustered: "no suitable peers for placement, insufficient
                if "insufficient storage" in str(exc):  # storage" (10005)
                    return False
                raise
            finally:  # also after a timeout: the creation may have been applied
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.js.delete_stream(name), max(left, 1.0))
            return True

        high = 1 << 40
        if await fits(high):
            return 0  # a TiB free: the limit, if any, is not worth a share of
        low = high
        while low > 1 << 16:
            low //= 2
            if await fits(low):
                break
        else:
            return 0
        step = low
        for _ in range(3):  # low fits and low + step does not: halve the gap (to 1/8)
            step //= 2
            if await fits(low + step):
                low += step
        return low
