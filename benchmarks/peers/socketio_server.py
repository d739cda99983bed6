"""A channel broadcast (and echo) server written the plain way on python-socketio.

One of the peers fastws is measured against: Socket.IO is what many reach
for when they want "channels", so this is what a competent engineer writes
in an afternoon with `socketio.AsyncServer(async_mode="aiohttp")` attached
to an aiohttp app on uvloop, with no tuning. It speaks Socket.IO v5 over
Engine.IO v4, not fastws's frames, so the load generator has a dialect for
it (clients connect straight to the websocket transport):

    ws://HOST:PORT/socket.io/?EIO=4&transport=websocket

- `sub` (`42<ack>["sub","<channel>"]`) enters the room named after the
  channel and acks `{"ok": true, "ch", "seq"}`;
- `pub` (`42["pub",{"ch","data"}]`) bumps the channel's seq (from 1) and
  emits `pub` `{"ch", "seq", "data"}` to the room, which python-socketio
  encodes once and writes to every member; with an ack id it acks
  `{"seq"}`;
- `echo` (`42["echo",X]`) emits `echo` X back to the sender alone.

python-socketio defaults everywhere (ping interval 25 s, ping timeout 20 s,
1 MB packets, its logging off), except that any origin may connect; the
aiohttp access log is off, as in the aiohttp peer. SIGTERM gives the
connections a second to close, then the process leaves (see _exit.py): with
10,000 clients python-socketio's own teardown takes far longer.

Run: python -m benchmarks.peers.socketio_server --host 127.0.0.1 --port 9001
"""

from __future__ import annotations

from functools import partial
from typing import Any

import socketio
from aiohttp import web

from benchmarks.peers._process import main, stop_on_signal


def make_app() -> tuple[web.Application, socketio.AsyncServer]:
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
    app = web.Application()
    sio.attach(app)
    seqs: dict[str, int] = {}  # channel -> seq of its last publication

    @sio.on("sub")
    async def sub(sid: str, ch: str) -> dict[str, Any]:
        await sio.enter_room(sid, ch)
        return {"ok": True, "ch": ch, "seq": seqs.get(ch, 0)}

    @sio.on("pub")
    async def pub(sid: str, msg: dict[str, Any]) -> dict[str, Any]:
        ch = msg["ch"]
        seq = seqs[ch] = seqs.get(ch, 0) + 1
        await sio.emit("pub", {"ch": ch, "seq": seq, "data": msg.get("data")}, room=ch)
        return {"seq": seq}

    @sio.on("echo")
    async def echo(sid: str, data: Any) -> None:
        await sio.emit("echo", data, to=sid)

    return app, sio


async def run(host: str, port: int) -> None:
    app, sio = make_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await stop_on_signal(partial(close, sio, runner))


async def close(sio: socketio.AsyncServer, runner: web.AppRunner) -> None:
    await sio.shutdown()  # its background tasks first, as its docs ask
    await runner.cleanup()


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
