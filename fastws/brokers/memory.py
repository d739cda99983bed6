"""The embedded default: one process, no network, nothing survives a restart."""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any

from fastws.brokers.base import Broker, Stored
from fastws.protocol import Position, encode_publication


class MemoryBroker(Broker):
    """Numbers publications per channel, keeps their history, delivers them at once.

    Nothing in it ever waits, so a command that publishes completes without
    a task switch, and a subscription's reply and replay are queued in the
    same loop turn as its join. The epoch is drawn at start: a restarted
    node has lost its history, and a new epoch is how clients learn it.
    """

    def __init__(self, history_size: int = 100, history_ttl: float = 300.0) -> None:
        super().__init__()
        self.epoch = secrets.token_hex(4)
        self._seq: dict[str, int] = {}
        self._history: dict[str, deque[tuple[float, Stored]]] = {}
        self._size = history_size
        self._ttl = history_ttl

    async def publish(self, channel: str, data: Any) -> int:
        seq = self._seq.get(channel, 0) + 1
        payload = encode_publication(channel, seq, data)
        self._seq[channel] = seq
        if self._size:
            kept = self._history.get(channel)
            if kept is None:
                kept = self._history[channel] = deque(maxlen=self._size)
            kept.append((time.monotonic(), Stored(seq, data, payload)))
        if self._deliver is not None:
            self._deliver(channel, seq, payload)
        return seq

    async def subscribe(self, channel: str) -> None:
        """Nothing to do: every publication of this process passes through here."""

    async def unsubscribe(self, channel: str) -> None:
        """Nothing to do, as for subscribe."""

    async def position(self, channel: str) -> Position:
        return Position(self.epoch, self._seq.get(channel, 0))

    async def history(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> tuple[Position, list[Stored] | None]:
        position = Position(self.epoch, self._seq.get(channel, 0))
        kept = self._kept(channel)
        if since is None:
            start = 0 if limit is None else max(0, len(kept) - limit)
            return position, kept[start:]
        if since.epoch != self.epoch or since.seq > position.seq:
            return position, None
        if since.seq == position.seq:
            return position, []
        if not kept or kept[0].seq > since.seq + 1:
            return position, None
        missed = kept[since.seq + 1 - kept[0].seq :]
        return position, missed if limit is None else missed[:limit]

    def _kept(self, channel: str) -> list[Stored]:
        """The channel's history, after dropping what is older than the TTL."""
        kept = self._history.get(channel)
        if not kept:
            return []
        oldest = time.monotonic() - self._ttl
        while kept and kept[0][0] < oldest:
            kept.popleft()
        return [stored for _, stored in kept]
