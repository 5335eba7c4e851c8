"""Fire-and-forget tasks, kept referenced, logged on failure and cancelled on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

log = logging.getLogger("accord")


class Background:
    """A set of fire-and-forget tasks. A failure is logged: as one WARNING line when it is one of
    the `expected` kinds (a send while disconnected, say), else as an error with its traceback."""

    def __init__(self, expected: tuple[type[BaseException], ...] = ()) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expected = expected

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, self._expected):
            log.warning("background task %s failed: %s", task.get_name(), exc)
        else:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the tasks running now to finish (e.g. the replies of
        the last turns, before the connection closes)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks))
        self._tasks.clear()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], retry_every: float = 0.1) -> None:
    """Cancel `tasks` and return once every one has finished.

    A task still running `retry_every` seconds after its cancellation is cancelled again: on
    Python 3.11, `asyncio.wait_for` returns the inner result instead of raising when the
    cancellation races with that result arriving (CPython gh-86296), so a loop around it (a KV
    watch fed several times a second) can swallow a single `cancel()` and never stop.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)
    for t in tasks:  # retrieve outcomes so none is reported as never retrieved
        if not t.cancelled():
            with contextlib.suppress(Exception):
                t.exception()
