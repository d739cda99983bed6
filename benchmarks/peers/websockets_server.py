"""A channel broadcast (and echo) server written the plain way on websockets.

One of the peers fastws is measured against: what a competent engineer
writes in an afternoon with the `websockets` library (its asyncio server)
on uvloop, with orjson and no tuning. `/ws` speaks the same `sub`, `unsub`
and `pub` frames as fastws (see docs/protocol.md), so one load generator
drives both:

- a `pub` is encoded once with orjson as `{"ch", "seq", "data"}` (seq per
  channel, from 1) and handed to `websockets.asyncio.server.broadcast()`
  with `text=True`, the documented way to fan a message out (it writes
  synchronously to every open subscriber, without backpressure);
- every reply is sent with `await ws.send(..., text=True)`.

`/echo` sends every message straight back, text as text and binary as
binary. Any other path gets a 404 before the upgrade. SIGTERM closes the
connections for a second, then the process leaves (see _exit.py).

websockets defaults everywhere: among them permessage-deflate is accepted
when a client offers it, pings go out every 20 s, and messages are capped
at 1 MiB.

Run: python -m benchmarks.peers.websockets_server --host 127.0.0.1 --port 9001
"""

from __future__ import annotations

import contextlib
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import Response, Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from benchmarks.peers._hub import Channel, Hub
from benchmarks.peers._process import main, stop_on_signal

PATHS = ("/ws", "/echo")


def path_of(target: str) -> str:
    return urlsplit(target).path


def known_paths_only(connection: ServerConnection, request: Request) -> Response | None:
    """A `process_request` hook: refuse the upgrade on paths nothing serves."""
    if path_of(request.path) not in PATHS:
        return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
    return None


async def send_json(ws: ServerConnection, obj: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(obj), text=True)


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def channels(hub: Hub[ServerConnection], ws: ServerConnection) -> None:
    """Greet the client, then run its commands until it leaves."""
    hub.next_client += 1
    await send_json(ws, {"welcome": {"client": str(hub.next_client), "node": hub.node}})
    joined: set[Channel[ServerConnection]] = set()
    try:
        async for message in ws:
            if isinstance(message, str):
                await command(hub, ws, joined, message)
    finally:
        for ch in joined:
            ch.subscribers.pop(ws, None)


async def command(
    hub: Hub[ServerConnection],
    ws: ServerConnection,
    joined: set[Channel[ServerConnection]],
    raw: str,
) -> None:
    try:
        msg = orjson.loads(raw)
        op, name, cid = msg["op"], msg["ch"], msg.get("id")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        await error(ws, None, "bad command")
        return
    ch = hub.channel(name)
    if op == "pub":
        ch.seq += 1
        payload = orjson.dumps({"ch": name, "seq": ch.seq, "data": msg.get("data")})
        broadcast(ch.subscribers, payload, text=True)
        if cid is not None:
            await send_json(ws, {"id": cid, "ok": True, "seq": ch.seq})
    elif op == "sub":
        ch.subscribers[ws] = None
        joined.add(ch)
        if cid is not None:
            await send_json(
                ws,
                {
                    "id": cid,
                    "ok": True,
                    "ch": name,
                    "epoch": hub.epoch,
                    "seq": ch.seq,
                    "recovered": False,
                },
            )
    elif op == "unsub":
        ch.subscribers.pop(ws, None)
        joined.discard(ch)
        if cid is not None:
            await send_json(ws, {"id": cid, "ok": True})
    else:
        await error(ws, cid, "unknown op")


async def error(ws: ServerConnection, cid: Any, message: str) -> None:
    await send_json(ws, {"id": cid, "error": {"code": "bad_request", "message": message}})


async def handler(hub: Hub[ServerConnection], ws: ServerConnection) -> None:
    assert ws.request is not None  # set once the handshake is done
    # A client that vanishes without a closing handshake is routine here
    # (10,000 of them at the end of a run); websockets would log each one.
    with contextlib.suppress(ConnectionClosed):
        if path_of(ws.request.path) == "/echo":
            await echo(ws)
        else:
            await channels(hub, ws)


async def run(host: str, port: int) -> None:
    hub = Hub[ServerConnection]("websockets")
    server = await serve(partial(handler, hub), host, port, process_request=known_paths_only)
    await stop_on_signal(partial(close, server))


async def close(server: Server) -> None:
    server.close()  # stops accepting, closes every connection with 1001 "going away"
    await server.wait_closed()


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
