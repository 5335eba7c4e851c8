"""Circuit breaker state machine with a fake clock: closed → open → half-open → closed/open."""

from __future__ import annotations

import pytest

import accord
from accord.delivery._breaker import CircuitBreakers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_half_opens_after_reset() -> None:
    clock = Clock()
    b = CircuitBreakers(accord.BreakerSettings(failures=3, reset_after=5.0), clock)
    for _ in range(2):
        b.before("t")
        b.failure("t")
    assert b.state("t") == "closed"
    b.before("t")
    b.failure("t")
    assert b.state("t") == "open"
    with pytest.raises(accord.CircuitOpen):
        b.before("t")
    assert b.state("other") == "closed"  # breakers are per target
    b.before("other")

    clock.now = 5.0
    assert b.state("t") == "half_open"
    b.before("t")  # exactly one trial goes through
    with pytest.raises(accord.CircuitOpen):
        b.before("t")
    b.success("t")
    assert b.state("t") == "closed"
    b.before("t")


def test_a_failed_trial_reopens_the_breaker() -> None:
    clock = Clock()
    b = CircuitBreakers(accord.BreakerSettings(failures=1, reset_after=2.0), clock)
    b.failure("t")
    clock.now = 2.5
    b.before("t")
    b.failure("t")
    assert b.state("t") == "open"
    clock.now = 3.0
    with pytest.raises(accord.CircuitOpen):
        b.before("t")


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreakers(accord.BreakerSettings(failures=2), Clock())
    b.failure("t")
    b.success("t")
    b.failure("t")
    assert b.state("t") == "closed"


def test_least_recently_used_breakers_are_forgotten() -> None:
    b = CircuitBreakers(accord.BreakerSettings(failures=1, max_targets=2), Clock())
    for t in ("a", "b", "c"):
        b.failure(t)
    assert b.state("a") == "closed" and b.state("c") == "open"
