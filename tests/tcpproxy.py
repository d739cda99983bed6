"""A TCP proxy that a test controls, to break the network between a client and a node.

::

    proxy = await TcpProxy.start("127.0.0.1", node.port)
    ...connect a client to ("127.0.0.1", proxy.port)...
    proxy.cut()      # every current connection through it is aborted, both sides
    proxy.pause()    # current connections go silent, nothing is closed (half-open)
    proxy.resume()   # and carry on where they stopped
    proxy.refusing = True  # new connections are aborted at once: the target is down
    await proxy.close()

It runs in the test's event loop and forwards bytes as they come, both
ways. ``cut`` aborts (RST, not FIN) the client's side and the node's side
at once, as a dropped link or a dead middlebox would look to each end.
``pause`` stops reading on both sides of the connections open at that
moment, so bytes wait in the kernel's buffers and neither end is told
anything: what a half-open TCP connection looks like. Connections made
after ``pause`` are not paused.
"""

from __future__ import annotations

import asyncio
import contextlib


class _Side(asyncio.Protocol):
    """One end of a proxied connection: what it receives goes to the other end."""

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.pair.closed:  # aborted before the event loop handed it over
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.pair.forward(self, data)

    def eof_received(self) -> bool:
        other = self.pair.other(self)
        if other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        return True  # keep the other direction open: a half-close is forwarded as one

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self)


class _Pair:
    """A client's connection to the proxy and the proxy's connection to the target."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.early = bytearray()  # from the client before the target answered
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def forward(self, side: _Side, data: bytes) -> None:
        to = self.other(side).transport
        if to is not None:
            to.write(data)
        elif side is self.client:
            self.early += data

    async def open_upstream(self) -> None:
        if self.proxy.refusing:
            self.abort()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: self.upstream, self.proxy.target_host, self.proxy.target_port
            )
        except OSError:
            self.abort()
            return
        assert self.upstream.transport is not None
        if self.closed:
            self.upstream.transport.abort()
            return
        if self.early:
            self.upstream.transport.write(bytes(self.early))
            self.early.clear()

    def lost(self, side: _Side) -> None:
        """One end closed: close the other, after what it was still sent."""
        self.closed = True
        self.proxy.pairs.discard(self)
        other = self.other(side).transport
        if other is not None and not other.is_closing():
            other.close()

    def abort(self) -> None:
        self.closed = True
        self.proxy.pairs.discard(self)
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()

    def pause(self, paused: bool) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                if paused:
                    side.transport.pause_reading()
                else:
                    side.transport.resume_reading()


class TcpProxy:
    """Listens on 127.0.0.1:``port`` and forwards every connection to the target."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.pairs: set[_Pair] = set()
        self.connections = 0  # accepted over the proxy's life
        self.cuts = 0  # connections aborted by cut()
        self.refusing = False  # abort new connections as they come
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: set[_Pair] = set()

    @classmethod
    async def start(cls, target_host: str, target_port: int, host: str = "127.0.0.1") -> TcpProxy:
        proxy = cls(target_host, target_port)
        loop = asyncio.get_running_loop()
        proxy._server = await loop.create_server(proxy._accept, host, 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    def _accept(self) -> _Side:
        pair = _Pair(self)
        self.pairs.add(pair)
        self.connections += 1
        task = asyncio.get_running_loop().create_task(pair.open_upstream())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pair.client

    def cut(self) -> int:
        """Abort every current connection on both sides; returns how many there were."""
        pairs = list(self.pairs)
        for pair in pairs:
            pair.abort()
        self.cuts += len(pairs)
        return len(pairs)

    def pause(self) -> None:
        """Make every current connection silent both ways, without closing anything."""
        for pair in self.pairs:
            pair.pause(True)
            self._paused.add(pair)

    def resume(self) -> None:
        """Let the connections that pause() silenced flow again."""
        for pair in self._paused:
            if not pair.closed:
                pair.pause(False)
        self._paused.clear()

    async def close(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
