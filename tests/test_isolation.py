"""Exception isolation in library mode: an error closes one connection with 1011.

The App runs in this process (``await app.serve(host=..., port=0)``); the
clients are websockets connections in the same event loop. What is asserted
is the close code each client sees, that every other client keeps working,
and ``fastws_handler_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import HOST, ahttp_get, ascrape, metric, unique
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fastws import App, Handler
from fastws.brokers import MemoryBroker

pytestmark = pytest.mark.timeout(60)

Serve = Callable[[App], Awaitable[Any]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    nodes: list[Any] = []

    async def start(app: App) -> Any:
        node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await asyncio.wait_for(node.stop(), 15)


@contextlib.asynccontextmanager
async def client(node: Any, path: str) -> AsyncIterator[ClientConnection]:
    ws = await connect(f"ws://{HOST}:{node.port}{path}", open_timeout=5, close_timeout=2)
    try:
        yield ws
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(ws.recv(), timeout)


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the connection closes; the close code the client received."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await recv(ws, timeout)
    return ws.close_code


async def handler_errors(node: Any) -> float:
    return metric(await ascrape(node.port), "fastws_handler_errors_total")


class SyncBoom(Handler):  # type: ignore[misc]
    def on_message(self, message: str | bytes) -> None:
        if message == "boom":
            raise ValueError("boom from a test handler")
        self.send(message)


class AsyncBoom(Handler):  # type: ignore[misc]
    async def on_message(self, message: str | bytes) -> None:
        await asyncio.sleep(0.01)
        if message == "boom":
            raise ValueError("boom from an async test handler")
        self.send(message)


@pytest.mark.parametrize("handler", [SyncBoom, AsyncBoom], ids=["sync", "async"])
async def test_raising_on_message_closes_only_that_connection_1011(
    serve: Serve, handler: type[Handler]
) -> None:
    app = App()
    app.mount("/echo", handler)
    app.channels("/ws")
    node = await serve(app)
    ch = unique("iso")
    async with (
        client(node, "/echo") as victim,
        client(node, "/echo") as bystander,
        client(node, "/ws") as proto,
    ):
        assert json.loads(await recv(proto))["welcome"]
        await proto.send(json.dumps({"op": "sub", "ch": ch, "id": 1}))
        assert json.loads(await recv(proto)).get("ok") is True
        for ws in (victim, bystander):
            await ws.send("hi")
            assert await recv(ws) == "hi"

        before = await handler_errors(node)
        await victim.send("boom")
        await victim.send("after boom")  # never handled
        assert await closed_with(victim) == 1011

        # the other connections keep working, on the same path and beside it
        await bystander.send("still here")
        assert await recv(bystander) == "still here"
        await proto.send(json.dumps({"op": "pub", "ch": ch, "data": 1, "id": 2}))
        got = [json.loads(await recv(proto)) for _ in range(2)]
        assert {"id": 2, "ok": True, "seq": 1} in got, got
        assert await handler_errors(node) - before == 1

    # and the node takes new connections on the same path
    async with client(node, "/echo") as fresh:
        await fresh.send("new")
        assert await recv(fresh) == "new"
    assert (await ahttp_get(node.port, "/healthz")).status == 200


async def test_many_failing_connections_at_once(serve: Serve) -> None:
    app = App()
    app.mount("/echo", AsyncBoom)
    node = await serve(app)
    before = await handler_errors(node)
    async with client(node, "/echo") as bystander:
        victims = [
            await connect(f"ws://{HOST}:{node.port}/echo", open_timeout=5) for _ in range(20)
        ]
        try:
            for v in victims:
                await v.send("boom")
            codes = await asyncio.gather(*(closed_with(v) for v in victims))
            assert codes == [1011] * 20, codes
            await bystander.send("ok")
            assert await recv(bystander) == "ok"
        finally:
            for v in victims:
                with contextlib.suppress(Exception):
                    await v.close()
    assert await handler_errors(node) - before == 20
    assert metric(await ascrape(node.port), "fastws_connections_open") == 0


async def test_raising_on_connect_closes_1011(serve: Serve) -> None:
    class BadConnect(Handler):  # type: ignore[misc]
        def on_connect(self) -> None:
            raise RuntimeError("cannot greet")

    app = App()
    app.mount("/bad", BadConnect)
    app.mount("/echo", SyncBoom)
    node = await serve(app)
    async with client(node, "/bad") as ws:
        assert await closed_with(ws) == 1011
    async with client(node, "/echo") as ws:
        await ws.send("x")
        assert await recv(ws) == "x"
    assert await handler_errors(node) >= 1


async def test_raising_on_disconnect_does_not_hurt_the_node(serve: Serve) -> None:
    class BadBye(Handler):  # type: ignore[misc]
        def on_message(self, message: str | bytes) -> None:
            self.send(message)

        def on_disconnect(self, code: int) -> None:
            raise RuntimeError("cannot say goodbye")

    app = App()
    app.mount("/bye", BadBye)
    node = await serve(app)
    for _ in range(5):
        async with client(node, "/bye") as ws:
            await ws.send("x")
            assert await recv(ws) == "x"
        assert ws.close_code == 1000
    async with client(node, "/bye") as ws:
        await ws.send("still")
        assert await recv(ws) == "still"
    assert (await ahttp_get(node.port, "/healthz")).status == 200


# --------------------------------------------------------------------------
# an error inside the node's own per-connection code: a broker that raises
# --------------------------------------------------------------------------


class FailingBroker(MemoryBroker):
    """The memory broker, except that publishing to or subscribing to "bad-*" raises."""

    def __init__(self, wait: bool) -> None:
        super().__init__()
        self.wait = wait

    async def publish(self, channel: str, data: Any) -> int:
        if self.wait:
            await asyncio.sleep(0.01)
        if channel.startswith("bad-"):
            raise RuntimeError(f"broker cannot publish to {channel}")
        return await super().publish(channel, data)

    async def subscribe(self, channel: str) -> None:
        if self.wait:
            await asyncio.sleep(0.01)
        if channel.startswith("bad-sub-"):
            raise RuntimeError(f"broker cannot subscribe to {channel}")
        await super().subscribe(channel)


async def proto(node: Any) -> ClientConnection:
    ws = await connect(f"ws://{HOST}:{node.port}/ws", open_timeout=5, close_timeout=2)
    assert "welcome" in json.loads(await recv(ws))
    return ws


async def request(ws: ClientConnection, msg: dict[str, Any]) -> Any:
    await ws.send(json.dumps(msg))
    while True:
        m = json.loads(await recv(ws))
        if m.get("id") == msg["id"]:
            return m


@pytest.mark.parametrize("wait", [False, True], ids=["raises-at-once", "raises-after-await"])
async def test_broker_error_in_publish_closes_that_client_1011(serve: Serve, wait: bool) -> None:
    app = App(broker=FailingBroker(wait))
    app.channels("/ws")
    node = await serve(app)
    good = unique("good")
    sub, pub, victim = await proto(node), await proto(node), await proto(node)
    try:
        assert (await request(sub, {"op": "sub", "ch": good, "id": 1})).get("ok") is True
        assert (await request(victim, {"op": "sub", "ch": good, "id": 1})).get("ok") is True
        before = await handler_errors(node)

        await victim.send(json.dumps({"op": "pub", "ch": unique("bad"), "data": 1, "id": 2}))
        assert await closed_with(victim) == 1011

        r = await request(pub, {"op": "pub", "ch": good, "data": "fine", "id": 3})
        assert r == {"id": 3, "ok": True, "seq": 1}, r
        assert json.loads(await recv(sub)) == {"ch": good, "seq": 1, "data": "fine"}
        assert await handler_errors(node) - before == 1
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_connections_open") == 2
    finally:
        for ws in (sub, pub, victim):
            with contextlib.suppress(Exception):
                await ws.close()


@pytest.mark.parametrize("wait", [False, True], ids=["raises-at-once", "raises-after-await"])
async def test_broker_error_in_subscribe_closes_that_client_1011(serve: Serve, wait: bool) -> None:
    app = App(broker=FailingBroker(wait))
    app.channels("/ws")
    node = await serve(app)
    good = unique("good")
    sub, victim = await proto(node), await proto(node)
    try:
        await victim.send(json.dumps({"op": "sub", "ch": unique("bad-sub"), "id": 1}))
        assert await closed_with(victim) == 1011
        assert (await request(sub, {"op": "sub", "ch": good, "id": 1})).get("ok") is True
        r = await request(sub, {"op": "pub", "ch": good, "data": 2, "id": 2})
        assert r.get("ok") is True, r
    finally:
        for ws in (sub, victim):
            with contextlib.suppress(Exception):
                await ws.close()
