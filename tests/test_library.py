"""Library mode: the echo example as a subprocess, and App/Handler in this process."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import HOST, NodeProcess, proto_client, unique
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(60)

RECV = 5.0


async def recv(ws: ClientConnection, timeout: float = RECV) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[ClientConnection]:
    ws = await connect(url, open_timeout=5, close_timeout=2)
    try:
        yield ws
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)


# --------------------------------------------------------------------------
# examples/echo.py, run as a program
# --------------------------------------------------------------------------


def echo_url(server: NodeProcess) -> str:
    return f"ws://{HOST}:{server.port}/"


async def test_echo_text(echo_server: NodeProcess) -> None:
    async with client(echo_url(echo_server)) as ws:
        for text in ["hello", "", "h\u00e9llo \U0001f600", "x" * 5000, '{"op": "sub"}']:
            await ws.send(text)
            got = await recv(ws)
            assert isinstance(got, str), f"TEXT came back as {type(got).__name__}: {got!r}"
            assert got == text


async def test_echo_binary(echo_server: NodeProcess) -> None:
    async with client(echo_url(echo_server)) as ws:
        for blob in [b"\x00\x01\x02\xff", b"", bytes(range(256)) * 40, b"not json"]:
            await ws.send(blob)
            got = await recv(ws)
            assert isinstance(got, bytes), f"BINARY came back as {type(got).__name__}: {got!r}"
            assert got == blob


async def test_echo_pipelined_in_order(echo_server: NodeProcess) -> None:
    msgs: list[str | bytes] = [
        f"message {i}" if i % 2 == 0 else f"binary {i}".encode() for i in range(16)
    ]
    async with client(echo_url(echo_server)) as ws:
        for m in msgs:
            await ws.send(m)
        got = [await recv(ws) for _ in msgs]
        assert got == msgs


async def test_echo_many_clients(echo_server: NodeProcess) -> None:
    async def one(i: int) -> None:
        async with client(echo_url(echo_server)) as ws:
            for j in range(5):
                await ws.send(f"{i}:{j}")
            assert [await recv(ws) for _ in range(5)] == [f"{i}:{j}" for j in range(5)]

    await asyncio.gather(*(one(i) for i in range(20)))
    assert echo_server.alive(), echo_server.output_tail()


# --------------------------------------------------------------------------
# App in this process
# --------------------------------------------------------------------------

Serve = Callable[..., Awaitable[Any]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(app)`` starts ``app`` on a free port and returns the Node."""
    nodes: list[Any] = []

    async def start(app: Any) -> Any:
        node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
        nodes.append(node)
        assert isinstance(node.port, int) and node.port > 0, node.port
        return node

    yield start
    for node in nodes:
        await asyncio.wait_for(node.stop(), 10)


def url_of(node: Any, path: str = "/") -> str:
    return f"ws://{HOST}:{node.port}{path}"


async def test_app_echo_in_process(serve: Serve) -> None:
    from fastws import App, Handler

    class Echo(Handler):  # type: ignore[misc]
        def on_message(self, message: str | bytes) -> None:
            self.send(message)

    app = App()
    app.mount("/", Echo)
    node = await serve(app)
    async with client(url_of(node)) as ws:
        await ws.send("text")
        assert await recv(ws) == "text"
        await ws.send(b"\x00bin")
        assert await recv(ws) == b"\x00bin"


async def maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


async def test_subscribe_from_plain_on_connect(serve: Serve) -> None:
    """The documented form: a plain ``on_connect`` calls ``self.subscribe(ch)``."""
    from fastws import App, Handler

    ch = unique("plain")

    class Room(Handler):  # type: ignore[misc]
        def on_connect(self) -> None:
            self.subscribe(ch)

        def on_message(self, message: str | bytes) -> None:
            if message == "leave":
                self.unsubscribe(ch)
            self.send(message)

    app = App()
    app.mount("/", Room)
    node = await serve(app)
    async with client(url_of(node)) as ws:
        await ws.send("sync")  # on_connect has run once this comes back
        assert await recv(ws) == "sync"
        assert await asyncio.wait_for(app.publish(ch, "hi"), 5) == 1
        got = await recv(ws, timeout=2)
        assert json.loads(got) == {"ch": ch, "seq": 1, "data": "hi"}
        await ws.send("leave")
        assert await recv(ws) == "leave"
        assert await asyncio.wait_for(app.publish(ch, "bye"), 5) == 2
        await ws.send("sync")
        assert await recv(ws) == "sync", "a publication arrived after unsubscribe()"


