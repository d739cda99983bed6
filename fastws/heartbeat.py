"""Keepalive for every connection of a node on one timer.

picows can ping by itself, with an asyncio task per connection; at tens of
thousands of mostly idle connections that is tens of thousands of tasks and
timers. Instead, each connection notes that a frame arrived (one attribute
store in ``Connection.on_ws_frame``) and a single sweep, a few times per
interval, walks the connections: one that has been silent for
``ping_interval`` gets a PING, and one that stays silent for
``ping_timeout`` after it is cut off. The ping carries the time it left,
which the pong echoes, so the round trip of each answered ping is measured
(``fastws_ping_rtt_seconds``). A peer whose TCP connection vanished
without a FIN (a dead host, a dropped NAT entry) is found this way and its
resources freed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastws.app import App

logger = logging.getLogger("fastws.heartbeat")


class Heartbeat:
    def __init__(self, app: App, interval: float, timeout: float) -> None:
        self.app = app
        self.interval = interval
        self.timeout = timeout
        self.period = max(0.05, min(interval, timeout) / 4)
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        stats = self.app.stats
        for conn in list(self.app.connections):
            if conn.seen:
                conn.seen = False
                conn.quiet_since = now
                conn.pinged_at = 0.0
            elif conn.pinged_at:
                if now - conn.pinged_at >= self.timeout:
                    stats.ping_timeouts += 1
                    conn.log(logger).info("connection %s: no answer to ping, cutting it", conn.id)
                    conn.abort()
            elif now - conn.quiet_since >= self.interval:
                conn.pinged_at = now
                stats.pings_sent += 1
                conn.ping()
        self._timer = loop.call_later(self.period, self._sweep)
