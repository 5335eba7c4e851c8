"""The event-loop choice of the CLI (`--loop`, $ACCORD_LOOP): which loop `_run` starts, and bad
input (an unknown name, uvloop not installed) as one clear error with exit code 2."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys

import pytest
import typer
import uvloop

from accord._cli import _common
from accord._cli._common import use_loop
from accord._errors import ConfigurationError
from accord._loops import LOOP_ENV, loop_factory, loop_name, running_loop_name


def test_asyncio_is_the_default_and_uvloop_is_its_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop_name() == "asyncio"
    assert loop_factory("asyncio") is None
    assert loop_factory(" UVLoop ") is uvloop.new_event_loop


def test_an_unknown_loop_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown event loop 'trio'.*asyncio, uvloop"):
        loop_factory("trio")


def test_uvloop_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'accord\[fast\]'"):
        loop_factory("uvloop")


@pytest.mark.parametrize("chosen", ["asyncio", "uvloop", ""])
def test_run_starts_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, chosen: str) -> None:
    monkeypatch.setenv(LOOP_ENV, chosen)

    async def which() -> str:
        return running_loop_name()

    assert _common._run(which()) == (chosen or "asyncio")


def test_run_on_an_unknown_loop_exits_2_with_one_line_and_never_starts_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LOOP_ENV, "tokio")
    ran = []

    async def command() -> None:
        ran.append(True)

    coro = command()
    with pytest.raises(typer.Exit) as exc:
        _common._run(coro)
    assert exc.value.exit_code == 2
    assert ran == []
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # no "never awaited" warning
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: unknown event loop 'tokio' (--loop / $ACCORD_LOOP): choose one of "
                     "asyncio, uvloop"]  # fmt: skip


def test_use_loop_sets_the_environment_for_started_nodes_and_refuses_bad_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(LOOP_ENV, "asyncio")  # recorded, so the test's use_loop is undone after
    monkeypatch.delenv(LOOP_ENV)
    use_loop(None)
    assert LOOP_ENV not in os.environ
    use_loop("UVLOOP")
    assert loop_name() == "uvloop"
    with pytest.raises(typer.Exit) as exc:
        use_loop("gevent")
    assert exc.value.exit_code == 2
    assert loop_name() == "uvloop"  # a refused name changes nothing


def test_running_loop_name_tells_the_loops_apart() -> None:
    async def which() -> str:
        return running_loop_name()

    assert asyncio.run(which()) == "asyncio"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(which()) == "uvloop"


def test_the_missing_uvloop_error_keeps_its_brackets_on_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Printed, the hint still says `accord[fast]`: square brackets in an error are text, not
    rich markup (which would swallow `[fast]`)."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(typer.Exit) as exc:
        use_loop("uvloop")
    assert exc.value.exit_code == 2
    assert "pip install 'accord[fast]'" in capsys.readouterr().err
