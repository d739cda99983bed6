"""The listener of one process: upgrades, the HTTP endpoints, start and stop.

picows parses each request on the port and asks :meth:`Node.route` what to
do with it. WebSocket paths get a new connection object; ``/healthz``,
``/readyz`` and ``/metrics`` get a plain HTTP response on the same port, so
probes and scrapers need nothing else; anything else is 404.

Stopping is a state, not a flag: a node that drains refuses new upgrades
with 503 and reports 503 on ``/readyz`` while it closes every open
connection with 1001 (going away), so clients reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from enum import Enum
from typing import TYPE_CHECKING

from picows import (
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fastws import metrics

if TYPE_CHECKING:
    from fastws.app import App
    from fastws.connection import Connection

logger = logging.getLogger("fastws.node")


class NodeState(Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


def _plain(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> WSUpgradeResponseWithListener:
    headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


class Node:
    """Serves an App on one port until it is told to stop."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.config = app.config
        self.state = NodeState.STARTING
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._registry = metrics.registry_for(app)

    async def start(self) -> None:
        await self.app.broker.start()
        self._server = await ws_create_server(
            self.route,
            self.config.host,
            self.config.port,
            websocket_handshake_timeout=self.config.handshake_timeout,
            max_frame_size=self.config.max_message_size,
            enable_auto_pong=True,
            disconnect_on_exception=True,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.state = NodeState.SERVING
        logger.info(
            "fastws node %s listening on %s:%d (channels at %s)",
            self.app.node_name,
            self.config.host,
            self.port,
            ", ".join(self.app.routes) or "no path",
        )

    def route(self, request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener | None:
        """Decide, from the request line alone, what a request on the port gets."""
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        cls = self.app.routes.get(path)
        if cls is not None:
            if self.state is not NodeState.SERVING:
                return _plain(503, b"draining\n")
            connection: Connection = cls(self.app, request)
            return connection
        if path == "/healthz":
            return _plain(200, b"ok\n")
        if path == "/readyz":
            if self.state is NodeState.SERVING and self.app.broker.ready:
                return _plain(200, b"ready\n")
            return _plain(503, f"{self.state.value}\n".encode())
        if path == "/metrics":
            return _plain(200, metrics.exposition(self._registry), metrics.CONTENT_TYPE)
        return None

    def handle_signals(self) -> None:
        """Drain on SIGTERM or SIGINT; a second one stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping is None:
            logger.info("%s: draining", sig.name)
            self._stopping = asyncio.get_running_loop().create_task(self.stop())
        else:
            logger.warning("%s again: stopping now", sig.name)
            self._stopping.cancel()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection with 1001, wait for them to go."""
        if self.state in (NodeState.DRAINING, NodeState.STOPPED):
            await self._stopped.wait()
            return
        self.state = NodeState.DRAINING
        try:
            if self._server is not None:
                self._server.close()
            for conn in list(self.app.connections):
                conn.close(1001, "going away")
            deadline = time.monotonic() + timeout
            while self.app.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            for conn in list(self.app.connections):
                if conn.transport is not None:
                    conn.transport.disconnect(graceful=False)
            await self.app.broker.stop()
            self.state = NodeState.STOPPED
            self._stopped.set()
            logger.info("fastws node %s stopped", self.app.node_name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
