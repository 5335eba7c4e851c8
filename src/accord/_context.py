"""Per-turn context carried implicitly through nested calls: the caller's deadline and identity.

Deadlines are absolute times on this process's event-loop clock; they cross the wire as a remaining
duration (`timeout_ms`), so two machines' clocks are never compared.
"""

from __future__ import annotations

from contextvars import ContextVar

current_deadline: ContextVar[float | None] = ContextVar("accord_deadline", default=None)
current_sender: ContextVar[str | None] = ContextVar("accord_sender", default=None)
