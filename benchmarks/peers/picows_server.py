"""A channel broadcast (and echo) server written the plain way on raw picows.

This is the baseline fastws is measured against: what a competent engineer
writes in an afternoon with picows + uvloop + orjson, with no tuning. It
speaks the same frames as fastws for `sub` and `pub` (see PROTOCOL.md), so
one load generator drives both:

- every connection that sends `{"op": "sub", "ch": ...}` joins the channel;
- a `pub` is encoded once with orjson as `{"ch", "seq", "data"}` (seq per
  channel, from 1) and sent by a Python loop, `transport.send()` per
  subscriber;
- picows defaults everywhere (read_buffer_init_size and the rest).

`/echo` sends every frame straight back with its type, the echo of picows'
own README, so the echo benchmark compares the same idiom across libraries.
Any other path gets picows' 404.

Run: python -m benchmarks.peers.picows_server --host 127.0.0.1 --port 9001
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import orjson
from picows import WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from benchmarks.peers._hub import Channel, Hub
from benchmarks.peers._process import main

TEXT = WSMsgType.TEXT
# What /echo sends back; pings are answered by picows itself (auto pong).
DATA = (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION)


class EchoListener(WSListener):
    """One /echo connection: each frame goes back as is (type, payload, fin)."""

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in DATA:
            transport.send(frame.msg_type, frame.get_payload_as_bytes(), frame.fin)


class BroadcastListener(WSListener):
    """One connection: parse each command, answer it, fan publications out."""

    def __init__(self, hub: Hub[WSTransport]) -> None:
        self.hub = hub
        self.joined: list[Channel[WSTransport]] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.hub.next_client += 1
        welcome = {"welcome": {"client": str(self.hub.next_client), "node": self.hub.node}}
        transport.send(TEXT, orjson.dumps(welcome))

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is TEXT:
            self.command(transport, frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for ch in self.joined:
            ch.subscribers.pop(transport, None)
        self.joined.clear()

    def command(self, transport: WSTransport, raw: bytes) -> None:
        try:
            msg = orjson.loads(raw)
            op, name, cid = msg["op"], msg["ch"], msg.get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.error(transport, None, "bad command")
            return
        ch = self.hub.channel(name)
        if op == "pub":
            ch.seq += 1
            payload = orjson.dumps({"ch": name, "seq": ch.seq, "data": msg.get("data")})
            for sub in ch.subscribers:
                sub.send(TEXT, payload)
            if cid is not None:
                self.reply(transport, {"id": cid, "ok": True, "seq": ch.seq})
        elif op == "sub":
            if transport not in ch.subscribers:
                ch.subscribers[transport] = None
                self.joined.append(ch)
            if cid is not None:
                self.reply(
                    transport,
                    {
                        "id": cid,
                        "ok": True,
                        "ch": name,
                        "epoch": self.hub.epoch,
                        "seq": ch.seq,
                        "recovered": False,
                    },
                )
        elif op == "unsub":
            if ch.subscribers.pop(transport, False) is None:
                self.joined.remove(ch)
            if cid is not None:
                self.reply(transport, {"id": cid, "ok": True})
        else:
            self.error(transport, cid, "unknown op")

    @staticmethod
    def error(transport: WSTransport, cid: Any, message: str) -> None:
        err = {"code": "bad_request", "message": message}
        transport.send(TEXT, orjson.dumps({"id": cid, "error": err}))

    @staticmethod
    def reply(transport: WSTransport, obj: dict[str, Any]) -> None:
        transport.send(TEXT, orjson.dumps(obj))


async def serve(host: str, port: int) -> None:
    hub = Hub[WSTransport]("picows")

    def factory(request: WSUpgradeRequest) -> WSListener | None:
        path = request.path.split(b"?", 1)[0]
        if path == b"/ws":
            return BroadcastListener(hub)
        if path == b"/echo":
            return EchoListener()
        return None  # picows answers 404

    server = await ws_create_server(factory, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0])
