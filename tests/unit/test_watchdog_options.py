"""The turn watchdog's options: `turn_timeout` and `@handler(executor=...)` are validated when
the class (or handler) is defined, with one clear `ConfigurationError`."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import accord
from accord import Agent, handler


class Job(msgspec.Struct):
    n: int = 0


def test_turn_timeout_defaults_to_no_limit_and_is_inherited() -> None:
    class Plain(Agent, type="wdo-plain"):
        pass

    class Bounded(Agent, type="wdo-bounded", turn_timeout=2.5):
        pass

    class Child(Bounded, type="wdo-child"):
        pass

    assert Plain.__accord_spec__.options.turn_timeout is None
    assert Child.__accord_spec__.options.turn_timeout == 2.5


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "5", True])
def test_turn_timeout_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(accord.ConfigurationError, match="turn_timeout"):

        class Bad(Agent, type="wdo-bad", turn_timeout=bad):
            pass


def test_a_plain_def_handler_runs_in_a_thread_with_executor_thread() -> None:
    class Blocking(Agent, type="wdo-blocking"):
        @handler(executor="thread")
        def work(self, msg: Job) -> int:
            return msg.n

    spec = Blocking.__accord_spec__.by_class[Job]
    assert spec.executor == "thread"
    assert spec.name == "work"


def test_a_plain_def_handler_without_executor_is_refused() -> None:
    with pytest.raises(accord.ConfigurationError, match='executor="thread"'):

        class Sync(Agent, type="wdo-sync"):
            @handler
            def work(self, msg: Job) -> int:
                return msg.n


def test_an_async_handler_with_executor_thread_is_refused() -> None:
    with pytest.raises(accord.ConfigurationError, match="must be a plain def"):

        class Both(Agent, type="wdo-both"):
            @handler(executor="thread")
            async def work(self, msg: Job) -> int:
                return msg.n


def test_an_unknown_executor_is_refused() -> None:
    with pytest.raises(accord.ConfigurationError, match="executor must be one of"):
        handler(executor="process")
