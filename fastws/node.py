"""The listener of one process: upgrades, the HTTP endpoints, start and drain.

picows parses each request on the port and asks :meth:`Node.route` what to
do with it. WebSocket paths get a new connection object, unless a
page on another site that is not allowed says no (403, fastws.origins), or a
connection limit does (503 node-wide, 429 per client address, the address
being the one trusted proxies forwarded, fastws.forwarded);
``/healthz``, ``/readyz``, ``/metrics`` and ``/info`` (this node and the
live nodes of its deployment) get a plain HTTP response on the same port, so
probes and scrapers need nothing else, and ``/fastws.js`` the browser
client; anything else is 404. With ``api_port`` set, the server HTTP API
(fastws.api) listens on a port of its own, from start until the node's
connections are gone, draining included.

Stopping is a state, not a flag. A draining node keeps its port open, so
probes still reach it, but answers 503 to upgrades and to ``/readyz``, and
closes its connections with 1001 (going away) spread evenly over the drain
period, so that their clients do not all reconnect elsewhere in the same
instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import os
import random
import signal
import socket
import time
from enum import Enum
from typing import TYPE_CHECKING, Any

import orjson
from picows import (
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSAutoPingStrategy, WSProtocol  # type: ignore[attr-defined]

from fastws import auth, deflate, metrics
from fastws.api import Api
from fastws.brokers.base import Unavailable
from fastws.forwarded import TrustedProxies
from fastws.heartbeat import Heartbeat
from fastws.origins import OriginPolicy
from fastws.tls import server_context

if TYPE_CHECKING:
    from fastws.app import App
    from fastws.connection import Connection

logger = logging.getLogger("fastws.node")

# Pending TCP connections the kernel queues for accept(); a reconnect storm
# after another node drains arrives here first.
BACKLOG = 2048

# Initial read buffer of a connection. picows grows it for larger frames; a
# small start keeps idle connections cheap.
READ_BUFFER_SIZE = 2048

# A drain closes connections in batches at least this many seconds apart.
DRAIN_STEP = 0.05


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


def _unauthorized(reason: str) -> WSUpgradeResponseWithListener:
    """401 with the reason in the body and RFC 6750's challenge."""
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "Cache-Control": "no-store",
        "WWW-Authenticate": 'Bearer realm="fastws", error="invalid_token"',
    }
    response = WSUpgradeResponse.create_error_response(401, f"{reason}\n".encode(), headers)
    return WSUpgradeResponseWithListener(response, None)


@functools.cache
def _browser_client_source() -> bytes:
    return importlib.resources.files("fastws").joinpath("static/fastws.js").read_bytes()


