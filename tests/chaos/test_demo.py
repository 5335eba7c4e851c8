"""`accord demo` end to end, as a user runs it from the repository root: an embedded server, three
node processes, traffic, one node SIGKILLed; it exits 0 and its summary reports no agent active
twice and none lost. It runs with `--tls` (authenticated server, TLS with a generated CA): the
plain path is the one every other cluster test runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ._support import ROOT

pytestmark = pytest.mark.chaos


def test_demo_with_tls_passes_with_no_double_activation() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ACCORD_NATS"}
    env["COLUMNS"] = "200"  # one summary row per line, whatever the terminal
    done = subprocess.run(
        [sys.executable, "-m", "accord", "demo", "--tls", "--agents", "100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    summary = done.stdout[done.stdout.index("summary") :]
    doubles = re.search(r"double activations\s*│?\s*(\d+)", summary)
    lost = re.search(r"agents never answering again \(lost\)\s*│?\s*(\d+)", summary)
    assert doubles is not None and lost is not None, summary
    assert doubles.group(1) == "0", summary
    assert lost.group(1) == "0", summary
    assert "demo passed" in summary
