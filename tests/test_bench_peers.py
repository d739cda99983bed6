"""The benchmark's peer servers (benchmarks/peers/) speak the wire they promise.

The benchmark drives fastws and its peers with one load generator, so a peer
that answered a `sub` differently, dropped a publication or numbered it
wrongly would skew the comparison or stall the run; and one that ignored
SIGTERM would be killed, with a note, at the end of every run. Each peer
runs here as the benchmark runs it (`python -m benchmarks.peers.X_server`)
and is spoken to over real sockets with the `websockets` client.

picows, websockets and aiohttp speak fastws's channel frames on /ws plus an
/echo path; socketio speaks Socket.IO v5 over Engine.IO v4, tested here in
raw Engine.IO packets, as the load generator sends them.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import HOST, PYTHON, NodeProcess, clean_env, free_port, wait_exit
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.timeout(60)

FASTWS_DIALECT = ["picows", "websockets", "aiohttp"]
ALL_PEERS = [*FASTWS_DIALECT, "socketio"]
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
RECV_TIMEOUT = 5.0
EXIT_TIMEOUT = 5.0  # what benchmarks/_servers.py gives a server after SIGTERM


def start_peer(name: str) -> NodeProcess:
    port = free_port()
    argv = [PYTHON, "-m", f"benchmarks.peers.{name}_server", "--host", HOST, "--port", str(port)]
    peer = NodeProcess(argv, port, clean_env(), f"peer-{name}")
    try:
        peer.wait_port_open()
    except BaseException:
        peer.stop(timeout=3)
        raise
    return peer


def running_peer(name: str) -> Iterator[NodeProcess]:
    peer = start_peer(name)
    try:
        yield peer
    finally:
        peer.stop(timeout=EXIT_TIMEOUT)
        peer.cleanup_files()


@pytest.fixture(scope="module", params=FASTWS_DIALECT)
def dialect_peer(request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    """One running peer that speaks fastws's frames, shared by this module's tests."""
    yield from running_peer(request.param)


@pytest.fixture(scope="module")
def socketio_peer() -> Iterator[NodeProcess]:
    yield from running_peer("socketio")


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)


async def recv_json(ws: ClientConnection) -> Any:
    raw = await recv(ws)
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    return json.loads(raw)


async def send_json(ws: ClientConnection, obj: Any) -> None:
    await ws.send(json.dumps(obj))


# --------------------------------------------------------------------------
# fastws's channel frames: picows, websockets, aiohttp
# --------------------------------------------------------------------------


async def test_channels(dialect_peer: NodeProcess) -> None:
    # The query string is ignored, as by fastws.
    async with (
        connect(dialect_peer.ws_url("/ws?token=x")) as a,
        connect(dialect_peer.ws_url("/ws")) as b,
    ):
        welcomes = [await recv_json(a), await recv_json(b)]
        for w in welcomes:
            assert set(w) == {"welcome"}, w
            assert isinstance(w["welcome"]["client"], str), w
            assert isinstance(w["welcome"]["node"], str), w
        assert welcomes[0]["welcome"]["client"] != welcomes[1]["welcome"]["client"]

        acks = []
        for ws, cid in ((a, 1), (b, 2)):
            await send_json(ws, {"op": "sub", "ch": "t", "id": cid})
            ack = await recv_json(ws)
            assert isinstance(ack.pop("epoch"), str), ack
            assert ack == {"id": cid, "ok": True, "ch": "t", "seq": 0, "recovered": False}
            acks.append(ack)

        for seq in (1, 2):
            await send_json(a, {"op": "pub", "ch": "t", "data": {"n": seq}, "id": 10 + seq})
            delivery = {"ch": "t", "seq": seq, "data": {"n": seq}}
            # The publisher is subscribed: its copy comes before its reply.
            assert await recv_json(a) == delivery
            assert await recv_json(a) == {"id": 10 + seq, "ok": True, "seq": seq}
            assert await recv_json(b) == delivery

        # A latecomer is told where the channel stands.
        await send_json(b, {"op": "sub", "ch": "t", "id": 3})
        assert (await recv_json(b))["seq"] == 2

        await send_json(b, {"op": "unsub", "ch": "t", "id": 4})
        assert await recv_json(b) == {"id": 4, "ok": True}
        await send_json(a, {"op": "pub", "ch": "t", "data": None})  # no id: no reply
        assert await recv_json(a) == {"ch": "t", "seq": 3, "data": None}
        # b left: the next thing it hears is the reply to its next command.
        await send_json(b, {"op": "sub", "ch": "other", "id": 5})
        assert (await recv_json(b))["id"] == 5


async def test_malformed_commands(dialect_peer: NodeProcess) -> None:
    async with connect(dialect_peer.ws_url("/ws")) as ws:
        await recv_json(ws)  # welcome
        for bad, cid in (("not json", None), ('{"op": "sub"}', None), ("[1, 2]", None)):
            await ws.send(bad)
            reply = await recv_json(ws)
            assert reply["id"] == cid, (bad, reply)
            assert reply["error"]["code"] == "bad_request", (bad, reply)
            assert isinstance(reply["error"]["message"], str), (bad, reply)
        await send_json(ws, {"op": "shout", "ch": "t", "id": 9})
        reply = await recv_json(ws)
        assert reply["id"] == 9 and reply["error"]["code"] == "bad_request", reply


async def test_a_client_that_leaves_leaves_its_channels(dialect_peer: NodeProcess) -> None:
    async with connect(dialect_peer.ws_url("/ws")) as a:
        await recv_json(a)
        async with connect(dialect_peer.ws_url("/ws")) as b:
            await recv_json(b)
            for ws in (a, b):
                await send_json(ws, {"op": "sub", "ch": "gone", "id": 1})
                await recv_json(ws)
        await send_json(a, {"op": "pub", "ch": "gone", "data": 1, "id": 2})
        assert await recv_json(a) == {"ch": "gone", "seq": 1, "data": 1}
        assert await recv_json(a) == {"id": 2, "ok": True, "seq": 1}


async def test_echo(dialect_peer: NodeProcess) -> None:
    async with connect(dialect_peer.ws_url("/echo")) as ws:
        # No welcome on /echo: the first frame back is the echo.
        await ws.send("héllo, echo")
        assert await recv(ws) == "héllo, echo"
        await ws.send(b"\x00\x01\xfe\xff")
        assert await recv(ws) == b"\x00\x01\xfe\xff"
        await ws.send("x" * 70_000)  # a 64-bit length
        assert await recv(ws) == "x" * 70_000


async def test_other_paths_are_refused(dialect_peer: NodeProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(dialect_peer.ws_url("/nope"), open_timeout=RECV_TIMEOUT)
    assert refused.value.response.status_code == 404


# --------------------------------------------------------------------------
# Socket.IO over raw Engine.IO packets
# --------------------------------------------------------------------------


async def sio_recv(ws: ClientConnection) -> str:
    """The next Engine.IO packet that is not a ping (pings are answered)."""
    while True:
        raw = await recv(ws)
        assert isinstance(raw, str), f"expected a text packet, got {raw!r}"
        if raw == "2":
            await ws.send("3")
            continue
        return raw


def sio_split(packet: str, prefix: str) -> Any:
    """The JSON after `prefix` (e.g. `431` for the ack of id 1 in namespace /)."""
    assert packet.startswith(prefix), (prefix, packet)
    return json.loads(packet[len(prefix) :])


async def sio_connect(peer: NodeProcess) -> ClientConnection:
    ws = await connect(peer.ws_url(SIO_PATH), open_timeout=RECV_TIMEOUT)
    handshake = sio_split(await sio_recv(ws), "0")
    assert isinstance(handshake["sid"], str), handshake
    assert handshake["upgrades"] == [], handshake  # already on the websocket
    await ws.send("40")
    assert isinstance(sio_split(await sio_recv(ws), "40")["sid"], str)
    return ws


async def test_socketio_rooms_and_echo(socketio_peer: NodeProcess) -> None:
    a = await sio_connect(socketio_peer)
    b = await sio_connect(socketio_peer)
    try:
        await a.send('421["sub","t"]')
        assert sio_split(await sio_recv(a), "431") == [{"ok": True, "ch": "t", "seq": 0}]
        await b.send('427["sub","t"]')
        assert sio_split(await sio_recv(b), "437") == [{"ok": True, "ch": "t", "seq": 0}]

        # With an ack id: a gets both the event and the ack, in either order.
        await a.send('422["pub",{"ch":"t","data":"one"}]')
        got = [await sio_recv(a), await sio_recv(a)]
        event = ["pub", {"ch": "t", "seq": 1, "data": "one"}]
        ack = next(p for p in got if p.startswith("432"))
        assert sio_split(ack, "432") == [{"seq": 1}]
        got.remove(ack)
        assert sio_split(got[0], "42") == event
        assert sio_split(await sio_recv(b), "42") == event

        # Without one: the event alone.
        await a.send('42["pub",{"ch":"t","data":{"n":2}}]')
        event = ["pub", {"ch": "t", "seq": 2, "data": {"n": 2}}]
        assert sio_split(await sio_recv(a), "42") == event
        assert sio_split(await sio_recv(b), "42") == event

        await b.send('423["sub","t"]')
        assert sio_split(await sio_recv(b), "433") == [{"ok": True, "ch": "t", "seq": 2}]

        await a.send('42["echo",{"k":[1,"é"]}]')
        assert sio_split(await sio_recv(a), "42") == ["echo", {"k": [1, "é"]}]
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------
# every peer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PEERS)
async def test_sigterm_exits_promptly(name: str) -> None:
    """With a client still connected, SIGTERM ends the process, status 0, quietly."""
    peer = start_peer(name)
    try:
        if name == "socketio":
            ws = await sio_connect(peer)
        else:
            ws = await connect(peer.ws_url("/ws"))
            await recv_json(ws)
        peer.send_signal(signal.SIGTERM)
        code = await wait_exit(peer, EXIT_TIMEOUT)
        await ws.close()
        assert code == 0, f"exit {code}\n{peer.output_tail()}"
        assert "Traceback" not in peer.stderr(), peer.output_tail()
    finally:
        peer.stop(timeout=3)
        peer.cleanup_files()
