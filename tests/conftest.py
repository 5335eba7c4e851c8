"""Shared fixtures: a real embedded nats-server per test module, stopped by PID afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from accord import EmbeddedServer


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
