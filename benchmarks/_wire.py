"""How each server under test spells the few messages the load generator sends.

fastws and the picows, `websockets` and aiohttp peers speak fastws's channel
protocol (PROTOCOL.md); python-socketio speaks Socket.IO v5 over Engine.IO v4,
where the same operations are events (`42["sub","ch"]`), acknowledgements
(`43<id>[...]`) and a namespace handshake after the open packet. A `Dialect`
hides that difference so one generator drives every server.

The generator also writes some frames itself, bypassing picows' `send`:
`masked()` builds a client frame with an all-zero masking key, which
RFC 6455 allows (the key must be present, not secret, for a server to
accept the frame) and which leaves the payload as it is. A whole batch of
such frames then goes out in one write, so the generator is not the side
paying a syscall per message.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

OP_TEXT = 0x1
ZERO_MASK = b"\x00\x00\x00\x00"


def masked(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final client frame carrying `payload`, masked with the zero key."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + ZERO_MASK + payload


class Dialect:
    """fastws's channel protocol: JSON commands, a welcome frame on connect."""

    name = "fastws"
    channel_path = "/ws"
    echo_path = "/echo"

    def hello(self) -> bytes | None:
        """What the client sends right after the upgrade, before anything else."""
        return None

    def is_welcome(self, payload: bytes) -> bool:
        """Whether this frame completes the server's greeting."""
        return payload.startswith(b'{"welcome"')

    def sub(self, channel: str, id: int) -> bytes:
        return orjson.dumps({"op": "sub", "ch": channel, "id": id})

    def pub(self, channel: str, data: Any, id: int | None = None) -> bytes:
        cmd: dict[str, Any] = {"op": "pub", "ch": channel, "data": data}
        if id is not None:
            cmd["id"] = id
        return orjson.dumps(cmd)

    def reply(self, payload: bytes) -> tuple[int | None, dict[str, Any] | None]:
        """(id, body) of a reply to a command with an id; (None, None) for anything else.

        The body holds `ok` or `error` as the server sent it.
        """
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(msg, dict) or "id" not in msg or "welcome" in msg:
            return None, None
        return msg["id"], msg

    def publication(self, payload: bytes) -> dict[str, Any]:
        """The `{"ch", "seq", "data"}` object a subscriber received."""
        msg: dict[str, Any] = orjson.loads(payload)
        return msg

    def echo(self, payload: bytes) -> bytes:
        """What to send for the server to send back; echo servers return it unchanged."""
        return payload

    def ping_reply(self, payload: bytes) -> bytes | None:
        """An application-level answer the server expects to a frame, if any."""
        return None


class SocketIO(Dialect):
    """Socket.IO v5 on Engine.IO v4, websocket transport only.

    The server opens with `0{...}`; the client joins the default namespace with
    `40` and is in once `40{...}` comes back. Engine.IO v4 servers ping (`2`)
    and expect a pong (`3`) within their ping timeout.
    """

    name = "socketio"
    channel_path = "/socket.io/?EIO=4&transport=websocket"
    echo_path = channel_path

    def hello(self) -> bytes | None:
        return None  # `40` goes out in answer to the open packet, see ping_reply

    def is_welcome(self, payload: bytes) -> bool:
        return payload.startswith(b"40")

    def sub(self, channel: str, id: int) -> bytes:
        return b"42%d" % id + orjson.dumps(["sub", channel])

    def pub(self, channel: str, data: Any, id: int | None = None) -> bytes:
        ack = b"" if id is None else b"%d" % id
        return b"42" + ack + orjson.dumps(["pub", {"ch": channel, "data": data}])

    def reply(self, payload: bytes) -> tuple[int | None, dict[str, Any] | None]:
        if not payload.startswith(b"43"):
            return None, None
        start = payload.index(b"[")
        body = orjson.loads(payload[start:])
        return int(payload[2:start]), (body[0] if body else {})

    def publication(self, payload: bytes) -> dict[str, Any]:
        event: list[Any] = orjson.loads(payload[2:])
        pub: dict[str, Any] = event[1]
        return pub

    def echo(self, payload: bytes) -> bytes:
        return b'42["echo",' + orjson.dumps(payload.decode()) + b"]"

    def ping_reply(self, payload: bytes) -> bytes | None:
        if payload == b"2":
            return b"3"
        if payload.startswith(b"0{"):
            return b"40"
        return None


DIALECTS: dict[str, Dialect] = {d.name: d for d in (Dialect(), SocketIO())}
