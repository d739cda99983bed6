"""The Python client of a fastws node: channels that survive disconnects.

::

    import fastws.client

    async with fastws.client.connect("ws://localhost:8080/ws") as client:
        sub = await client.subscribe("chat:1")
        seq = await client.publish("chat:1", {"text": "hi"})
        async for item in sub:
            if isinstance(item, fastws.client.Reset):
                ...  # publications were missed: refetch the state
            else:
                print(item.seq, item.data)

The client reconnects by itself (exponential backoff, full jitter), finds
dead connections by heartbeat, resubscribes each channel from the last
publication it delivered, and hands the application every publication
once, in order, or a :class:`Reset` where the node's history could not
cover the outage. Publishes are at-least-once. docs/client.md has the
details and the exact guarantee.

It is not imported by ``import fastws``: the server does not need it.
"""

from fastws.client._backoff import backoff_delay
from fastws.client._client import Client, History, connect
from fastws.client._errors import ClientClosed, ClientError, CommandError, Rejected
from fastws.client._subscription import Item, Publication, Reset, Subscription

__all__ = [
    "Client",
    "ClientClosed",
    "ClientError",
    "CommandError",
    "History",
    "Item",
    "Publication",
    "Rejected",
    "Reset",
    "Subscription",
    "backoff_delay",
    "connect",
]
