"""The client side of workflows: `mesh.start_workflow`, `mesh.workflow` and `WorkflowHandle`.

Everything is a message to the run's agent (`type/key`): starting is idempotent (a run that
exists is returned as it is), so a start or a signal whose answer was lost is simply sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

import msgspec

from .._codec import message_type_name
from .._errors import (
    AccordError,
    BadRequest,
    ConfigurationError,
    DeliveryTimeout,
    NotConnected,
    OutcomeUnknown,
    RemoteError,
    WorkflowFailed,
    WorkflowNotFound,
)
from .._ids import AgentId, validate_agent_type
from .._spec import known_spec
from ..engine._api import NotFound
from ._mesh_api import MeshLike
from ._model import (
    TERMINAL,
    Journal,
    WorkflowCancel,
    WorkflowQuery,
    WorkflowReport,
    WorkflowRetry,
    WorkflowSignal,
    WorkflowStart,
    WorkflowStatus,
)
from ._monitor import RunEntry, done_subject, index_key, run_index

ASK_TIMEOUT = 10.0
RESULT_RECHECK = 2.0
"""`result()` waits for the run's end announcement, asking its status again at least this often."""
ATTEMPT_TIMEOUT = 5.0
"""Seconds one attempt may take: a request that reached an owner which then died gets no answer,
and waiting past a shard's failover for it would be wasted (every message here is idempotent)."""
_RETRIED = (DeliveryTimeout, NotConnected, OutcomeUnknown)
_report_dec = msgspec.msgpack.Decoder(WorkflowReport)
_Until = Callable[
    [WorkflowReport | None, float | None], Awaitable[tuple[WorkflowStatus, WorkflowReport]]
]
_REFUSALS: dict[str, type[AccordError]] = {
    "WorkflowNotFound": WorkflowNotFound, "BadRequest": BadRequest,
}  # fmt: skip


