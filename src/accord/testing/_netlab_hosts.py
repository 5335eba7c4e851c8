"""`NetLab`: the lab's network namespaces, bridge, partitions and link shaping (see `netlab`)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .._errors import EngineError
from ..engine._server import _die_with_parent

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
