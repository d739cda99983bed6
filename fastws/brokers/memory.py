"""The embedded default: one process, no network, nothing survives a restart."""

from __future__ import annotations

import secrets
from typing import Any

from fastws.brokers.base import Broker
from fastws.protocol import Position, encode_publication


class MemoryBroker(Broker):
    """Numbers publications per channel and delivers them in the same call.

    Nothing in it ever waits, so a command that publishes completes without
    a task switch. The epoch is drawn at start: a restarted node has lost its
    history, and a new epoch is how clients learn it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = secrets.token_hex(4)
        self._seq: dict[str, int] = {}

    async def publish(self, channel: str, data: Any) -> int:
        seq = self._seq.get(channel, 0) + 1
        payload = encode_publication(channel, seq, data)
        self._seq[channel] = seq
        if self._deliver is not None:
            self._deliver(channel, seq, payload)
        return seq

    async def subscribe(self, channel: str) -> None:
        """Nothing to do: every publication of this process passes through here."""

    async def unsubscribe(self, channel: str) -> None:
        """Nothing to do, as for subscribe."""

    async def position(self, channel: str) -> Position:
        return Position(self.epoch, self._seq.get(channel, 0))
