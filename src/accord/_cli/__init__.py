"""The `accord` command line: run clusters and nodes, talk to agents, inspect the cluster, deploy
services. Each module registers its commands on the one typer app of `_common`."""

from __future__ import annotations

import sys

import msgspec

from . import (
    _agents,
    _bus,
    _inspect,
    _observe,
    _processes,
    _security,
    _services,
    _topology,
    _workflows,
)  # fmt: skip
from ._common import add_connection_options, app, print_error

add_connection_options(app)  # every command registered above: --creds etc. after it too

__all__ = [
    "_agents",
    "_bus",
    "_inspect",
    "_observe",
    "_processes",
    "_security",
    "_services",
    "_topology",
    "_workflows",
    "app",
    "main",
]


def main() -> None:
    try:
        app()
    except msgspec.MsgspecError as exc:  # defensive: never show a traceback
        print_error(str(exc))
        sys.exit(1)
