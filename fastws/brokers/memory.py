"""The embedded default: one process, no network, nothing survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from typing import Any

from fastws.brokers.base import Broker, Stored
from fastws.protocol import Position, encode_publication


class _Channel:
    """One channel's unbroken history: its epoch, its last seq, what it keeps."""

    __slots__ = ("epoch", "kept", "last_used", "seq")

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.kept: deque[tuple[float, Stored]] = deque(maxlen=size)
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

    def __init__(self, history_size: int = 100, history_ttl: float = 300.0) -> None:
        super().__init__()
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        self._size = history_size
        self._ttl = history_ttl
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
            channel = self._channels[name] = _Channel(self._size)
        channel.last_used = time.monotonic()
        return channel

    async def publish(self, channel: str, data: Any) -> int:
        state = self._channel(channel)
        seq = state.seq + 1
        payload = encode_publication(channel, seq, data)
        state.seq = seq
        if self._size:
            state.kept.append((state.last_used, Stored(seq, data, payload)))
        if self._deliver is not None:
            self._deliver(channel, seq, payload)
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
        oldest = now - self._ttl
        while state.kept and state.kept[0][0] < oldest:
            state.kept.popleft()

    def sweep(self) -> None:
        """Drop expired publications and forget channels nobody uses."""
        now = time.monotonic()
        for name, state in list(self._channels.items()):
            self._expire(state, now)
            if (
                not state.kept
                and name not in self._subscribed
                and now - state.last_used >= self._ttl
            ):
                del self._channels[name]

    async def _sweep_forever(self) -> None:
        period = min(60.0, max(0.05, self._ttl / 4))
        while True:
            await asyncio.sleep(period)
            self.sweep()