async def test_app_publish_reaches_subscribed_handlers(serve: Serve) -> None:
    from fastws import App, Handler

    ch = unique("lib")

    class Room(Handler):  # type: ignore[misc]
        # async, and awaiting what subscribe() returns if it is awaitable, so
        # that this test is about publish, not about the subscribe() signature
        # (test_subscribe_from_plain_on_connect pins that down)
        async def on_connect(self) -> None:
            await maybe_await(self.subscribe(ch))

        async def on_message(self, message: str | bytes) -> None:
            if message == "ping":
                self.send("pong")
            elif message == "leave":
                await maybe_await(self.unsubscribe(ch))
                self.send("left")

    class Lobby(Handler):  # type: ignore[misc]
        def on_message(self, message: str | bytes) -> None:
            if message == "ping":
                self.send("pong")

    app = App()
    app.mount("/room", Room)
    app.mount("/lobby", Lobby)
    node = await serve(app)

    async with (
        client(url_of(node, "/room")) as r1,
        client(url_of(node, "/room")) as r2,
        client(url_of(node, "/room")) as r3,
        client(url_of(node, "/lobby")) as lobby,
    ):
        # a round trip proves on_connect (and its subscribe) has run
        for ws in (r1, r2, r3, lobby):
            await ws.send("ping")
            assert await recv(ws) == "pong"

        seq = await asyncio.wait_for(app.publish(ch, {"hello": "room"}), 5)
        assert seq == 1
        for ws in (r1, r2, r3):
            got = await recv(ws)
            assert isinstance(got, str), got
            assert json.loads(got) == {"ch": ch, "seq": 1, "data": {"hello": "room"}}

        await r3.send("leave")
        assert await recv(r3) == "left"
        assert await asyncio.wait_for(app.publish(ch, [1, 2]), 5) == 2
        for ws in (r1, r2):
            assert json.loads(await recv(ws)) == {"ch": ch, "seq": 2, "data": [1, 2]}

        # the lobby (never subscribed) and r3 (unsubscribed) got nothing
        for ws in (lobby, r3):
            await ws.send("ping")
            assert await recv(ws) == "pong"


async def test_app_publish_reaches_channel_protocol_clients(serve: Serve) -> None:
    from fastws import App, Handler

    ch = unique("mixed")

    class Room(Handler):  # type: ignore[misc]
        async def on_connect(self) -> None:
            await maybe_await(self.subscribe(ch))

        def on_message(self, message: str | bytes) -> None:
            self.send(message)

    app = App()
    app.mount("/room", Room)
    app.channels("/ws")
    node = await serve(app)

    async with client(url_of(node, "/room")) as room, proto_client(url_of(node, "/ws")) as pc:
        await room.send("sync")
        assert await recv(room) == "sync"
        r = await pc.sub(ch)
        assert r["seq"] == 0, r

        seq = await asyncio.wait_for(app.publish(ch, "from the app"), 5)
        assert seq == 1
        want = {"ch": ch, "seq": 1, "data": "from the app"}
        assert json.loads(await recv(room)) == want
        assert await pc.next_pub(ch) == want

        # and a channel-protocol pub is on the same channel: same seq series,
        # delivered to the handler connection too
        assert await pc.pub(ch, "from a client") == 2
        want2 = {"ch": ch, "seq": 2, "data": "from a client"}
        assert json.loads(await recv(room)) == want2
        assert await pc.next_pub(ch) == want2