class WorkflowHandle:
    """A workflow run, by id (`"<type>/<key>"`). `await mesh.workflow(id)` also checks that the
    run exists (`WorkflowNotFound`)."""

    def __init__(self, mesh: MeshLike, run_id: str) -> None:
        self._mesh = mesh
        self.id = str(AgentId.parse(run_id))
        # Set by `start_workflow`: listening to the run's end since before the start was sent,
        # with the start's report (the first `result()` or `cancel()` takes both over).
        self._listener: _Listener | None = None
        self._started: WorkflowReport | None = None

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    def __await__(self) -> Generator[Any, None, WorkflowHandle]:
        return self._checked().__await__()

    async def _checked(self) -> WorkflowHandle:
        await self.status()
        return self

    async def _ask(self, msg: msgspec.Struct, timeout: float | None = None) -> WorkflowReport:
        """Ask the run agent; a lost answer is asked again (every message here is idempotent)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or ASK_TIMEOUT)
        while True:
            left = deadline - loop.time()
            try:
                attempt = max(0.1, min(left, ATTEMPT_TIMEOUT))
                report = await self._mesh.ask(self.id, msg, returns=WorkflowReport, timeout=attempt)
                return typing.cast(WorkflowReport, report)
            except _RETRIED:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)
            except RemoteError as exc:  # the run agent refused: raise it as its own kind
                if exc.remote_type == "NotConnected" and loop.time() < deadline:
                    await asyncio.sleep(0.2)  # its turn could not store a timer: again
                    continue
                local = _REFUSALS.get(exc.remote_type)
                if local is None:
                    raise
                raise local(exc.remote_message) from None

    async def _report(self, journal: bool = False, timeout: float | None = None) -> WorkflowReport:
        report = await self._ask(WorkflowQuery(journal), timeout)
        if not report.started:
            raise WorkflowNotFound(f"no workflow run {self.id}")
        return report

    async def status(self) -> WorkflowStatus:
        """The run's state now. Raises `WorkflowNotFound` for an id that was never started."""
        return (await self._report()).status

    async def journal(self) -> Journal:
        """The run's journal: every entry in order, and what they fold into."""
        report = await self._report(journal=True)
        assert report.journal is not None
        return report.journal

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end; return what `run` returned (decoded as its return
        annotation when this process knows the workflow class). Raises `WorkflowFailed` when it
        failed, was compensated or cancelled; `DeliveryTimeout` if it has not ended within
        `timeout` seconds (None: wait for ever) — the run goes on either way."""
        first = self._started if self._listener is not None else None
        async with self._ended() as until_ended:
            st, report = await until_ended(first, timeout)
        if st.state not in TERMINAL:
            raise DeliveryTimeout(f"workflow {self.id} still {st.state} after {timeout} s",
                                  maybe_delivered=True)  # fmt: skip
        if st.state == "completed":
            return _decode_result(self.id, report.result)
        raise WorkflowFailed(
            f"workflow {self.id} {st.state}: {st.error}",
            state=st.state, cause=st.error, compensated=st.state == "compensated",
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def _ended(self) -> AsyncIterator[_Until]:
        """Listen for the run's end announcement (or take over the listener `start_workflow`
        left); yield `until_ended(first, timeout)`, which returns (status, report) once the run
        ended or `timeout` passed (`first`: a report in hand already, made after the listening
        began; else the run is asked)."""
        loop = asyncio.get_running_loop()
        listener, self._listener = self._listener, None
        if listener is None:
            listener = await _Listener.listen(self._mesh, self.id)
        ended, announced = listener.ended, listener.announced

        async def until_ended(
            first: WorkflowReport | None, timeout: float | None
        ) -> tuple[WorkflowStatus, WorkflowReport]:
            deadline = None if timeout is None else loop.time() + timeout
            report = first
            # Listening already: a run the index shows under way announces its end to us.
            under_way = first is None and await self._under_way()
            while True:
                if under_way:
                    under_way = False
                elif report is None:
                    try:
                        ended.clear()
                        report = await self._report()
                    except _RETRIED:  # the run's shard is failing over: ask until our deadline
                        if deadline is not None and loop.time() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                        continue
                if report is not None:
                    st = report.status
                    left = None if deadline is None else deadline - loop.time()
                    if st.state in TERMINAL or (left is not None and left <= 0):
                        return st, report
                left = None if deadline is None else deadline - loop.time()
                report = None
                with contextlib.suppress(TimeoutError):
                    pause = RESULT_RECHECK if left is None else min(RESULT_RECHECK, left)
                    await asyncio.wait_for(ended.wait(), pause)
                # The announcement of a journaled end carries the run's report: no need to ask.
                for data in announced:
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        got = _report_dec.decode(data) if data else None
                        if got is not None and got.status.state in TERMINAL:
                            report = got
                announced.clear()

        try:
            yield until_ended
        finally:
            await listener.close()

    async def _under_way(self) -> bool:
        """Does the run index show the run under way? Read from the engine, so the run is not
        asked; False when unsure (no entry, unreadable, ended): then the run is asked. The end
        turn writes the index before the end is announced, so after subscribing an entry still
        under way means the announcement is yet to come (or, if that index write failed, the
        status asked `RESULT_RECHECK` seconds later tells)."""
        try:
            kv = await run_index(self._mesh)
            e = await kv.get(index_key(self.id), timeout=ATTEMPT_TIMEOUT)
            entry = None if e is None else msgspec.json.decode(e.value, type=RunEntry)
        except (AccordError, NotFound, msgspec.DecodeError, msgspec.ValidationError):
            return False
        return entry is not None and entry.state in ("running", "waiting")

    async def signal(self, msg: msgspec.Struct) -> None:
        """Deliver `msg` to the run (kept in its journal until a `wait_signal` of its type takes
        it). Sent again with the same id until answered: delivered once. A signal to an ended
        run is ignored; `WorkflowNotFound` for an unknown run."""
        wire = message_type_name(type(msg))
        await self._ask(WorkflowSignal(uuid.uuid4().hex, wire, msgspec.msgpack.encode(msg)))

    async def signal_json(self, type_name: str, body: bytes) -> None:
        """`signal` with a JSON-encoded message named by its wire type (the CLI)."""
        await self._ask(WorkflowSignal(uuid.uuid4().hex, type_name, body, json=True))

    async def cancel(self, timeout: float | None = 60.0) -> WorkflowStatus:
        """Cancel the run: a step under way is interrupted, the compensations of its completed
        steps run newest first (journaled, each retried per its step's policy), then it ends
        `cancelled` (at once when no completed step has a compensation). Nothing happens to an
        ended run. Waits up to `timeout` seconds (None: for ever) for the end; returns the
        status then (`running` if the compensations are still under way)."""
        async with self._ended() as until_ended:
            report = await self._ask(WorkflowCancel())
            st, _ = await until_ended(report, timeout)
        return st

    async def retry(self) -> WorkflowStatus:
        """Go on with a failed or compensated run from its failed step (after its cause was
        fixed): steps whose compensation ran are done again. `BadRequest` for a run in another
        state. Returns its status."""
        report = await self._ask(WorkflowRetry())
        return report.status


class _Listener:
    """A subscription to one run's end announcements, and what it received."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.announced: list[bytes] = []
        self.sub: Any = None

    @classmethod
    async def listen(cls, mesh: MeshLike, run_id: str) -> _Listener:
        listener = cls()

        async def on_end(msg: Any) -> None:
            listener.announced.append(msg.data)
            listener.ended.set()

        listener.sub = await mesh._transport.subscribe(done_subject(mesh, run_id), on_end)
        return listener

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def close_soon(self) -> None:
        """Unsubscribe from a finalizer (the handle was dropped before its `result()`)."""
        if self.sub is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop (any more): nothing to do
            task = asyncio.get_running_loop().create_task(self.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()
_result_types: dict[type, Any] = {}


def _decode_result(run_id: str, data: bytes) -> Any:
    spec = known_spec(AgentId.parse(run_id).type)
    typ: Any = Any
    if spec is not None:
        typ = _result_types.get(spec.cls, _result_types)
        if typ is _result_types:  # resolved once per class: string annotations are compiled
            try:
                typ = typing.get_type_hints(spec.cls.run).get("return", Any)
            except Exception:
                typ = Any
            _result_types[spec.cls] = typ
    try:
        return msgspec.msgpack.decode(data, type=typ)
    except (msgspec.ValidationError, TypeError):
        return msgspec.msgpack.decode(data)


async def start_workflow(
    mesh: MeshLike, workflow: type | str, key: str, input: Any, *, timeout: float | None = None
) -> WorkflowHandle:
    """Start the run `<type>/<key>` with `input`; return its handle. A run of that id that exists
    already is returned as it is (nothing is started: idempotent). Raises `BadRequest` if
    `input` does not decode as the run's input type, `AgentTypeNotFound` if no node hosts the
    type, `DeliveryTimeout` if the start was not confirmed in time (then starting again is safe).
    """
    if isinstance(workflow, str):
        type_name = validate_agent_type(workflow)
    else:
        spec = getattr(workflow, "__accord_spec__", None)
        if spec is None or not hasattr(workflow, "__accord_workflow_version__"):
            raise ConfigurationError(f"{workflow!r} is not an accord.Workflow subclass")
        type_name = spec.type_name
    handle = WorkflowHandle(mesh, str(AgentId(type_name, key)))
    # Listening before the start is sent: the handle's `result()` then needs neither to read
    # the run index nor to ask the run (any end after the start's report is announced to it).
    listener = await _Listener.listen(mesh, handle.id)
    try:
        handle._started = await handle._ask(WorkflowStart(msgspec.msgpack.encode(input)), timeout)
    except BaseException:
        await listener.close()
        raise
    handle._listener = listener
    weakref.finalize(handle, listener.close_soon)
    return handle
