"""Seeing a cluster: one snapshot gathered from NATS (`Observer`), shared by `accord top` and the
`accord dashboard` web server."""

from ._poller import Poller
from ._snapshot import Observer

__all__ = ["Observer", "Poller"]
