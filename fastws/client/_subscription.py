"""One channel's stream as the application sees it: each publication once, in order.

A :class:`Subscription` outlives the connections under it. It remembers the
position (epoch, seq) of the last publication it put in its buffer, which
is what the client asks the node to resume from after a reconnect; it
drops anything at or before that position, so a publication is handed over
once even if a node replays it twice; and when the node cannot resume (the
history no longer reaches back, or the channel has a new epoch) it says so
with a :class:`Reset` item rather than leaving a silent gap.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from fastws.client._errors import ClientClosed

if TYPE_CHECKING:
    from fastws.client._client import Client


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication of the channel: its ``seq`` (1, 2, 3... per channel) and its data."""

    seq: int
    data: Any


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream could not be resumed: publications were missed, and it goes on from here.

    Publications of the channel up to ``seq`` of ``epoch`` were not, and
    will not be, delivered; the application should refetch its state (for
    example from its own database, or with ``client.history``), then go on
    reading: the next item is publication ``seq + 1`` of ``epoch``.
    """

    epoch: str
    seq: int


Item = Publication | Reset


class _End:
    """Queued after the last item: iteration stops, or raises ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Received(Enum):
    """What :meth:`Subscription.receive` made of a publication."""

    DELIVERED = "delivered"
    DROPPED = "dropped"  # a duplicate, or from before this connection's sub reply
    GAP = "gap"  # seq skipped ahead: the stream must be resumed


class Subscription:
    """A subscription to one channel; iterate it with ``async for``.

    Items are :class:`Publication` and :class:`Reset`. Iteration ends when
    the subscription is unsubscribed or the client is closed, after the
    items already buffered; it raises :class:`~fastws.client.Rejected` or
    :class:`~fastws.client.CommandError` when the node refused the client
    or, on a resubscription, the channel.

    The buffer is an unbounded queue. A bounded one would have to either
    drop publications, which breaks the guarantee this class exists for,
    or stop reading the socket, which stalls every other subscription and
    command of the client until the node cuts it off as a slow consumer.
    An application that falls behind for good grows memory instead; watch
    :attr:`buffered`.
    """

    def __init__(self, client: Client, channel: str) -> None:
        self.channel = channel
        self._client = client
        self._queue: asyncio.Queue[Item | _End] = asyncio.Queue()
        self._epoch: str | None = None
        self._seq = 0
        # False from the moment a sub is (re)sent until its reply arrives on
        # the current connection; publications meanwhile are dropped.
        self._live = False
        self._ended = False
        self._confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} at {self.position}>"

    @property
    def position(self) -> tuple[str, int] | None:
        """(epoch, seq) of the last item put in the buffer; None before the first sub reply."""
        return None if self._epoch is None else (self._epoch, self._seq)

    @property
    def buffered(self) -> int:
        """Items received and not yet taken by the application."""
        return self._queue.qsize() - (1 if self._ended else 0)

    @property
    def active(self) -> bool:
        """True until unsubscribed or ended by the client."""
        return not self._ended

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # every later call ends the same way
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def get(self) -> Item:
        """The next item; like ``anext(sub)``, for code that reads one item at a time."""
        return await self.__anext__()

    async def unsubscribe(self) -> None:
        """Leave the channel. Items already buffered are still iterated, then iteration ends."""
        await self._client._unsubscribe(self)

    # The client's side.

    def since(self) -> dict[str, Any] | None:
        """The ``since`` of the next sub command: where the application's stream stopped."""
        if self._epoch is None:
            return None
        return {"epoch": self._epoch, "seq": self._seq}

    def resubscribing(self) -> None:
        """A sub is on its way on a new connection; drop publications until its reply."""
        self._live = False

    def subscribed(self, epoch: str, seq: int, recovered: bool) -> None:
        """The node's sub reply: resume in place, start the position, or reset it."""
        if self._epoch is None:
            self._epoch, self._seq = epoch, seq
        elif not (recovered and epoch == self._epoch):
            self._epoch, self._seq = epoch, seq
            self._queue.put_nowait(Reset(epoch, seq))
        # else: recovered, the missed publications follow, oldest first.
        self._live = True
        if not self._confirmed.done():
            self._confirmed.set_result(None)

    def receive(self, seq: int, data: Any) -> Received:
        """A publication of the channel, from the node."""
        if not self._live or self._ended or seq <= self._seq:
            return Received.DROPPED
        if seq != self._seq + 1:
            return Received.GAP
        self._seq = seq
        self._queue.put_nowait(Publication(seq, data))
        return Received.DELIVERED

    def end(self, error: BaseException | None) -> None:
        """No more items: unsubscribed or client closed (``None``), or refused (``error``)."""
        if self._ended:
            return
        self._ended = True
        self._live = False
        self._queue.put_nowait(_End(error))
        if not self._confirmed.done():
            self._confirmed.set_exception(
                error or ClientClosed("ended before the node confirmed the subscription")
            )
            self._confirmed.exception()  # retrieved here: nobody may be awaiting it
