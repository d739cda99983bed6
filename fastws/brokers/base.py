"""The small async interface every backplane implements.

A broker owns the numbering of publications: it gives each one the next
``seq`` of its channel, keeps the channel's ``epoch``, and hands every
publication of a channel that this node listens to back to the node through
the ``deliver`` callback, already encoded as the frame payload that
subscribers receive. The node then frames it once for all of its local
subscribers. The node tells the broker which channels it listens to with
``subscribe``/``unsubscribe`` (the first local subscriber and the last one),
so that a networked broker keeps one subscription per channel per node.

A broker also keeps presence (who is subscribed to a channel, on every
node) and carries join and leave messages, which reach subscribers like
publications but have no seq and are not kept.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastws.protocol import Position

# (channel, epoch, seq, payload): seq is 0 (and the epoch meaningless) for a
# message that is not a publication.
Deliver = Callable[[str, str, int, bytes], None]


class Unavailable(ConnectionError):
    """The backplane cannot be reached right now; the same call may work later.

    Commands that meet it are answered with the ``unavailable`` error, and
    the connection stays open.
    """


@dataclass(frozen=True, slots=True)
class Stored:
    """One publication kept in a channel's history, only as subscribers receive it.

    The history op splices these payloads into its reply, so the data is
    not kept a second time as Python objects.
    """

    seq: int
    payload: bytes


class Calls:
    """Where a broker reports its calls to the backplane: how long each took, which failed.

    ``operation`` names the call (``publish``, ``history``...). This default
    forgets everything; a node's metrics (fastws.metrics) put their own in
    ``Broker.calls``. A broker that does not wait on a network (the memory
    one) reports nothing.
    """

    def took(self, operation: str, seconds: float) -> None:
        """A call completed in ``seconds``."""

    def failed(self, operation: str) -> None:
        """A call failed: the backplane was unreachable, or answered with an error."""


class Broker(ABC):
    """Numbering, storage and transport of publications between nodes."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._resync: Callable[[], None] | None = None
        self._node: tuple[str, Callable[[], dict[str, Any]]] | None = None
        self.calls = Calls()

    def attach(self, deliver: Deliver, resync: Callable[[], None] | None = None) -> None:
        """Set where this node's publications go; called once by the App.

        ``resync`` is called when the broker may have missed publications of
        the channels it listens to (it lost and regained its connection), so
        that the node checks each channel's position against the broker.
        """
        self._deliver = deliver
        self._resync = resync

    async def start(self) -> None:  # noqa: B027 (a broker with nothing to connect keeps it)
        """Connect; called before the node accepts clients."""

    async def stop(self) -> None:  # noqa: B027
        """Disconnect; called after the last client has gone."""

    async def register(self, node: str, info: Callable[[], dict[str, Any]]) -> None:
        """Enter this node in the deployment's registry, as ``info()`` describes it.

        A broker shared by nodes keeps the entry fresh (calling ``info``
        again each time) until :meth:`stop`, and forgets it soon after a
        node dies. A single-node broker knows only this node.
        """
        self._node = (node, info)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Every live node of the deployment: its id to its latest info."""
        return self.known_nodes

    @property
    def known_nodes(self) -> dict[str, dict[str, Any]]:
        """The live nodes as last read, without waiting (for ``/info``)."""
        if self._node is None:
            return {}
        node, info = self._node
        return {node: info()}

    def kept(self) -> tuple[int, int]:
        """(channels with a history, publications kept in them), for /metrics.

        Answered without waiting: a networked broker gives its latest
        sample, of the channels this node listens to.
        """
        return 0, 0

    # Whether calls may wait on the network, in a client that needs a task
    # to run in (asyncio.timeout); the node then runs broker calls in tasks.
    waits = True

    # Whether publish_soon() exists: publications started one after another
    # without waiting for each seq are numbered in that order. A client's
    # pub commands are then pipelined instead of waiting one by one.
    pipelines = False

    def publish_soon(self, channel: str, data: Any) -> asyncio.Future[int]:
        """Start publishing data now; the future is its seq. Only where ``pipelines``.

        Raises at once (before any seq is taken) for data that cannot be
        encoded.
        """
        raise NotImplementedError(f"{type(self).__name__} does not pipeline publications")

    @property
    def ready(self) -> bool:
        """Whether publishing and subscribing work right now (for /readyz)."""
        return True

    @abstractmethod
    async def publish(self, channel: str, data: Any) -> int:
        """Number data as the channel's next publication, deliver it, return its seq."""

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving the channel's publications on this node."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving the channel's publications on this node."""

    @abstractmethod
    async def position(self, channel: str) -> Position:
        """The channel's epoch and the seq of its last publication (0 if none)."""

    async def restart(self, channel: str, epoch: str) -> Position:
        """Give channel a new epoch if it is still in ``epoch``; its position after.

        For a channel whose seq went back within one epoch: a failover to a
        replica that had not yet received the last publications. Those seqs
        would be reused for other publications, so whoever holds a position
        in the old epoch must be told that it is gone. A broker whose seqs
        never go back keeps the default, which changes nothing.
        """
        return await self.position(channel)

    @abstractmethod
    async def history(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> tuple[Position, list[Stored] | None]:
        """The channel's position and its publications after ``since``, oldest first.

        Without ``since``: the last ``limit`` publications kept (all without
        a limit). With it: every publication after ``since.seq``, or None
        when that cannot be served whole (another epoch, a position the
        history no longer reaches back to, or one past the channel's end);
        a caller is never handed a gap.
        """

    @abstractmethod
    async def announce(self, channel: str, payload: bytes) -> None:
        """Deliver a message that is not a publication (join, leave) on every node."""

    @abstractmethod
    async def add_presence(self, channel: str, client: str, info: dict[str, Any]) -> None:
        """Record that client is subscribed to channel, with what others may see of it."""

    @abstractmethod
    async def remove_presence(self, channel: str, client: str) -> None:
        """Forget client's presence in channel (it left or disconnected)."""

    @abstractmethod
    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Every client present in channel, on every node: client id to info."""
