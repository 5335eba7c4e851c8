"""Per-target circuit breakers (closed → open → half-open) for a Mesh client.

After `failures` consecutive failed calls to one target, calls fail fast with `CircuitOpen` for
`reset_after` seconds; then one trial call is let through (half-open): success closes the breaker,
failure opens it again. The clock is injected so tests need not sleep.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import msgspec

from .._errors import (
    CircuitOpen,
    DeliveryTimeout,
    NotConnected,
    OutcomeUnknown,
    Overloaded,
    RemoteError,
)
from .._observe import Observers


class BreakerSettings(msgspec.Struct, frozen=True, kw_only=True):
    failures: int = 5
    """Consecutive failures that open a breaker."""
    reset_after: float = 5.0
    """Seconds an open breaker refuses calls before letting one trial through."""
    max_targets: int = 10_000
    """Breakers kept (least recently used are forgotten)."""


class _Breaker:
    __slots__ = ("failures", "opened_at", "trial")

    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False


class CircuitBreakers:
    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        observe: Observers | None = None,
    ) -> None:
        self._observe = observe or Observers()
        self.settings = settings
        self._clock = clock
        self._by_target: OrderedDict[str, _Breaker] = OrderedDict()

    def state(self, target: str) -> str:
        b = self._by_target.get(target)
        if b is None or b.opened_at is None:
            return "closed"
        if self._clock() - b.opened_at >= self.settings.reset_after:
            return "half_open"
        return "open"

    def before(self, target: str) -> None:
        """Raise CircuitOpen if `target`'s breaker refuses the call."""
        b = self._by_target.get(target)
        if b is None or b.opened_at is None:
            return
        self._by_target.move_to_end(target)
        if self._clock() - b.opened_at < self.settings.reset_after or b.trial:
            raise CircuitOpen(
                f"circuit to {target} is open after {b.failures} consecutive failures"
            )
        b.trial = True  # half-open: exactly one trial call goes through

    @contextlib.contextmanager
    def guard(self, target: str) -> Iterator[None]:
        """Around one call to `target`: refuse it while open (`CircuitOpen`); count a failure
        when it ends with one that says the target is in trouble, a success otherwise."""
        self.before(target)
        try:
            yield
        except (DeliveryTimeout, NotConnected, Overloaded, OutcomeUnknown, RemoteError):
            self.failure(target)
            raise
        self.success(target)

    def success(self, target: str) -> None:
        b = self._by_target.pop(target, None)
        if b is not None and b.opened_at is not None and self._observe.active:
            self._observe.breaker_changed(_type_of(target), False)

    def failure(self, target: str) -> None:
        b = self._by_target.get(target)
        if b is None:
            b = self._by_target[target] = _Breaker()
            if len(self._by_target) > self.settings.max_targets:
                old, forgotten = self._by_target.popitem(last=False)
                if forgotten.opened_at is not None and self._observe.active:
                    self._observe.breaker_changed(_type_of(old), False)
        b.failures += 1
        b.trial = False
        if b.failures >= self.settings.failures:
            if b.opened_at is None and self._observe.active:
                self._observe.breaker_changed(_type_of(target), True)
            b.opened_at = self._clock()


def _type_of(target: str) -> str:
    """The agent type of a breaker's target (`type/key`): labels never carry keys."""
    return target.split("/", 1)[0]
