"""The channel state every fastws-dialect peer keeps: channels, their seq, their subscribers.

What differs between the peers is how they read and write; this part, the
same few lines in any of them, lives here once.
"""

from __future__ import annotations

import os
import uuid
from typing import Generic, TypeVar

S = TypeVar("S")  # a library's connection object


class Channel(Generic[S]):
    __slots__ = ("name", "seq", "subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.subscribers: dict[S, None] = {}  # insertion-ordered set


class Hub(Generic[S]):
    """All channels of the process, plus the identity it greets clients with."""

    def __init__(self, library: str) -> None:
        self.channels: dict[str, Channel[S]] = {}
        self.epoch = uuid.uuid4().hex[:12]
        self.node = f"{library}-{os.getpid()}"
        self.next_client = 0

    def channel(self, name: str) -> Channel[S]:
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channels[name] = Channel(name)
        return ch