async def test_async_on_message_keeps_order(serve: Serve) -> None:
    from fastws import App, Handler

    class Slow(Handler):  # type: ignore[misc]
        async def on_message(self, message: str | bytes) -> None:
            n = int(message)
            # earlier messages take longer: only sequential handling keeps order
            await asyncio.sleep(0.03 if n % 3 == 0 else (0.01 if n % 3 == 1 else 0))
            self.send(message)

    app = App()
    app.mount("/", Slow)
    node = await serve(app)
    async with client(url_of(node)) as a, client(url_of(node)) as b:
        for i in range(20):
            await a.send(str(i))
            await b.send(str(100 + i))
        assert [await recv(a) for _ in range(20)] == [str(i) for i in range(20)]
        assert [await recv(b) for _ in range(20)] == [str(100 + i) for i in range(20)]


async def test_handler_lifecycle_id_close_and_disconnect(serve: Serve) -> None:
    from fastws import App, Handler

    events: list[tuple[Any, ...]] = []
    disconnected = asyncio.Event()

    class Life(Handler):  # type: ignore[misc]
        async def on_connect(self) -> None:
            events.append(("connect", self.id))

        def on_message(self, message: str | bytes) -> None:
            if message == "id":
                self.send(str(self.id))
            elif message == "close-me":
                self.close(4002, "bye")

        def on_disconnect(self, code: int) -> None:
            events.append(("disconnect", self.id, code))
            disconnected.set()

    app = App()
    app.mount("/", Life)
    node = await serve(app)

    async with client(url_of(node)) as a, client(url_of(node)) as b:
        await a.send("id")
        await b.send("id")
        id_a, id_b = await recv(a), await recv(b)
        assert id_a != id_b, "two connections share an id"

        # the server closes with the handler's code and reason
        await a.send("close-me")
        with pytest.raises(ConnectionClosed):
            await recv(a)
        assert a.close_code == 4002 and a.close_reason == "bye", (a.close_code, a.close_reason)

        # the client closes with its own code: on_disconnect gets it
        disconnected.clear()
        await b.close(4005, "client leaving")
        await asyncio.wait_for(disconnected.wait(), 5)
        for _ in range(50):
            if any(e[0] == "disconnect" and e[2] == 4005 for e in events):
                break
            await asyncio.sleep(0.02)

    connects = [e for e in events if e[0] == "connect"]
    disconnects = {e[1]: e[2] for e in events if e[0] == "disconnect"}
    assert len(connects) == 2, events
    assert {str(e[1]) for e in connects} == {id_a, id_b}, events
    assert any(str(k) == id_b and v == 4005 for k, v in disconnects.items()), events
    assert any(str(k) == id_a for k in disconnects), events


async def test_handler_error_closes_only_that_connection_1011(serve: Serve) -> None:
    from fastws import App, Handler

    class Fragile(Handler):  # type: ignore[misc]
        def on_message(self, message: str | bytes) -> None:
            if message == "boom":
                raise RuntimeError("handler bug (raised on purpose by the test)")
            self.send(message)

    app = App()
    app.mount("/", Fragile)
    node = await serve(app)
    async with client(url_of(node)) as a, client(url_of(node)) as b:
        await a.send("boom")
        with pytest.raises(ConnectionClosed):
            await recv(a)
        assert a.close_code == 1011, a.close_code
        await b.send("still here")
        assert await recv(b) == "still here"
    async with client(url_of(node)) as c:
        await c.send("new")
        assert await recv(c) == "new"


async def test_node_stop_closes_connections(serve: Serve) -> None:
    from fastws import App, Handler

    class Echo(Handler):  # type: ignore[misc]
        def on_message(self, message: str | bytes) -> None:
            self.send(message)

    app = App()
    app.mount("/", Echo)
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    port = node.port
    try:
        async with client(url_of(node)) as ws:
            await ws.send("x")
            assert await recv(ws) == "x"
            await asyncio.wait_for(node.stop(), 10)
            with pytest.raises(ConnectionClosed):
                await recv(ws)
            assert ws.close_code == 1001, ws.close_code
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.stop(), 5)