def _browser_client() -> WSUpgradeResponseWithListener:
    """GET /fastws.js: the browser client (docs/client-js.md), read once from the package.

    Any origin may import it (a page is rarely served by the node itself);
    the path carries no version, so caches keep it for minutes, not days.
    """
    headers = {
        "Content-Type": "text/javascript; charset=utf-8",
        "Access-Control-Allow-Origin": "*",
        "Cache-Control": "public, max-age=600",
    }
    response = WSUpgradeResponse.create_ok_response(_browser_client_source(), headers)
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
        # The server HTTP API (fastws.api), on a port of its own when api_port is set.
        self.api: Api | None = None
        self._heartbeat = Heartbeat(app, self.config.ping_interval, self.config.ping_timeout)
        # A logger-like adapter rather than a Logger: picows builds a child
        # Logger object per connection for a real Logger, about 0.5 KB each.
        self._picows_logger = logging.LoggerAdapter(logging.getLogger("picows.server"))
        self._started = 0.0
        self._origins = OriginPolicy(self.config.allowed_origins)
        self._proxies = TrustedProxies(self.config.trusted_proxies)
        self._tls = (
            server_context(self.config.tls_cert, self.config.tls_key)
            if self.config.tls_cert
            else None
        )

    def info(self) -> dict[str, Any]:
        """What the node registry says of this node (``/info``, the broker's registry)."""
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return {
            "address": f"{host}:{self.port}",
            "state": self.state.value,
            "connections": len(self.app.connections),
            "started": self._started,
            "pid": os.getpid(),
        }

    async def start(self) -> None:
        await self.app.broker.start()
        await self.app.control.start()
        if self.config.api_port:
            self.api = Api(self)
            await self.api.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self.config.host,
            self.config.port,
            backlog=BACKLOG,
            reuse_address=True,
            # One of several workers on this port (fastws.workers): the
            # kernel spreads new connections over their sockets.
            reuse_port=self.config.workers > 1,
            # TLS (fastws.tls) on uvloop's SSL transport, which picows writes
            # through; a TLS handshake gets the same time as the upgrade.
            ssl=self._tls,
            ssl_handshake_timeout=(self.config.handshake_timeout or None) if self._tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.state = NodeState.SERVING
        self._started = time.time()
        await self.app.broker.register(self.app.node_name, self.info)
        self._heartbeat.start()
        self.app.metrics.start()
        logger.info(
            "fastws node %s listening on %s:%d%s (WebSocket paths: %s)",
            self.app.node_name,
            self.config.host,
            self.port,
            " with TLS" if self._tls else "",
            ", ".join(self.app.routes) or "none",
        )
        if self.app.verifier is None and self.app.routes:
            logger.warning(
                "NO AUTHENTICATION: neither token_secret nor token_public_key is set, so "
                "anyone who reaches this port may connect, subscribe to any channel and "
                "publish to it (docs/auth.md)"
            )

    def _protocol(self) -> WSProtocol:
        """A picows protocol whose router knows the peer's address.

        picows hands the router only the request; the address is needed for
        the per-IP limit, so each protocol gets a router that reads it from
        its own transport.
        """
        config = self.config
        protocol: WSProtocol

        def route(request: WSUpgradeRequest) -> Any:
            peer = protocol.transport.underlying_transport.get_extra_info("peername")
            return self.route(request, peer[0] if peer else "")

        protocol = WSProtocol(
            None,  # host and port: client side only
            None,  # path: client side only
            False,  # is_client_side
            route,
            self._picows_logger,
            True,  # disconnect_on_exception
            config.handshake_timeout,
            False,  # auto ping: fastws.heartbeat pings every connection on one timer
            0.0,
            0.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # pings are answered by Connection, after its frame checks
            config.max_message_size,
            None,  # extra response headers
            READ_BUFFER_SIZE,
        )
        return protocol

    def route(
        self, request: WSUpgradeRequest, peer_ip: str
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        """Decide, from the request and the TCP peer's address, what a request gets."""
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        cls = self.app.routes.get(path)
        if cls is not None:
            # The client's address: the peer's, or one that a trusted proxy forwarded.
            remote_ip = self._proxies.client_ip(peer_ip, request.headers)
            refusal = self._refusal(request, remote_ip)
            if refusal is not None:
                return refusal
            grant = None
            if self.app.verifier is not None:
                try:
                    grant = self.app.verifier.authenticate(request)
                except auth.Unauthorized as exc:
                    self.app.stats.refused["unauthorized"] += 1
                    logger.debug("upgrade from %s refused with 401: %s", remote_ip, exc)
                    return _unauthorized(str(exc))
            connection: Connection = cls(self.app, request, remote_ip)
            if grant is not None:
                connection.authorize(grant)
            # The header may be split over several lines (RFC 6455 9.1).
            offer = ", ".join(request.headers.getall("Sec-WebSocket-Extensions", []))
            if offer and self.config.compression:
                agreement = deflate.negotiate(offer)
                if agreement is not None:
                    connection.deflate_bits = agreement.server_window_bits
                    response = WSUpgradeResponse.create_101_response(
                        {"Sec-WebSocket-Extensions": agreement.response}
                    )
                    return WSUpgradeResponseWithListener(response, connection)
            return connection
        if path == "/healthz":
            return _plain(200, b"ok\n")
        if path == "/readyz":
            if self.state is NodeState.SERVING and self.app.broker.ready:
                return _plain(200, b"ready\n")
            return _plain(503, f"{self.state.value}\n".encode())
        if path == "/metrics":
            return _plain(200, self.app.metrics.exposition(), metrics.CONTENT_TYPE)
        if path == "/fastws.js":
            return _browser_client()
        if path == "/info":
            # Answered from the registry as last read (the broker reads it
            # every few seconds), and read again now for the next request.
            self.app.start(self._read_nodes())
            nodes = {**self.app.broker.known_nodes, self.app.node_name: self.info()}
            body = orjson.dumps({"node": self.app.node_name, "nodes": nodes})
            return _plain(200, body, "application/json")
        return None

    async def _read_nodes(self) -> None:
        with contextlib.suppress(Unavailable):
            await self.app.broker.nodes()

    def _refusal(
        self, request: WSUpgradeRequest, remote_ip: str
    ) -> WSUpgradeResponseWithListener | None:
        config, refused = self.config, self.app.stats.refused
        origins = request.headers.getall("Origin", [])
        if origins and not self._origins.allows(origins, request.headers.get("Host")):
            refused["origin"] += 1
            logger.debug("upgrade from %s refused with 403: origin %s", remote_ip, origins)
            return _plain(403, b"origin not allowed\n")
        if self.state is not NodeState.SERVING:
            refused["draining"] += 1
            return _plain(503, b"draining\n")
        if config.max_connections and len(self.app.connections) >= config.max_connections:
            refused["max_connections"] += 1
            return _plain(503, b"too many connections\n")
        if (
            config.max_connections_per_ip
            and self.app.connections_per_ip[remote_ip] >= config.max_connections_per_ip
        ):
            refused["max_connections_per_ip"] += 1
            return _plain(429, b"too many connections from this address\n")
        return None

    def handle_signals(self) -> None:
        """Drain on SIGTERM or SIGINT; a second one stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping is None:
            logger.info("%s: draining over %.1f s", sig.name, self.config.drain_period)
            self._stopping = asyncio.get_running_loop().create_task(self.stop())
        else:
            logger.warning("%s again: stopping now", sig.name)
            self._stopping.cancel()

    async def stop(self, drain_period: float | None = None) -> None:
        """Drain: refuse new clients, close every connection with 1001, then stop.

        The closes are spread evenly over ``drain_period`` (the configured one
        by default), in random order. Cancelling this coroutine cuts the
        remaining connections at once.
        """
        if self.state in (NodeState.DRAINING, NodeState.STOPPED):
            await self._stopped.wait()
            return
        period = self.config.drain_period if drain_period is None else drain_period
        self.state = NodeState.DRAINING
        try:
            await self._close_all(period)
            deadline = asyncio.get_running_loop().time() + self.config.close_timeout + 1.0
            while self.app.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(DRAIN_STEP)
        finally:
            for conn in list(self.app.connections):
                conn.abort()
            self._heartbeat.stop()
            self.app.metrics.stop()
            if self._server is not None:
                self._server.close()
            # The API answers until the connections are gone; then the broker goes.
            if self.api is not None:
                await self.api.stop()
            await self.app.broker.stop()
            self.state = NodeState.STOPPED
            self._stopped.set()
            logger.info("fastws node %s stopped", self.app.node_name)

    async def _close_all(self, period: float) -> None:
        loop = asyncio.get_running_loop()
        connections = list(self.app.connections)
        random.shuffle(connections)
        start = loop.time()
        for i, conn in enumerate(connections):
            delay = start + period * i / len(connections) - loop.time()
            if delay >= DRAIN_STEP:
                await asyncio.sleep(delay)
            conn.close(1001, "going away")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
