"""The embedded default: one process, no network, nothing survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fastws.brokers.base import Broker, Stored
from fastws.namespaces import ChannelOptions
from fastws.protocol import Position, encode_publication

Options = Callable[[str], ChannelOptions]
DEFAULTS = ChannelOptions(history_size=100, history_ttl=300.0, presence=False, join_leave=False)


class _Channel:
    """One channel's unbroken history: its epoch, its last seq, what it keeps."""

    __slots__ = ("epoch", "kept", "last_used", "seq", "ttl")

    def __init__(self, options: ChannelOptions) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.kept: deque[tuple[float, Stored]] = deque(maxlen=options.history_size)
        self.ttl = options.history_ttl
        self.last_used = time.monotonic()


class MemoryBroker(Broker):
    """Numbers publications per channel, keeps their history, delivers them at once.

    Nothing in it ever waits, so a command that publishes completes without
    a task switch, and a subscription's reply and replay are queued in the
    same loop turn as its join.

    Each channel has an epoch of its own, drawn when the channel is first
    used. A sweep drops publications older than the TTL, and forgets a
    channel with no subscriber and nothing kept once it has been unused for
    a TTL: its memory is freed, and if it is used again it starts a new
    epoch, which tells clients that held a position in it that its history
    is gone. A restarted node starts every channel afresh the same way.
    """

    waits = False

    def __init__(
        self,
        options: Options = lambda channel: DEFAULTS,
        shortest_ttl: float = DEFAULTS.history_ttl,
    ) -> None:
        """``options`` gives each channel's history bounds; the sweep runs often
        enough for the shortest TTL among them."""
        super().__init__()
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._options = options
        self._sweep_period = min(60.0, max(0.05, shortest_ttl / 4))
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def _channel(self, name: str) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(self._options(name))
        channel.last_used = time.monotonic()
        return channel

    async def publish(self, channel: str, data: Any) -> int:
        state = self._channel(channel)
        seq = state.seq + 1
        payload = encode_publication(channel, seq, data)
        state.seq = seq
        if state.kept.maxlen:
            state.kept.append((state.last_used, Stored(seq, payload)))
        if self._deliver is not None:
            self._deliver(channel, state.epoch, seq, payload)
        return seq

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def position(self, channel: str) -> Position:
        state = self._channel(channel)
        return Position(state.epoch, state.seq)

    async def history(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> tuple[Position, list[Stored] | None]:
        state = self._channel(channel)
        position = Position(state.epoch, state.seq)
        self._expire(state, time.monotonic())
        kept = [stored for _, stored in state.kept]
        if since is None:
            start = 0 if limit is None else max(0, len(kept) - limit)
            return position, kept[start:]
        if since.epoch != state.epoch or since.seq > state.seq:
            return position, None
        if since.seq == state.seq:
            return position, []
        if not kept or kept[0].seq > since.seq + 1:
            return position, None
        missed = kept[since.seq + 1 - kept[0].seq :]
        return position, missed if limit is None else missed[:limit]

    def _expire(self, state: _Channel, now: float) -> None:
        oldest = now - state.ttl
        while state.kept and state.kept[0][0] < oldest:
            state.kept.popleft()

    def kept(self) -> tuple[int, int]:
        """Counted now, over every channel: one pass, when /metrics is scraped."""
        channels = publications = 0
        for state in self._channels.values():
            if state.kept:
                channels += 1
                publications += len(state.kept)
        return channels, publications

    def sweep(self) -> None:
        """Drop expired publications and forget channels nobody uses."""
        now = time.monotonic()
        for name, state in list(self._channels.items()):
            self._expire(state, now)
            if (
                not state.kept
                and name not in self._subscribed
                and now - state.last_used >= state.ttl
            ):
                del self._channels[name]

    async def announce(self, channel: str, payload: bytes) -> None:
        if self._deliver is not None:
            self._deliver(channel, "", 0, payload)

    async def add_presence(self, channel: str, client: str, info: dict[str, Any]) -> None:
        self._presence.setdefault(channel, {})[client] = info

    async def remove_presence(self, channel: str, client: str) -> None:
        present = self._presence.get(channel)
        if present is not None:
            present.pop(client, None)
            if not present:
                del self._presence[channel]

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        return dict(self._presence.get(channel, {}))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_period)
            self.sweep()
