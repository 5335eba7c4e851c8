"""A network lab for fault tests: real nats-servers in Linux network namespaces, with partitions.

Layout of one lab (every name carries the run id `<prefix>-<pid>-<seq>`, so runs never collide)::

    root ns (your test process)  nl<pid>x<seq> 10.213.S.254 --+
    <id>-h1   eth0 10.213.S.1 --------------------------------+-- <id>-sw: bridge br0
    <id>-h2   eth0 10.213.S.2 --------------------------------+   (a "switch" namespace)
    ...

The bridge lives in its own namespace; the only thing the lab adds to the root namespace is the
client port (one veth end with an address of the lab's subnet), so the test process reaches every
server directly. Partitions are nftables rules inside the host namespaces; the client address is
never blocked unless `isolate_client_from(host)` is called. `slow()` shapes a host's link with
`tc tbf` in both directions. Requires root and the `ip` (iproute2), `nft` (nftables) and `tc`
commands. Example::

    with NetLab("mytest", hosts=3) as lab, NatsCluster(lab) as nats:
        nats.wait_ready()
        lab.partition([{"h1"}, {"h2", "h3"}])
        ...
        lab.heal()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
import nats.errors

from .._errors import EngineError
from ..engine._server import _die_with_parent, find_nats_server

_SUBNET = "10.213"  # labs use 10.213.S.0/24, S picked free under a lock
_LOCK_FILE = "/run/accord-netlab.lock"
_seq = itertools.count()


class NetLabError(EngineError):
    """A lab command failed (not root, a missing tool, a bad host name, ...)."""


def _sh(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGCONT + SIGTERM, SIGKILL after `grace` seconds; always reaps the process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _sh(["ip", "netns", "list"]).splitlines() if line.strip()]


def _delete_namespace(ns: str) -> None:
    """Kill every process left in `ns` (by PID) then delete it."""
    for pid in _sh(["ip", "netns", "pids", ns], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _sh(["ip", "netns", "del", ns], check=False)


class NetLab:
    """A switch namespace with a bridge, `hosts` namespaces h1..hN on it, and a root client port."""

    def __init__(self, name_prefix: str = "accord", hosts: int = 3, *, client: bool = True) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", name_prefix):
            raise NetLabError(f"bad name prefix {name_prefix!r} (use [A-Za-z0-9_.], max 32)")
        if not 1 <= hosts <= 250:
            raise NetLabError("hosts must be within 1..250")
        seq = next(_seq)
        self.prefix = name_prefix
        self.id = f"{name_prefix}-{os.getpid()}-{seq}"
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.switch_ns = f"{self.id}-sw"
        self.client_if = f"nl{os.getpid():x}x{seq}"[:15] if client else None
        self.subnet = ""  # "10.213.S", set by start()
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._groups: list[set[str]] = []
        self._isolated: set[str] = set()

    # -- addressing ---------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        """The namespace name of `host` (for `ip netns exec`)."""
        self._check(host)
        return f"{self.id}-{host}"

    def ip(self, host: str) -> str:
        self._check(host)
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def client_ip(self) -> str | None:
        return f"{self.subnet}.254" if self.client_if else None

    def _check(self, host: str) -> None:
        if host not in self.hosts:
            raise NetLabError(f"unknown host {host!r}; hosts are {self.hosts}")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> NetLab:
        try:
            with open(_LOCK_FILE, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # subnet choice + client address are atomic
                self.subnet = self._free_subnet()
                self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _free_subnet(self) -> str:
        used = _sh(["ip", "-4", "-o", "addr", "show"]) + _sh(["ip", "-4", "route", "show"])
        taken = {int(m) for m in re.findall(rf"\b{re.escape(_SUBNET)}\.(\d+)\.", used)}
        for s in range(1, 255):
            if s not in taken:
                return f"{_SUBNET}.{s}"
        raise NetLabError(f"no free {_SUBNET}.x.0/24 subnet left")

    def _build(self) -> None:
        sw = self.switch_ns
        for ns in [sw, *(self.ns(h) for h in self.hosts)]:
            _sh(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        for h in self.hosts:
            hns = self.ns(h)
            _sh(["ip", "-n", sw, "link", "add", h, "type", "veth", "peer", "name", "eth0",
                 "netns", hns])  # fmt: skip
            _sh(["ip", "-n", sw, "link", "set", h, "master", "br0", "up"])
            _sh(["ip", "-n", hns, "addr", "add", f"{self.ip(h)}/24", "dev", "eth0"])
            _sh(["ip", "-n", hns, "link", "set", "eth0", "up"])
        if self.client_if:
            _sh(["ip", "link", "add", self.client_if, "type", "veth", "peer", "name", "client",
                 "netns", sw])  # fmt: skip
            _sh(["ip", "-n", sw, "link", "set", "client", "master", "br0", "up"])
            _sh(["ip", "addr", "add", f"{self.client_ip}/24", "dev", self.client_if])
            _sh(["ip", "link", "set", self.client_if, "up"])

    def close(self, grace: float = 5.0) -> None:
        """Stop every process started by `run` (by PID), then delete the client port and all
        namespaces. Safe to call twice and after a failed `start`."""
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                stop_process(proc, grace)
        if self.client_if and self.subnet:
            _sh(["ip", "link", "del", self.client_if], check=False)  # deletes its peer too
        namespaces, self._namespaces = self._namespaces, []
        for ns in reversed(namespaces):
            with contextlib.suppress(Exception):
                _delete_namespace(ns)

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def cleanup_stale(name_prefix: str) -> list[str]:
        """Delete namespaces `<name_prefix>-<pid>-*` whose creating process `pid` is dead (and
        kill processes still inside them). Returns the deleted names."""
        pat = re.compile(rf"{re.escape(name_prefix)}-(\d+)-(\d+)-(?:sw|h\d+)")
        gone = []
        for ns in list_namespaces():
            m = pat.fullmatch(ns)
            if m and not Path(f"/proc/{m[1]}").exists():  # its creator is dead
                _delete_namespace(ns)
                gone.append(ns)
                if ns.endswith("-sw"):  # its client port, if any (gone soon anyway with the ns)
                    _sh(["ip", "link", "del", f"nl{int(m[1]):x}x{m[2]}"], check=False)
        return gone

    # -- processes ----------------------------------------------------------------------------
    def run(
        self, host: str, argv: Sequence[str], *, die_with_parent: bool = True, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `host`'s namespace; `close()` stops it by PID. `ip netns exec`
        execs the command, so the returned PID is the command's own. With `die_with_parent` the
        child gets PR_SET_PDEATHSIG (it dies with the thread that started it)."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        if die_with_parent:
            popen_kwargs.setdefault("preexec_fn", _die_with_parent)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv], **popen_kwargs
        )
        self._procs = [p for p in self._procs if p.poll() is None] + [proc]
        return proc

    # -- faults -------------------------------------------------------------------------------
    def partition(self, groups: Sequence[Iterable[str]]) -> None:
        """Drop all traffic between hosts of different groups (both directions). Hosts listed in
        no group form one more group. Replaces any earlier partition; client isolation stays."""
        gs = [set(g) for g in groups]
        listed = [h for g in gs for h in g]
        for h in listed:
            self._check(h)
        if len(listed) != len(set(listed)):
            raise NetLabError(f"groups overlap: {groups}")
        rest = set(self.hosts) - set(listed)
        self._groups = [g for g in [*gs, rest] if g]
        self._apply()

    def isolate_client_from(self, host: str) -> None:
        """Also drop traffic between the root-namespace client port and `host`."""
        self._check(host)
        if not self.client_if:
            raise NetLabError("this lab has no client port")
        self._isolated.add(host)
        self._apply()

    def heal(self) -> None:
        """Remove every partition and client isolation rule (`slow` shaping stays)."""
        self._groups, self._isolated = [], set()
        self._apply()

    def _apply(self) -> None:
        if shutil.which("nft") is None:
            raise NetLabError("partitions need the 'nft' command (apt-get install nftables)")
        group_of = {h: i for i, g in enumerate(self._groups) for h in g}
        for h in self.hosts:
            blocked = [self.ip(o) for o in self.hosts if o in group_of and h in group_of
                       and group_of[o] != group_of[h]]  # fmt: skip
            if h in self._isolated and self.client_ip:
                blocked.append(self.client_ip)
            script = "table inet netlab\ndelete table inet netlab\n"
            if blocked:
                addrs = ", ".join(blocked)
                script += (
                    "table inet netlab {\n"
                    " chain input { type filter hook input priority -10; policy accept;"
                    f" ip saddr {{ {addrs} }} drop; }}\n"
                    " chain output { type filter hook output priority -10; policy accept;"
                    f" ip daddr {{ {addrs} }} drop; }}\n"
                    "}\n"
                )
            _sh(["ip", "netns", "exec", self.ns(h), "nft", "-f", "-"], stdin=script)

    def slow(self, host: str, rate: str | None = "1mbit", *, burst: str = "32kbit",
             latency: str = "400ms") -> None:  # fmt: skip
        """Limit `host`'s link to `rate` in both directions with `tc tbf`; `rate=None` removes
        the limit. Raise `burst` for high rates (it must hold at least rate/HZ)."""
        shape = ["tbf", "rate", rate, "burst", burst, "latency", latency] if rate else []
        for ns, dev in ((self.ns(host), "eth0"), (self.switch_ns, host)):
            op = "replace" if rate else "del"
            _sh(["ip", "netns", "exec", ns, "tc", "qdisc", op, "dev", dev, "root", *shape],
                check=bool(rate))  # fmt: skip


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
