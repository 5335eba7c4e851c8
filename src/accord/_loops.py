"""The event loops an accord process can run on: asyncio's own, or uvloop (the `fast` extra),
chosen by $ACCORD_LOOP. The CLI's `--loop` sets that variable (so the node processes a command
starts inherit it); the benchmarks read it for the processes they start."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from ._errors import ConfigurationError

LOOPS = ("asyncio", "uvloop")
LOOP_ENV = "ACCORD_LOOP"


def loop_name() -> str:
    """The event loop chosen for this process: $ACCORD_LOOP, else "asyncio"."""
    return os.environ.get(LOOP_ENV, "").strip().lower() or "asyncio"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The `asyncio.Runner` loop factory of the loop `name` (None: asyncio's own). Raises
    `ConfigurationError` for an unknown name or for uvloop when it is not installed."""
    name = name.strip().lower()
    if name == "asyncio":
        return None
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigurationError(
                "event loop uvloop is not installed: pip install 'accord[fast]' "
                f"(or --loop asyncio / {LOOP_ENV}=asyncio)"
            ) from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise ConfigurationError(
        f"unknown event loop {name!r} (--loop / ${LOOP_ENV}): choose one of {', '.join(LOOPS)}"
    )


def running_loop_name() -> str:
    """Which loop runs the calling coroutine: "uvloop" or "asyncio" (what a node logs)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
