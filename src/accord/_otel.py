"""OpenTelemetry behind `_trace.py` (imported only once tracing is on): spans with the messaging
attributes, W3C trace-context propagation, and the exporters named by `OTEL_TRACES_EXPORTER`
(`otlp` if its package is installed, `console`, or `jsonl`: one JSON object per span appended to
the file `ACCORD_TRACES_FILE`, for tests and machines without a collector)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_KIND_ATTR = "accord.message.kind"


class OtelTracing:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    @contextlib.contextmanager
    def send(self, agent_type: str, kind: str, agent_id: str) -> Iterator[dict[str, str]]:
        with self._tracer.start_as_current_span(
            f"send {agent_type}",
            kind=SpanKind.PRODUCER,
            attributes=_attributes("send", agent_type, kind, agent_id),
        ):
            headers: dict[str, str] = {}
            _propagator.inject(headers)
            yield headers

    @contextlib.contextmanager
    def process(
        self, agent_type: str, kind: str, agent_id: str, headers: dict[str, str] | None
    ) -> Iterator[Callable[[BaseException], None]]:
        parent = _propagator.extract(headers) if headers else None
        with self._tracer.start_as_current_span(
            f"process {agent_type}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=_attributes("process", agent_type, kind, agent_id),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            def fail(exc: BaseException) -> None:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

            yield fail

    def headers(self) -> dict[str, str] | None:
        headers: dict[str, str] = {}
        _propagator.inject(headers)
        return headers or None

    def trace_id(self) -> str | None:
        ctx = trace.get_current_span().get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _attributes(operation: str, agent_type: str, kind: str, agent_id: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.template": "accord.{cluster}.shard.{shard}",
        "messaging.destination.name": agent_type,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        _KIND_ATTR: kind,
        "accord.agent_type": agent_type,
        "accord.agent_id": agent_id,
    }


def setup(exporter: str) -> OtelTracing:
    """Use the application's tracer provider if it set one; else make one exporting with
    `exporter` (ValueError for an exporter that is unknown or not installed)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        own = TracerProvider()  # resource from OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if exporter == "jsonl":
            path = os.environ.get("ACCORD_TRACES_FILE")
            if not path:
                raise ValueError("OTEL_TRACES_EXPORTER=jsonl needs ACCORD_TRACES_FILE")
            own.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
        elif exporter == "console":
            own.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            own.add_span_processor(BatchSpanProcessor(_otlp()))
        else:
            raise ValueError(f"unknown OTEL_TRACES_EXPORTER {exporter!r} (otlp, console, jsonl)")
        trace.set_tracer_provider(own)
        provider = trace.get_tracer_provider()
    return OtelTracing(provider.get_tracer("accord"))


def _otlp() -> SpanExporter:
    import importlib

    for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):  # fmt: skip
        try:
            exporter: SpanExporter = importlib.import_module(module).OTLPSpanExporter()
        except ImportError:
            continue
        return exporter
    raise ValueError("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp installed")


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span to `path` (several processes may share it:
    each line is one write in append mode)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_span_json(s), default=str) + "\n" for s in spans)
        with self._lock, open(self._path, "a", encoding="utf-8") as f:
            f.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _span_json(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "service": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
    }
