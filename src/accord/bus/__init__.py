"""accord's event bus: durable topics with consumer groups, on JetStream or on Redis Streams."""

from ._api import BusDeadLetter as BusDeadLetter
from ._api import BusUnavailable as BusUnavailable
from ._api import Delivery as Delivery
from ._api import GroupStats as GroupStats
from ._api import PublishAck as PublishAck
from ._api import PublishUnconfirmed as PublishUnconfirmed
from ._bus import Bus as Bus
from ._bus import Subscription as Subscription
from ._bus import connect as connect
from ._workflows import workflow_events as workflow_events

__all__ = [
    "Bus",
    "BusDeadLetter",
    "BusUnavailable",
    "Delivery",
    "GroupStats",
    "PublishAck",
    "PublishUnconfirmed",
    "Subscription",
    "connect",
    "workflow_events",
]
