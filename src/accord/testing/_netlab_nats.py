"""`NatsCluster`: one JetStream nats-server per host of a `NetLab`, routed into one cluster (the
lab itself is `_netlab_hosts.NetLab`; `netlab` exports both)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
import nats.errors

from ..engine._server import find_nats_server
from ._netlab_hosts import NetLab, NetLabError, stop_process


class NatsCluster:
    """One JetStream nats-server per lab host, routed into one cluster; use as context manager.

    Server `hN` has `server_name: hN`, listens on `<ip>:4222` (clients), `<ip>:6222` (routes) and
    `<ip>:8222` (monitoring), stores in its own directory and fsyncs every write
    (`sync_interval: always`); routes ping every second and close after two missed pongs. Stream
    and meta leaders are reported by server name = host name.
    """

    def __init__(
        self,
        lab: NetLab,
        *,
        name: str = "accord",
        base_dir: str | Path | None = None,
        extra_config: str = "",
        configs: dict[str, Path] | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        """`configs`: per host, a configuration `accord server config` generated (users and
        permissions, TLS, routes with their password, fsync always); the lab keeps it and sets
        only what one machine's directory tree shared by every server needs: `server_name` (the
        host name), its own store directory, its monitoring port and the fast route pings.
        `client_options`: nats-py connect options (credentials, TLS) of the lab's own client."""
        self.lab, self.name, self.extra_config = lab, name, extra_config
        self.configs = configs
        self.client_options = client_options or {}
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix=f"{lab.id}-nats-"))
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.started_pids: list[int] = []
        self._paused: set[str] = set()

    def url(self, host: str) -> str:
        return f"nats://{self.lab.ip(host)}:4222"

    @property
    def urls(self) -> list[str]:
        return [self.url(h) for h in self.lab.hosts]

    def live_urls(self) -> list[str]:
        """URLs of servers that run and are not paused."""
        return [self.url(h) for h in self.lab.hosts if self.running(h) and h not in self._paused]

    def log_path(self, host: str) -> Path:
        return self.dir / host / "server.log"

    def _generated(self, host: str, source: Path) -> Path:
        hdir = self.dir / host
        hdir.mkdir(parents=True, exist_ok=True)
        conf = json.loads(source.read_text())
        conf.update(server_name=host, http=f"{self.lab.ip(host)}:8222", ping_interval="1s",
                    ping_max=2)  # fmt: skip
        conf.setdefault("jetstream", {})["store_dir"] = str(hdir / "js")
        path = hdir / "server.conf"
        path.write_text(json.dumps(conf, indent=1))
        return path

    def _config(self, host: str) -> Path:
        if self.configs is not None:
            return self._generated(host, self.configs[host])
        ip, hdir = self.lab.ip(host), self.dir / host
        routes = ", ".join(f'"nats-route://{self.lab.ip(h)}:6222"' for h in self.lab.hosts)
        hdir.mkdir(parents=True, exist_ok=True)
        path = hdir / "server.conf"
        path.write_text(
            f'server_name: "{host}"\nlisten: "{ip}:4222"\nhttp: "{ip}:8222"\n'
            f'jetstream {{ store_dir: "{hdir / "js"}", sync_interval: always }}\n'
            # Routes ping every second, and one that misses two pongs is closed: a partition is
            # noticed in ~2-3 s instead of the default 2 min, and what was queued to a cut-off
            # server is dropped, not delivered when the partition heals (see docs/architecture).
            'ping_interval: "1s"\nping_max: 2\n'
            f'cluster {{ name: "{self.name}", listen: "{ip}:6222", routes: [{routes}] }}\n'
            f"{self.extra_config}\n"
        )
        return path

    def start(self) -> NatsCluster:
        try:
            for h in self.lab.hosts:
                self.start_server(h)
        except BaseException:
            self.stop()
            raise
        return self

    def start_server(self, host: str) -> int:
        """Start (or start again, on its old store) the server of `host`; returns its PID."""
        if self.running(host):
            raise NetLabError(f"server {host} is already running")
        argv = [find_nats_server(), "-c", str(self._config(host)), "-l", str(self.log_path(host))]
        proc = self.lab.run(host, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[host], self._paused = proc, self._paused - {host}
        self.started_pids.append(proc.pid)
        return proc.pid

    def running(self, host: str) -> bool:
        proc = self.procs.get(host)
        return proc is not None and proc.poll() is None

    def pid(self, host: str) -> int | None:
        return self.procs[host].pid if self.running(host) else None

    def kill(self, host: str) -> None:
        """SIGKILL the server of `host` (a crash: no lame-duck, no flush)."""
        proc = self.procs.pop(host, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop_server(self, host: str, grace: float = 10.0) -> None:
        """Graceful stop: SIGTERM, SIGKILL after `grace`."""
        proc = self.procs.pop(host, None)
        if proc is not None:
            stop_process(proc, grace)

    def restart(self, host: str, *, graceful: bool = True) -> int:
        (self.stop_server if graceful else self.kill)(host)
        return self.start_server(host)

    def pause(self, host: str) -> None:
        os.kill(self.procs[host].pid, signal.SIGSTOP)
        self._paused.add(host)

    def resume(self, host: str) -> None:
        os.kill(self.procs[host].pid, signal.SIGCONT)
        self._paused.discard(host)

    def stop(self) -> None:
        for h in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop_server(h)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- readiness and leaders ----------------------------------------------------------------
    def monitor(self, host: str, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET http://<ip>:8222/<path> (no proxy); returns (status, decoded JSON or None)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{self.lab.ip(host)}:8222/{path.lstrip('/')}"
        try:
            with opener.open(url, timeout=timeout) as resp:
                return int(resp.status), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return int(e.code), None
        except (OSError, ValueError):
            return 0, None

    def wait_ready(self, timeout: float = 30.0, hosts: Iterable[str] | None = None) -> str:
        """Block until every running, unpaused server (or each of `hosts`) is healthy
        (`/healthz`: JetStream current with the meta leader and all its streams caught up)
        and they agree on a JetStream meta leader with all lab hosts as peers; returns the
        meta leader's host. Raises TimeoutError."""
        deadline, last = time.monotonic() + timeout, ""
        while True:
            live = list(hosts) if hosts is not None else [
                h for h in self.lab.hosts if self.running(h) and h not in self._paused
            ]  # fmt: skip
            leaders, ok = set(), bool(live)
            for h in live:
                status, _ = self.monitor(h, "healthz")
                _, jsz = self.monitor(h, "jsz")
                meta = (jsz or {}).get("meta_cluster") or {}
                leaders.add(meta.get("leader") or "")
                healthy = status == 200 and meta.get("cluster_size") == len(self.lab.hosts)
                ok, last = ok and healthy, f"{h}: healthz={status} meta={meta}"
            if ok and len(leaders) == 1 and "" not in leaders:
                leader = leaders.pop()
                meta = (self.monitor(leader, "jsz")[1] or {}).get("meta_cluster") or {}
                behind = [r["name"] for r in meta.get("replicas", []) if r["name"] in live
                          and r["name"] != leader and not r.get("current")]  # fmt: skip
                if not behind:
                    return leader
                last = f"leader {leader}: replicas not current: {behind}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready in {timeout}s; last: {last}")
            time.sleep(0.1)

    @contextlib.asynccontextmanager
    async def _client(self, nc: Any) -> AsyncIterator[Any]:
        if nc is not None:
            yield nc
            return
        conn = await nats.connect(self.live_urls(), connect_timeout=2, max_reconnect_attempts=1,
                                  **self.client_options)  # fmt: skip
        try:
            yield conn
        finally:
            await conn.close()

    async def leader_of(self, stream: str, *, nc: Any = None, timeout: float = 2.0) -> str | None:
        """The host leading `stream`'s raft group (`$JS.API.STREAM.INFO` cluster.leader), or None
        while there is none. Uses `nc` or a short-lived connection to the live servers."""
        async with self._client(nc) as conn:
            try:
                msg = await conn.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
            except nats.errors.TimeoutError:
                return None  # no leader to answer (an election, or no quorum)
        info = json.loads(msg.data)
        if "error" in info:
            raise NetLabError(f"stream info {stream}: {info['error']}")
        leader = (info.get("cluster") or {}).get("leader")
        return str(leader) if leader else None

    async def move_leader(
        self, stream: str, host: str, *, nc: Any = None, timeout: float = 20.0
    ) -> None:
        """Make `host` lead `stream` (leader step-down with a preferred server, repeated until the
        stream reports `host` as its leader). Raises TimeoutError."""
        body = json.dumps({"placement": {"preferred": host}}).encode()
        deadline = time.monotonic() + timeout
        async with self._client(nc) as conn:
            while (leader := await self.leader_of(stream, nc=conn, timeout=1.0)) != host:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{host} does not lead {stream} after {timeout}s: {leader}")
                if leader is not None:
                    with contextlib.suppress(nats.errors.Error):
                        await conn.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, 2.0)
                await asyncio.sleep(0.2)

    def routed(self, host: str) -> set[str]:
        """Names of the servers `host` has a route to right now (its `/routez`)."""
        _, routez = self.monitor(host, "routez")
        return {str(r.get("remote_name") or "") for r in (routez or {}).get("routes") or []}

    def stream_state(self, host: str, stream: str) -> dict[str, Any] | None:
        """`host`'s own replica state of `stream` (messages, last_seq, ...) from its `/jsz`."""
        _, jsz = self.monitor(host, "jsz?streams=true")
        for acc in (jsz or {}).get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                if st.get("name") == stream:
                    return dict(st.get("state") or {})
        return None
