"""Test support: an `accord dashboard` OS process on a free port, its URL read from its first
line of output, stopped by PID (SIGTERM, SIGKILL after 10 s) when the block ends."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def dashboard_process(nats_url: str, cluster: str, *args: str) -> Iterator[str]:
    """Run `accord dashboard --port 0` and yield its base URL (http://127.0.0.1:PORT)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord", "dashboard", "--port", "0", "--nats", nats_url,
         "--cluster", cluster, "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90  # generous: a loaded 2-core CI machine starts slowly
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                break
        found = re.search(r"http://[\w.\[\]:]+", line)
        assert found, f"dashboard did not start: {line!r} {proc.poll()}"
        yield found.group(0)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    """(status, decoded JSON body) of one request; HTTP errors are returned, not raised."""
    import json

    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
