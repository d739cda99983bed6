"""A channel broadcast (and echo) server written the plain way on aiohttp.

One of the peers fastws is measured against: what a competent engineer
writes in an afternoon with aiohttp.web's `WebSocketResponse` on uvloop,
with orjson and no tuning. `/ws` speaks the same `sub`, `unsub` and `pub`
frames as fastws (see docs/protocol.md), so one load generator drives both:

- a `pub` is encoded once with orjson as `{"ch", "seq", "data"}` (seq per
  channel, from 1) and sent by a plain loop, `await ws.send_str(payload)`
  per subscriber; that await is aiohttp's backpressure, so a slow
  subscriber holds up the publisher's connection;
- the loop runs over a copy of the subscribers, since others join and leave
  while it awaits, and skips those whose connection has gone.

`/echo` sends every message straight back, text as text and binary as
binary. Other paths get aiohttp's 404. SIGTERM gives the handlers a second
to end, then the process leaves (see _exit.py).

aiohttp defaults everywhere (among them: permessage-deflate accepted when a
client offers it, automatic pongs, no heartbeat, 4 MiB messages), except
that the access log is off: one line per connection is not what is measured.

Run: python -m benchmarks.peers.aiohttp_server --host 127.0.0.1 --port 9001
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from benchmarks.peers._hub import Channel, Hub
from benchmarks.peers._process import main, stop_on_signal

HUB = web.AppKey("hub", Hub[web.WebSocketResponse])


async def send_json(ws: web.WebSocketResponse, obj: dict[str, Any]) -> None:
    await ws.send_str(orjson.dumps(obj).decode())


async def echo_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def channels_handler(request: web.Request) -> web.WebSocketResponse:
    """Greet the client, then run its commands until it leaves."""
    hub = request.app[HUB]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    hub.next_client += 1
    await send_json(ws, {"welcome": {"client": str(hub.next_client), "node": hub.node}})
    joined: dict[Channel[web.WebSocketResponse], None] = {}
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await command(hub, ws, joined, msg.data)
    finally:
        for ch in joined:
            ch.subscribers.pop(ws, None)
    return ws


async def command(
    hub: Hub[web.WebSocketResponse],
    ws: web.WebSocketResponse,
    joined: dict[Channel[web.WebSocketResponse], None],
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
        seq = ch.seq
        payload = orjson.dumps({"ch": name, "seq": seq, "data": msg.get("data")}).decode()
        for sub in list(ch.subscribers):
            if not sub.closed:
                with contextlib.suppress(ConnectionResetError):  # gone since the copy
                    await sub.send_str(payload)
        if cid is not None:
            await send_json(ws, {"id": cid, "ok": True, "seq": seq})
    elif op == "sub":
        ch.subscribers[ws] = None
        joined[ch] = None
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
        joined.pop(ch, None)
        if cid is not None:
            await send_json(ws, {"id": cid, "ok": True})
    else:
        await error(ws, cid, "unknown op")


async def error(ws: web.WebSocketResponse, cid: Any, message: str) -> None:
    await send_json(ws, {"id": cid, "error": {"code": "bad_request", "message": message}})


def make_app() -> web.Application:
    app = web.Application()
    app[HUB] = Hub[web.WebSocketResponse]("aiohttp")
    app.router.add_get("/ws", channels_handler)
    app.router.add_get("/echo", echo_handler)
    return app


async def run(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await stop_on_signal(runner.cleanup)  # stops accepting, then waits on the handlers


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
