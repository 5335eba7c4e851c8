"""Trace context across processes: a W3C `traceparent` / `tracestate` in the `headers` of every
envelope a traced process sends (docs/protocol.md), and OpenTelemetry spans `send {type}` /
`process {type}` around sends and turns (`_otel.py`).

Off unless the standard `OTEL_TRACES_EXPORTER` environment variable names an exporter and the
`otel` extra is installed: then `active` is set. While it is None nothing here imports
OpenTelemetry, and call sites pay one module attribute read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("accord.trace")

Headers = dict[str, str]


class Tracing(Protocol):
    def send(
        self, agent_type: str, kind: str, agent_id: str
    ) -> contextlib.AbstractContextManager[Headers]:
        """A span `send {agent_type}` (child of the current one) for the duration of the block;
        yields the headers that carry it in the envelope."""

    def process(
        self, agent_type: str, kind: str, agent_id: str, headers: Headers | None
    ) -> contextlib.AbstractContextManager[Callable[[BaseException], None]]:
        """A span `process {agent_type}`, child of the sender's (from `headers`), current for
        the block (so sends made inside are its children); yields a function that marks the
        span failed with an exception."""

    def headers(self) -> Headers | None:
        """The current span's context as envelope headers (None outside any span)."""

    def trace_id(self) -> str | None:
        """The current trace id (32 hex digits), if any."""


active: Tracing | None = None
_exporter: str | None = None


def configure() -> Tracing | None:
    """Turn tracing on or off from `OTEL_TRACES_EXPORTER` (read on every call: each new mesh or
    node calls it). An exporter named without the `otel` extra installed is one WARNING."""
    global active, _exporter
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter in ("", "none"):
        active = None
        return None
    if exporter == _exporter and active is not None:
        return active
    try:
        from . import _otel
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=%s but OpenTelemetry is not installed "
                    "(pip install 'accord[otel]'): tracing stays off", exporter)  # fmt: skip
        active = None
        return None
    try:
        active = _otel.setup(exporter)
    except ValueError as exc:
        log.warning("tracing stays off: %s", exc)
        active = None
        return None
    _exporter = exporter
    return active


def current_trace_id() -> str | None:
    return None if active is None else active.trace_id()


def sent(agent_type: str, kind: str, agent_id: str) -> Headers | None:
    """For a send that waits for nothing (a tell, a durable message once stored): a `send`
    span that ends at once, and the headers carrying it; None when tracing is off."""
    tracing = active
    if tracing is None:
        return None
    with tracing.send(agent_type, kind, agent_id) as headers:
        return headers
