"""Helpers to run real accord clusters from tests, benchmarks and the demo.

`Cluster` starts an embedded nats-server and `accord node` OS processes, and stops every one of them
by PID. Nothing here is a fake: it is the same engine and the same node binary users run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .._connect import connect
from .._errors import AccordError, ConfigurationError, NotConnected
from .._mesh import Mesh
from .._status import cluster_status
from ..engine._auth import Role, UserRegistry
from ..engine._server import EmbeddedServer
from ..engine._serverconf import ServerSecurity
from ..engine._tls import issue_cert


class NodeProcess:
    """One `accord node` OS process."""

    def __init__(
        self,
        url: str,
        app: str,
        name: str,
        *,
        cluster: str = "default",
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.url, self.app, self.name, self.cluster = url, app, name, cluster
        self.env = env or {}
        self.log_dir = log_dir
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> NodeProcess:
        args = [sys.executable, "-m", "accord", "node", "--nats", self.url, "--app", self.app,
                "--name", self.name, "--cluster", self.cluster, *self.extra_args]  # fmt: skip
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, **self.env},
            )  # fmt: skip
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful stop (SIGTERM: the node hands its shards off), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self, lines: int = 30) -> str:
        """One line on the process (pid, running or its exit code), then its log's last lines."""
        if self.proc is None:
            return f"{self.name}: not started"
        code = self.proc.poll()
        state = "running" if code is None else f"exit {code}"
        head = f"{self.name}: pid {self.proc.pid}, {state}"
        if self.log_dir is None:
            return head
        try:
            tail = (self.log_dir / f"{self.name}.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"{head} (no log: {exc})"
        return "\n".join([head, *("  " + line for line in tail[-lines:])])


class Cluster:
    """An embedded nats-server plus `accord node` processes; use as a context manager."""

    def __init__(
        self,
        app: str,
        nodes: int = 3,
        *,
        cluster: str = "default",
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        url: str | None = None,
        node_args: dict[str, list[str]] | None = None,
        secure: bool = False,
    ) -> None:
        """`secure`: the embedded server requires a generated NKey credential and speaks TLS
        with a generated CA (as `accord up --tls` does); nodes and `connect()` use them."""
        self.app = app
        self.node_args = node_args or {}
        self.cluster = cluster
        self.env = env or {}
        self.log_dir = log_dir
        self.creds: Path | None = None
        self.tls_ca: Path | None = None
        self._home: Path | None = None  # the generated secrets, removed by stop()
        security = self._secure() if secure and not url else None
        self.server: EmbeddedServer | None = None if url else EmbeddedServer(security=security)
        self.url = url or ""
        self.nodes: dict[str, NodeProcess] = {}
        self._initial = nodes

    def _secure(self) -> ServerSecurity:
        home = self._home = Path(tempfile.mkdtemp(prefix="accord-secure-"))
        registry = UserRegistry(home / "auth")
        self.creds = registry.issue("cluster", "node", "*")
        tls = issue_cert(home / "tls", "server", ["127.0.0.1", "localhost"])
        self.tls_ca = tls.ca
        self.env = {**self.env, "ACCORD_CREDS": str(self.creds), "ACCORD_TLS_CA": str(tls.ca)}
        return ServerSecurity(registry=registry, tls=tls)

    def issue(self, name: str, role: Role) -> Path:
        """A new credential of `role` for this secure cluster (its seed file), in force at once
        (the server reloads its users)."""
        if self._home is None or self.server is None:
            raise ConfigurationError("issue() needs a Cluster(secure=True) of its own server")
        path = UserRegistry(self._home / "auth").issue(name, role, self.cluster)
        self.server.reload()
        return path

    def start(self) -> Cluster:
        if self.server is not None:
            self.url = self.server.start()
        try:
            for i in range(1, self._initial + 1):
                self.add_node(f"node-{i}")
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, name: str, extra_args: list[str] | None = None) -> NodeProcess:
        """Start node `name`; `extra_args` (or `node_args[name]`) go to `accord node`."""
        node = NodeProcess(
            self.url, self.app, name, cluster=self.cluster, env=self.env, log_dir=self.log_dir,
            extra_args=extra_args if extra_args is not None else self.node_args.get(name),
        ).start()  # fmt: skip
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self.server is not None:
            self.server.stop()
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def describe(self) -> str:
        """Every node's process state and log tail (a failing test's report shows it)."""
        return "\n".join(node.describe() for node in self.nodes.values())

    def connect(self) -> Any:
        return connect(self.url, cluster=self.cluster, creds=self.creds, tls_ca=self.tls_ca)


async def wait_for_placement(
    mesh: Mesh, live: set[str], timeout: float = 30.0, *, interval: float = 0.05
) -> dict[str, Any]:
    """Wait until every shard is owned by a node in `live` and every node in `live` is seen alive
    and holds at least one shard; return that status. Raises TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            st = await cluster_status(mesh, timeout=1.0)
        except AccordError:
            await asyncio.sleep(interval)
            continue
        last = st
        owners = {s["owner"] for s in st["shards"]}
        alive = {n["name"] for n in st["nodes"] if n["alive"]}
        if len(st["shards"]) == st["num_shards"] and owners == live and live <= alive:
            return st
        await asyncio.sleep(interval)
    raise TimeoutError(f"placement over {sorted(live)} not reached in {timeout}s; last: {last}")


@contextlib.asynccontextmanager
async def connect_retrying(
    urls: str | list[str],
    *,
    name: str | None = None,
    attempts: int = 10,
    pause: float = 1.0,
    cluster: str = "default",
    creds: str | Path | None = None,
    tls_ca: str | Path | None = None,
) -> AsyncIterator[Mesh]:
    """`accord.connect`, retried on `NotConnected`: JetStream can be slow to answer while a lab of
    servers and nodes starts up. Closes the client (bounded to 10 s) on exit."""
    for attempt in range(attempts):
        try:
            cm = connect(urls, name=name, cluster=cluster, creds=creds, tls_ca=tls_ca)
            mesh = await cm.__aenter__()
            break
        except NotConnected:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(pause)
    try:
        yield mesh
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cm.__aexit__(None, None, None), 10)
