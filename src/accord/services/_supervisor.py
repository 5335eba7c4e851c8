"""One replica of a service on this node: its OS process, health probes, restarts and logs.

The process gets `$PORT` (assigned here unless the spec fixes it), `$ACCORD_SERVICE`,
`$ACCORD_REPLICA`, `$ACCORD_NODE` and, for fenced services, `$ACCORD_FENCING_TOKEN`. It runs in
its own session (killed as a group) and dies with the node (`PR_SET_PDEATHSIG`), as it would with
the machine. A crash is restarted after `backoff_initial·2^k` seconds (k = consecutive crashes,
capped at `backoff_max`, ±20 % jitter); a run longer than `stable_after` resets k. A replica that
fails `failure_threshold` probes in a row (or never passes one within `grace`) is killed and
counts as a crash.

Fenced replicas (single-instance and failover services) run only while this node holds the
service's lease: the process is started after the lease is taken and killed as soon as the lease
is lost, which happens before the server could grant it to anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from .._background import Background
from .._errors import LeaseLost
from ._spec import ServiceSpec
from ._store import Instance, LogLine

log = logging.getLogger("accord.services")

Publish = Callable[[Instance], Awaitable[None]]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """Runs slot `index` of `spec` here until `stop()`; reports through `publish`."""

    def __init__(
        self,
        spec: ServiceSpec,
        index: int,
        role: str,
        node: str,
        address: str,
        publish: Publish,
        log_sink: Callable[[LogLine], Awaitable[None]],
        lease: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        may_campaign: Callable[[], bool] = lambda: True,
        fenced: bool = False,
    ) -> None:
        self.spec = spec
        self.index = index
        self.node = node
        self._publish = publish
        self._log_sink = log_sink
        self._lease = lease
        self._may_campaign = may_campaign
        self.inst = Instance(
            service=spec.name, index=index, node=node, role=role, status="starting",
            address=address, fenced=fenced,
        )  # fmt: skip
        self._proc: asyncio.subprocess.Process | None = None
        self._bg = Background()
        self._task: asyncio.Task[None] | None = None
        self._crashes = 0
        self._latencies: deque[float] = deque(maxlen=50)
        self.changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"accord-svc-{self.spec.name}")
        self._bg.spawn(self._heartbeat(), name="accord-svc-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._kill()
        await self._bg.close()
        self.inst.status = "stopped"
        self.inst.pid = None
        with contextlib.suppress(Exception):
            await self._publish(self.inst)

    # -- the run loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._lease is None:
                await self._serve(token=None)
            else:
                await self._serve_fenced(self._lease)

    async def _serve_fenced(
        self, lease: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
    ) -> None:
        while not self._may_campaign():  # a standby waits for the primary's node to be gone
            await self._set(status="standby")
            await asyncio.sleep(0.25)
        await self._set(status="waiting_lease")
        try:
            # Bounded wait: a standby whose primary came back must return to standing by.
            async with lease() as held:
                serving = asyncio.create_task(self._serve(token=held.token))
                lost = asyncio.create_task(held.wait_lost())
                try:
                    await asyncio.wait({serving, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (serving, lost):
                        t.cancel()
                    await self._kill()  # before the lease can be granted elsewhere
                    for t in (serving, lost):
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await t
                if lost.done():
                    log.warning("%s/%d: lease lost, process stopped", self.spec.name, self.index)
                    await self._set(status="waiting_lease", pid=None, token=None)
        except asyncio.CancelledError:
            raise
        except LeaseLost:  # held elsewhere for a whole TTL: check the role again
            pass
        except Exception as exc:  # lease service unreachable: retry
            log.warning("%s/%d: lease: %s", self.spec.name, self.index, exc)
            await asyncio.sleep(0.5)

    async def _serve(self, token: int | None) -> None:
        """Run the process, restarting it with backoff, until cancelled."""
        while True:
            started = time.monotonic()
            reason = await self._run_once(token)
            ran = time.monotonic() - started
            self._crashes = 0 if ran >= self.spec.restart.stable_after else self._crashes + 1
            r = self.spec.restart
            delay = min(r.backoff_max, r.backoff_initial * 2 ** max(0, self._crashes - 1))
            delay *= random.uniform(0.8, 1.2)
            log.warning("%s/%d exited (%s); restart in %.1fs", self.spec.name, self.index,
                        reason, delay)  # fmt: skip
            self.inst.restarts += 1
            await self._set(status="backoff", pid=None, last_exit=reason, next_restart_in=delay)
            await asyncio.sleep(delay)

    async def _run_once(self, token: int | None) -> str:
        port = self.spec.port or free_port()
        env = {
            **os.environ,
            **self.spec.env,
            "PORT": str(port),
            "ACCORD_SERVICE": self.spec.name,
            "ACCORD_REPLICA": str(self.index),
            "ACCORD_NODE": self.node,
        }
        if token is not None:
            env["ACCORD_FENCING_TOKEN"] = str(token)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.spec.command,
                cwd=self.spec.workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            return f"cannot start {self.spec.command[0]!r}: {exc.strerror or exc}"
        proc = self._proc
        await self._set(status="starting", pid=proc.pid, port=port, token=token,
                        started_at=time.time(), next_restart_in=None)  # fmt: skip
        pump = asyncio.create_task(self._pump(proc))
        probe = asyncio.create_task(self._probe(port))
        try:
            done, _ = await asyncio.wait(
                {asyncio.ensure_future(proc.wait()), probe}, return_when=asyncio.FIRST_COMPLETED
            )
            if probe in done and proc.returncode is None:
                reason = probe.result()
                await self._kill()
                return reason
            return _exit_reason(proc.returncode)
        finally:
            probe.cancel()
            await self._kill()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(pump, 1.0)

    async def _probe(self, port: int) -> str:
        """Probe until the replica fails; returns why it failed."""
        h = self.spec.health
        url = f"http://127.0.0.1:{port}{h.path}"
        started = time.monotonic()
        seen_ok = False
        failures = 0
        timeout = aiohttp.ClientTimeout(total=h.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                await asyncio.sleep(h.interval if seen_ok else min(h.interval, 0.2))
                t0 = time.perf_counter()
                try:
                    async with http.get(url) as resp:
                        ok = 200 <= resp.status < 300
                        await resp.read()
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    self._latencies.append((time.perf_counter() - t0) * 1000)
                    failures = 0
                    if self.inst.status != "healthy":
                        seen_ok = True
                        await self._set(status="healthy")
                    continue
                if not seen_ok:
                    if time.monotonic() - started > h.grace:
                        return f"no healthy probe within grace {h.grace:g}s"
                    continue
                failures += 1
                if failures >= h.failure_threshold:
                    return f"{failures} failed health probes"
                if self.inst.status == "healthy":
                    await self._set(status="unhealthy")

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the reader's limit: its start is dropped
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\n")[:4000]
            await self._log_sink(LogLine(self.spec.name, self.index, self.node, time.time(), text))

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 0.2 if self._lease is not None else 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    # -- reporting ---------------------------------------------------------------------------------

    def p95(self) -> float | None:
        if len(self._latencies) < 5:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    async def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self.inst, k, v)
        self.inst.p95_ms = self.p95()
        self.changed.set()
        try:
            await self._publish(msgspec.structs.replace(self.inst))
        except Exception as exc:  # NATS away; the heartbeat retries
            log.debug("instance report failed: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                self.inst.p95_ms = self.p95()
                await self._publish(msgspec.structs.replace(self.inst))


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "killed"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
