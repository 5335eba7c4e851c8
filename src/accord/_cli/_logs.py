"""Logging of the long-running commands: `--log-format text` (human lines) or `json` (one JSON
object per line: time, level, node, logger, message, and the agent id and trace id when the line
was written inside a turn or a traced call), for log shippers to index without parsing."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Annotated, Literal

import typer

from .._context import current_sender
from .._errors import ConfigurationError
from .._trace import current_trace_id

LogFormat = Literal["text", "json"]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="text, or json: one JSON object per line.")
]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One line per record. `node` is set by the command once the node's name is known."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "node": self.node,
            "logger": record.name,
            "message": record.getMessage(),
        }
        agent = current_sender.get()
        if agent:
            line["agent"] = agent
        trace_id = current_trace_id()
        if trace_id:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)  # a JSON string: still one line
        return json.dumps(line, default=str)


def setup_logging(level: str, fmt: str = "text") -> JsonFormatter | None:
    """Configure the root logger on stderr; returns the JSON formatter (to name the node)."""
    if fmt not in ("text", "json"):
        raise ConfigurationError(f"--log-format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return formatter if isinstance(formatter, JsonFormatter) else None


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def setup_or_exit(level: str, fmt: str) -> JsonFormatter | None:
    """`setup_logging` for a command: a bad format is one error line and exit code 2."""
    try:
        return setup_logging(level, fmt)
    except ConfigurationError as exc:
        from ._common import print_error

        print_error(str(exc))
        raise typer.Exit(2) from None
