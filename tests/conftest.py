"""Shared fixtures: a real embedded nats-server per test module, stopped by PID afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from accord import EmbeddedServer
from accord.testing import Cluster


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    server = EmbeddedServer()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def fresh_nats_url() -> Iterator[str]:
    """A server of the test's own, for tests that need an empty cluster."""
    server = EmbeddedServer()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`): a module's tests stay on one worker (they share its
    module-scoped server or cluster), and the network-namespace lab tests, which each run a
    3-server NATS cluster, run one at a time so two of them never compete for the 2 cores.

    `tryfirst`: xdist's worker turns these marks into node-id suffixes in its own
    `pytest_collection_modifyitems`, and this root conftest registers before it, so it would run
    after xdist and the marks would count for nothing (every module split across both workers).
    """
    for item in items:
        group = "netlab" if item.get_closest_marker("netlab") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """A failing test that used a `Cluster` gets each node's process state and log tail in its
    report: a node that never joined or died says why there, not only in a deleted temp dir."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster):
                report.sections.append(("accord nodes", value.describe()))
