"""Writes a turn hands to its commit: requests outside the agent's state (a workflow's run index
entry) sent together with the turn's event append and state write (`Durable.commit`), instead of
one round trip before them. Kept apart from `_durable.py` so that upper layers need not import it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

WITH_COMMIT = "_accord_with_commit"
"""The agent attribute that holds the writes registered in the current turn."""


def with_commit(agent: Any, write: Callable[[], Awaitable[None]]) -> None:
    """In a turn of a durable agent: run `write()` concurrently with the turn's commit (its
    event append and state write), so that their requests go out together. The turn answers
    only once `write` returned; `write` raising fails the commit (the activation ends, as when
    an append fails: the append may be stored). A turn that fails before its commit drops it
    unrun. For writes whose order against the append does not matter."""
    agent.__dict__.setdefault(WITH_COMMIT, []).append(write)
