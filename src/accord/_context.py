"""Per-turn context carried implicitly through nested calls: the caller's deadline and identity.

Deadlines are absolute times on this process's event-loop clock; they cross the wire as a remaining
duration (`timeout_ms`), so two machines' clocks are never compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from ._errors import ConfigurationError

current_deadline: ContextVar[float | None] = ContextVar("accord_deadline", default=None)
current_sender: ContextVar[str | None] = ContextVar("accord_sender", default=None)
publishing: ContextVar[bool] = ContextVar("accord_publishing", default=False)
"""Set while `Mesh.publish` sends its tells: they carry the `publish` kind (`_observe.py`)."""


@contextlib.contextmanager
def publishes() -> Iterator[None]:
    """Tells sent in this block (in this task) are those of a publish."""
    token = publishing.set(True)
    try:
        yield
    finally:
        publishing.reset(token)


DEFAULT_TIMEOUT = 10.0


def deadline_after(now: float, timeout: float | None) -> float:
    """The deadline of a call made at `now` with `timeout` (None: the default), never later
    than the deadline of the handler the call is made from."""
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"timeout must be > 0, got {timeout}")
    deadline = now + (DEFAULT_TIMEOUT if timeout is None else timeout)
    inherited = current_deadline.get()
    return deadline if inherited is None else min(deadline, inherited)
