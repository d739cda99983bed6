"""permessage-deflate (RFC 7692) on the wire: negotiation, fanout, client messages.

Everything runs against a real node, as a subprocess (``--compression``) or
in this process (``App(Config(compression=True))``), over real sockets.
Compressed frames sent to the node are made here with zlib and raw frames;
compressed frames from the node are read raw (RSV1, payload) and inflated
here, so the tests do not trust any WebSocket library's deflate code alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import (
    HOST,
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    NodeProcess,
    RawWS,
    proto_client,
    start_node,
    unique,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(60)

RECV = 5.0
TAIL = b"\x00\x00\xff\xff"
RSV1 = 4  # RawWS/ws_frame count the reserved bits as a 3-bit number: RSV1 is 0b100
MAX_MESSAGE_SIZE = 65536

REQUIRED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


# --------------------------------------------------------------------------
# deflate on this side of the socket
# --------------------------------------------------------------------------


def deflate_raw(message: bytes, bits: int = 15, level: int = 6) -> bytes:
    """A message compressed on its own the way a client sends it (tail removed)."""
    stream = zlib.compressobj(level, zlib.DEFLATED, -bits)
    data = stream.compress(message) + stream.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(TAIL)
    return data[:-4]


def inflate(payload: bytes, bits: int, step: int = 64) -> bytes:
    """Inflate a server message with a window of ``bits`` and nothing more.

    zlib only notices a back-reference beyond the window when it reaches
    past the output of the current inflate call, so the output is taken in
    small steps: a message compressed with a larger window than agreed fails
    here ("invalid distance too far back") instead of slipping through.
    """
    stream = zlib.decompressobj(-bits)
    out = bytearray()
    data = payload + TAIL
    while True:
        chunk = stream.decompress(data, step)
        out += chunk
        data = stream.unconsumed_tail
        if not data and not chunk:
            return bytes(out)


def random_text(n: int) -> str:
    return os.urandom(n // 2 + 1).hex()[:n]


def big_data(i: int) -> dict[str, Any]:
    """~2.3 KB of JSON that compresses well, with a repeat 1500 bytes back.

    The repeat is out of reach of a 1 KB (10-bit) window, so a 10-bit
    subscriber's frames can only inflate with ``inflate(..., 10)`` if the node
    really compressed them with that window.
    """
    block = random_text(1500)
    return {
        "i": i,
        "block": block,
        "again": block,
        "rows": [{"n": n, "name": f"row-{n}", "ok": n % 2 == 0} for n in range(12)],
    }


def small_data(i: int) -> dict[str, Any]:
    return {"i": i, "small": True}


# --------------------------------------------------------------------------
# a raw client that offers extensions of the test's choosing
# --------------------------------------------------------------------------


class DeflateRawWS(RawWS):
    """RawWS whose upgrade request carries Sec-WebSocket-Extensions lines."""

    offers: tuple[str, ...] = ()

    def upgrade_request(self, path: str = "/ws", headers: dict[str, str] | None = None) -> bytes:
        request = super().upgrade_request(path, headers)
        assert request.endswith(b"\r\n\r\n")
        lines = "".join(f"Sec-WebSocket-Extensions: {offer}\r\n" for offer in self.offers)
        return request[:-2] + lines.encode("latin-1") + b"\r\n"

    @property
    def extensions(self) -> str | None:
        return self.headers.get("sec-websocket-extensions")

    async def recv_data(self, timeout: float = RECV) -> Frame:
        """The next frame that is not a ping or pong (pings answered); raw RSV bits kept."""
        deadline = time.monotonic() + timeout
        while True:
            f = await self.recv_frame(deadline - time.monotonic())
            if f.opcode == OP_PING:
                await self.send_frame(OP_PONG, f.payload)
                continue
            if f.opcode != OP_PONG:
                return f


@contextlib.asynccontextmanager
async def raw_client(
    port: int, *offers: str, path: str = "/ws", welcome: bool = True
) -> AsyncIterator[DeflateRawWS]:
    ws = await DeflateRawWS.open(port, path, upgrade=False)
    assert isinstance(ws, DeflateRawWS)
    try:
        ws.offers = offers
        status = await ws.handshake(path)
        assert status == 101, f"upgrade refused: {status} {ws.body!r}"
        if welcome:
            f = await ws.recv_data()
            assert f.opcode == OP_TEXT and f.rsv == 0, f"welcome frame: {f!r} rsv={f.rsv}"
            assert "welcome" in f.json()
        yield ws
    finally:
        ws.close()


async def raw_sub(ws: RawWS, ch: str, cid: int = 1) -> None:
    reply = await ws.request({"op": "sub", "ch": ch, "id": cid})
    assert reply.get("ok") is True, reply


async def raw_pub(ws: RawWS, ch: str, data: Any, cid: int = 2) -> int:
    reply = await ws.request({"op": "pub", "ch": ch, "data": data, "id": cid})
    assert reply.get("ok") is True, reply
    return int(reply["seq"])


async def pub_own(
    ws: DeflateRawWS, ch: str, data: Any, cid: int = 2, *, compress_bits: int | None = None
) -> tuple[int, Frame]:
    """Publish to a channel ws is subscribed to: (seq, the publication's raw frame).

    The reply and the publication may come in either order, so both are read
    here; replies are small and so never compressed. With ``compress_bits``
    the command itself goes compressed, with that window.
    """
    command = json.dumps({"op": "pub", "ch": ch, "data": data, "id": cid}).encode()
    if compress_bits is None:
        await ws.send_text(command)
    else:
        await ws.send_frame(OP_TEXT, deflate_raw(command, bits=compress_bits), rsv=RSV1)
    seq: int | None = None
    pub: Frame | None = None
    while seq is None or pub is None:
        f = await ws.recv_data()
        assert f.opcode == OP_TEXT, f
        if f.rsv == 0 and (m := f.json()).get("id") == cid:
            assert m.get("ok") is True, m
            seq = int(m["seq"])
        else:
            assert pub is None, f"two frames that are not the reply: {pub!r}, {f!r}"
            pub = f
    return seq, pub


def response_extensions(ws: ClientConnection) -> str | None:
    assert ws.response is not None
    return ws.response.headers.get("Sec-WebSocket-Extensions")


# --------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnode() -> Iterator[NodeProcess]:
    """A node with compression on (default min size and level) and a 64 KiB message limit."""
    n = start_node(args=["--compression", "--max-message-size", str(MAX_MESSAGE_SIZE)])
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture(scope="module")
def plain_node() -> Iterator[NodeProcess]:
    """A node with the defaults: no compression."""
    n = start_node()
    yield n
    n.stop()
    n.cleanup_files()


# --------------------------------------------------------------------------
# 1. negotiation
# --------------------------------------------------------------------------


async def test_websockets_client_gets_deflate_without_context_takeover(
    cnode: NodeProcess,
) -> None:
    async with proto_client(cnode.ws_url()) as c:
        assert response_extensions(c.ws) == REQUIRED
        assert [e.name for e in c.ws.protocol.extensions] == ["permessage-deflate"]
        ch = unique("neg")
        await c.sub(ch)
        seq = await c.pub(ch, {"hello": "x" * 1000})
        pub = await c.next_pub(ch)
        assert pub == {"ch": ch, "seq": seq, "data": {"hello": "x" * 1000}}
    assert cnode.alive(), cnode.output_tail()


async def test_no_extension_without_the_flag(plain_node: NodeProcess) -> None:
    async with proto_client(plain_node.ws_url()) as c:
        assert response_extensions(c.ws) is None
        assert c.ws.protocol.extensions == []
        ch = unique("nocomp")
        await c.sub(ch)
        seq = await c.pub(ch, {"big": "y" * 3000})
        assert await c.next_pub(ch) == {"ch": ch, "seq": seq, "data": {"big": "y" * 3000}}
    # the same offer over a raw socket: no header, and nothing compressed
    async with raw_client(plain_node.port, "permessage-deflate; client_max_window_bits") as ws:
        assert ws.extensions is None
        ch = unique("nocomp-raw")
        await raw_sub(ws, ch)
        seq, f = await pub_own(ws, ch, {"big": "z" * 3000})
        assert f.rsv == 0
        assert f.json() == {"ch": ch, "seq": seq, "data": {"big": "z" * 3000}}


async def test_no_offer_gets_no_extension(cnode: NodeProcess) -> None:
    async with raw_client(cnode.port) as ws:
        assert ws.extensions is None
    async with proto_client(cnode.ws_url(), compression=None) as c:
        assert response_extensions(c.ws) is None


@pytest.mark.parametrize(
    ("offer", "response"),
    [
        ("permessage-deflate", REQUIRED),
        ("permessage-deflate; client_max_window_bits", REQUIRED),
        ("permessage-deflate; server_max_window_bits=10", REQUIRED + "; server_max_window_bits=10"),
        ("permessage-deflate; server_max_window_bits=9", REQUIRED + "; server_max_window_bits=9"),
        (
            "permessage-deflate; server_max_window_bits=15; client_max_window_bits=12",
            REQUIRED + "; server_max_window_bits=15",
        ),
        (
            'permessage-deflate; server_max_window_bits="11"',
            REQUIRED + "; server_max_window_bits=11",
        ),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            REQUIRED,
        ),
        # declined offers
        ("permessage-deflate; server_max_window_bits=8", None),
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=abc", None),
        ("permessage-deflate; server_max_window_bits=010", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; client_max_window_bits=7", None),
        ("permessage-deflate; unknown_param", None),
        ("permessage-deflate; unknown_param=1", None),
        ("permessage-deflate; server_no_context_takeover=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        ("permessage-deflate; server_max_window_bits=10; server_max_window_bits=10", None),
        ("x-webkit-deflate-frame", None),
        # a later acceptable offer in the same header is taken
        (
            "permessage-deflate; server_max_window_bits=8, "
            "permessage-deflate; server_max_window_bits=12",
            REQUIRED + "; server_max_window_bits=12",
        ),
        ("permessage-deflate; unknown_param, permessage-deflate", REQUIRED),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover, "
            "permessage-deflate; client_max_window_bits",
            REQUIRED,
        ),
        (
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=10",
            REQUIRED + "; server_max_window_bits=10",
        ),
        # the first acceptable offer wins over later ones
        (
            "permessage-deflate; server_max_window_bits=13, permessage-deflate",
            REQUIRED + "; server_max_window_bits=13",
        ),
    ],
)
async def test_raw_offer(cnode: NodeProcess, offer: str, response: str | None) -> None:
    async with raw_client(cnode.port, offer) as ws:
        assert ws.extensions == response
        # the connection works either way, and RSV1 follows the agreement
        ch = unique("offer")
        await raw_sub(ws, ch)
        data = big_data(0)
        seq, f = await pub_own(ws, ch, data)
        if response is None:
            assert f.rsv == 0, "compressed frame without an agreement"
            payload = f.payload
        else:
            assert f.rsv == RSV1
            bits = 15
            if "server_max_window_bits=" in response:
                bits = int(response.rsplit("=", 1)[1])
            payload = inflate(f.payload, bits)
        assert json.loads(payload) == {"ch": ch, "seq": seq, "data": data}


async def test_offers_split_over_several_header_lines(cnode: NodeProcess) -> None:
    """RFC 6455 9.1: Sec-WebSocket-Extensions may be split over several header lines."""
    async with raw_client(
        cnode.port, "x-webkit-deflate-frame", "permessage-deflate; server_max_window_bits=10"
    ) as ws:
        assert ws.extensions == REQUIRED + "; server_max_window_bits=10"


# --------------------------------------------------------------------------
# 2. fanout to a mix of compressing and plain subscribers
# --------------------------------------------------------------------------


async def test_fanout_to_mixed_subscribers(cnode: NodeProcess) -> None:
    ch = unique("mix")
    url = cnode.ws_url()
    w10 = "permessage-deflate; server_max_window_bits=10"
    async with contextlib.AsyncExitStack() as stack:
        deflaters = [await stack.enter_async_context(proto_client(url)) for _ in range(3)]
        plain = [
            await stack.enter_async_context(proto_client(url, compression=None)) for _ in range(2)
        ]
        raw10 = [await stack.enter_async_context(raw_client(cnode.port, w10)) for _ in range(2)]
        raw15 = await stack.enter_async_context(raw_client(cnode.port, "permessage-deflate"))
        raw0 = await stack.enter_async_context(raw_client(cnode.port))
        publisher = await stack.enter_async_context(proto_client(url))

        for c in deflaters:
            assert response_extensions(c.ws) == REQUIRED
        for c in plain:
            assert response_extensions(c.ws) is None
        for w in raw10:
            assert w.extensions == REQUIRED + "; server_max_window_bits=10"
        assert raw15.extensions == REQUIRED
        assert raw0.extensions is None

        for c in deflaters + plain:
            await c.sub(ch)
        for w in [*raw10, raw15, raw0]:
            await raw_sub(w, ch)

        datas = [big_data(i) if i % 2 == 0 else small_data(i) for i in range(6)]
        seqs = [await publisher.pub(ch, d) for d in datas]
        expected = [{"ch": ch, "seq": s, "data": d} for s, d in zip(seqs, datas, strict=True)]
        assert seqs == list(range(seqs[0], seqs[0] + 6))

        # websockets subscribers, compressing or not, decode the same publications
        for c in deflaters + plain:
            assert [await c.next_pub(ch) for _ in datas] == expected

        # the uncompressed bytes, as the plain raw subscriber gets them
        plain_frames = [await raw0.recv_data() for _ in datas]
        for f in plain_frames:
            assert f.opcode == OP_TEXT and f.rsv == 0
        assert [json.loads(f.payload) for f in plain_frames] == expected
        large = [len(f.payload) >= 256 for f in plain_frames]
        assert large == [True, False] * 3

        frames10 = [[await w.recv_data() for _ in datas] for w in raw10]
        frames15 = [await raw15.recv_data() for _ in datas]
        for frames, bits in [(frames10[0], 10), (frames10[1], 10), (frames15, 15)]:
            for f, p, is_large in zip(frames, plain_frames, large, strict=True):
                assert f.opcode == OP_TEXT and f.fin
                if is_large:
                    assert f.rsv == RSV1, "a large publication came uncompressed"
                    assert len(f.payload) < len(p.payload)
                    assert inflate(f.payload, bits) == p.payload
                else:
                    assert f.rsv == 0, "a publication below the minimum size came compressed"
                    assert f.payload == p.payload
        # one compressed frame per window: both 10-bit subscribers got the same bytes
        for a, b in zip(frames10[0], frames10[1], strict=True):
            assert (a.rsv, a.payload) == (b.rsv, b.payload)
    assert cnode.alive(), cnode.output_tail()


async def test_minimum_size_boundary(cnode: NodeProcess) -> None:
    """A publication frame of 255 bytes goes plain, one of 256 bytes compressed."""
    ch = unique("edge")
    async with (
        raw_client(cnode.port, "permessage-deflate") as sub,
        raw_client(cnode.port) as publisher,
    ):
        await raw_sub(sub, ch)
        await raw_pub(publisher, ch, "")
        f = await sub.recv_data()
        assert f.rsv == 0
        base = len(f.payload)  # the frame of an empty string; seq keeps its one digit below
        for cid, size in [(3, 255), (4, 256), (5, 257)]:
            await raw_pub(publisher, ch, "a" * (size - base), cid=cid)
            f = await sub.recv_data()
            if size < 256:
                assert f.rsv == 0 and len(f.payload) == size
            else:
                assert f.rsv == RSV1, f"{size}-byte publication not compressed"
                assert len(inflate(f.payload, 15)) == size


async def test_min_size_and_level_options(node_factory: Any) -> None:
    """--compression-min-size moves the threshold; --compression-level 0 stores."""
    n = node_factory(
        args=["--compression", "--compression-min-size", "1000", "--compression-level", "0"]
    )
    ch = unique("opts")
    async with (
        raw_client(n.port, "permessage-deflate") as sub,
        raw_client(n.port) as publisher,
    ):
        await raw_sub(sub, ch)
        await raw_pub(publisher, ch, "b" * 700)
        f = await sub.recv_data()
        assert f.rsv == 0 and json.loads(f.payload)["data"] == "b" * 700
        await raw_pub(publisher, ch, "b" * 1500, cid=3)
        f = await sub.recv_data()
        assert f.rsv == RSV1
        message = inflate(f.payload, 15)
        assert json.loads(message)["data"] == "b" * 1500
        # level 0: stored blocks, no smaller than the message
        assert len(f.payload) >= len(message)


# --------------------------------------------------------------------------
# 3. one compression per publication, in this process
# --------------------------------------------------------------------------


async def test_a_publication_is_compressed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastws.deflate
    from fastws import App, Config

    app = App(Config(compression=True))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    url = f"ws://{HOST}:{node.port}/ws"
    ch = unique("once")
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = await asyncio.gather(
                *(stack.enter_async_context(proto_client(url)) for _ in range(50))
            )
            for c in clients:
                assert response_extensions(c.ws) == REQUIRED
            await asyncio.gather(*(c.sub(ch) for c in clients))
            assert app.hub.subscriber_count(ch) == 50
            assert app.hub.deflate_bits(ch) == [15]

            calls: list[tuple[int, int]] = []
            real = fastws.deflate.compress

            def counting(message: bytes, window_bits: int, level: int) -> bytes:
                calls.append((window_bits, level))
                return real(message, window_bits, level)

            monkeypatch.setattr(fastws.deflate, "compress", counting)
            datas = [big_data(i) for i in range(10)]
            seqs = [await app.publish(ch, d) for d in datas]
            assert calls == [(15, 6)] * 10

            expected = [{"ch": ch, "seq": s, "data": d} for s, d in zip(seqs, datas, strict=True)]

            async def collect(c: Any) -> list[dict[str, Any]]:
                return [await c.next_pub(ch) for _ in datas]

            got = await asyncio.gather(*(collect(c) for c in clients))
            for g in got:
                assert g == expected
            # reading them cost no compression either
            assert len(calls) == 10
    finally:
        await asyncio.wait_for(node.stop(drain_period=0), 10)


async def test_compression_follows_the_windows_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """One compression per window in use on the channel; none when no subscriber deflates."""
    import fastws.deflate
    from fastws import App, Config

    app = App(Config(compression=True))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    url = f"ws://{HOST}:{node.port}/ws"
    ch = unique("windows")
    calls: list[int] = []
    real = fastws.deflate.compress

    def counting(message: bytes, window_bits: int, level: int) -> bytes:
        calls.append(window_bits)
        return real(message, window_bits, level)

    async def wait_for_bits(want: list[int]) -> None:
        deadline = time.monotonic() + 5
        while app.hub.deflate_bits(ch) != want:
            assert time.monotonic() < deadline, app.hub.deflate_bits(ch)
            await asyncio.sleep(0.02)

    try:
        async with contextlib.AsyncExitStack() as stack:
            plain = await stack.enter_async_context(proto_client(url, compression=None))
            await plain.sub(ch)
            async with (
                proto_client(url) as d1,
                proto_client(url) as d2,
                raw_client(node.port, "permessage-deflate; server_max_window_bits=10") as r10,
            ):
                await d1.sub(ch)
                await d2.sub(ch)
                await raw_sub(r10, ch)
                assert app.hub.deflate_bits(ch) == [10, 15]
                monkeypatch.setattr(fastws.deflate, "compress", counting)

                data = big_data(1)
                seq = await app.publish(ch, data)
                assert sorted(calls) == [10, 15]
                want = {"ch": ch, "seq": seq, "data": data}
                assert await d1.next_pub(ch) == want
                assert await d2.next_pub(ch) == want
                f = await r10.recv_data()
                assert f.rsv == RSV1 and json.loads(inflate(f.payload, 10)) == want

                calls.clear()
                seq2 = await app.publish(ch, small_data(2))
                assert calls == []  # below the minimum size
                f = await r10.recv_data()
                assert f.rsv == 0 and json.loads(f.payload)["seq"] == seq2
                for c in (d1, d2):
                    assert (await c.next_pub(ch))["seq"] == seq2
            # the deflating subscribers are gone: nothing is compressed any more
            await wait_for_bits([])
            calls.clear()
            seq3 = await app.publish(ch, big_data(3))
            assert calls == []
            assert [(await plain.next_pub(ch))["seq"] for _ in range(3)] == [seq, seq2, seq3]
    finally:
        await asyncio.wait_for(node.stop(drain_period=0), 10)


async def test_large_publications_in_one_turn_keep_their_order() -> None:
    """Frames past the direct-write size, compressed or not, stay in publication order."""
    from fastws import App, Config

    app = App(Config(compression=True))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    url = f"ws://{HOST}:{node.port}/ws"
    ch = unique("huge")
    datas: list[Any] = [
        small_data(0),
        random_text(200_000),  # compresses to ~100 KB: past the direct-write size
        small_data(2),
        "abc" * 100_000,  # 300 KB plain, a few hundred bytes compressed
        big_data(4),
        small_data(5),
    ]
    try:
        async with (
            proto_client(url) as d1,
            proto_client(url) as d2,
            proto_client(url, compression=None) as plain,
            raw_client(node.port, "permessage-deflate; server_max_window_bits=10") as r10,
        ):
            for c in (d1, d2, plain):
                await c.sub(ch)
            await raw_sub(r10, ch)
            seqs = [await app.publish(ch, d) for d in datas]  # no wait in between
            expected = [{"ch": ch, "seq": s, "data": d} for s, d in zip(seqs, datas, strict=True)]
            for c in (d1, d2, plain):
                assert [await c.next_pub(ch) for _ in datas] == expected
            frames = [await r10.recv_data() for _ in datas]
            assert [f.rsv for f in frames] == [0, RSV1, 0, RSV1, RSV1, 0]
            assert len(frames[1].payload) > 65536
            got = [json.loads(inflate(f.payload, 10) if f.rsv else f.payload) for f in frames]
            assert got == expected
    finally:
        await asyncio.wait_for(node.stop(drain_period=0), 10)


# --------------------------------------------------------------------------
# 4. compressed messages from clients
# --------------------------------------------------------------------------


async def test_websockets_client_publishes_compressed(cnode: NodeProcess) -> None:
    ch = unique("up")
    data = {"text": "compress me " * 2000, "blob": random_text(3000)}
    async with (
        proto_client(cnode.ws_url()) as publisher,
        proto_client(cnode.ws_url(), compression=None) as sub,
    ):
        # websockets compresses every message once the extension is on
        assert [e.name for e in publisher.ws.protocol.extensions] == ["permessage-deflate"]
        await sub.sub(ch)
        seq = await publisher.pub(ch, data)
        assert await sub.next_pub(ch) == {"ch": ch, "seq": seq, "data": data}


WINDOW_OFFER = "permessage-deflate; client_max_window_bits"


async def test_raw_compressed_text_is_accepted(cnode: NodeProcess) -> None:
    ch = unique("rawup")
    data = {"words": "lorem ipsum " * 500, "n": 7}
    async with (
        raw_client(cnode.port, WINDOW_OFFER) as publisher,
        raw_client(cnode.port) as sub,
    ):
        assert publisher.extensions == REQUIRED
        # a compressed command, small and large
        await publisher.send_frame(
            OP_TEXT, deflate_raw(json.dumps({"op": "sub", "ch": ch, "id": 1}).encode()), rsv=RSV1
        )
        reply = await publisher.recv_json()
        assert reply["id"] == 1 and reply["ok"] is True, reply
        await raw_sub(sub, ch, cid=3)
        # client window of 9 bits: any client window is fine without context takeover
        seq, f = await pub_own(publisher, ch, data, compress_bits=9)
        # the publisher's own publication comes compressed (it is large)
        assert f.rsv == RSV1
        pub = json.loads(inflate(f.payload, 15))
        assert pub == {"ch": ch, "seq": seq, "data": data}
        f = await sub.recv_data()
        assert f.rsv == 0 and f.json() == pub


async def test_raw_compressed_message_with_a_final_block(cnode: NodeProcess) -> None:
    """RFC 7692 7.2.3.3: a message may end with a BFINAL block (Z_FINISH), tail and all."""
    ch = unique("final")
    data = {"final": "block " * 200}
    command = json.dumps({"op": "pub", "ch": ch, "data": data, "id": 2}).encode()
    stream = zlib.compressobj(6, zlib.DEFLATED, -15)
    finished = stream.compress(command) + stream.flush(zlib.Z_FINISH)
    async with raw_client(cnode.port, "permessage-deflate") as ws, raw_client(cnode.port) as sub:
        await raw_sub(sub, ch)
        await ws.send_frame(OP_TEXT, finished, rsv=RSV1)
        reply = await ws.recv_json()
        assert reply.get("id") == 2 and reply.get("ok") is True, reply
        f = await sub.recv_data()
        assert f.json() == {"ch": ch, "seq": reply["seq"], "data": data}


async def test_raw_compressed_empty_message(cnode: NodeProcess) -> None:
    """An empty compressed TEXT message is an empty command: bad_request, connection open."""
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        await ws.send_frame(OP_TEXT, deflate_raw(b""), rsv=RSV1)
        f = await ws.recv_data()
        assert f.opcode == OP_TEXT
        assert f.json()["error"]["code"] == "bad_request"
        await raw_sub(ws, unique("after-empty"))


async def test_fragmented_compressed_message(cnode: NodeProcess) -> None:
    ch = unique("frag")
    data = {"payload": "fragmented and compressed " * 300, "r": random_text(500)}
    command = json.dumps({"op": "pub", "ch": ch, "data": data, "id": 9}).encode()
    compressed = deflate_raw(command)
    third = len(compressed) // 3
    parts = [compressed[:third], compressed[third : 2 * third], compressed[2 * third :]]
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        await raw_sub(ws, ch)
        await ws.send_frame(OP_TEXT, parts[0], fin=False, rsv=RSV1)
        await ws.send_frame(OP_PING, b"in between")  # control frames may come between
        await ws.send_frame(OP_CONT, parts[1], fin=False)
        await ws.send_frame(OP_CONT, parts[2], fin=True)
        reply = pub = None
        while reply is None or pub is None:
            f = await ws.recv_frame()
            if f.opcode == OP_PONG:
                assert f.payload == b"in between"
                continue
            assert f.opcode == OP_TEXT, f
            m = json.loads(inflate(f.payload, 15) if f.rsv == RSV1 else f.payload)
            if "id" in m:
                reply = m
            else:
                pub = m
        assert reply["ok"] is True, reply
        assert pub == {"ch": ch, "seq": reply["seq"], "data": data}


async def test_compressed_message_inflating_to_exactly_the_limit_is_accepted(
    cnode: NodeProcess,
) -> None:
    ch = unique("limit")
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        head = json.dumps({"op": "pub", "ch": ch, "id": 5, "data": ""}).encode()
        filler = MAX_MESSAGE_SIZE - len(head)
        command = json.dumps({"op": "pub", "ch": ch, "id": 5, "data": "q" * filler}).encode()
        assert len(command) == MAX_MESSAGE_SIZE
        await ws.send_frame(OP_TEXT, deflate_raw(command), rsv=RSV1)
        f = await ws.recv_data()
        assert f.opcode == OP_TEXT and f.rsv == 0
        reply = f.json()
        assert reply.get("id") == 5 and reply.get("ok") is True, reply


@pytest.mark.parametrize("fragmented", [False, True])
async def test_compression_bomb_is_closed_1009(cnode: NodeProcess, fragmented: bool) -> None:
    bomb = deflate_raw(b"\x00" * 1_000_000, level=9)
    assert len(bomb) < 2000
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        if fragmented:
            half = len(bomb) // 2
            await ws.send_frame(OP_TEXT, bomb[:half], fin=False, rsv=RSV1)
            await ws.send_frame(OP_CONT, bomb[half:], fin=True)
        else:
            await ws.send_frame(OP_TEXT, bomb, rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1009, frames
    # one byte over the limit is too big as well
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        await ws.send_frame(OP_TEXT, deflate_raw(b" " * (MAX_MESSAGE_SIZE + 1)), rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1009, frames
    assert cnode.alive(), cnode.output_tail()


async def test_websockets_client_sees_1009_for_a_bomb(cnode: NodeProcess) -> None:
    """The same as websockets sees it: it compresses a 1 MB message to almost nothing."""
    async with connect(cnode.ws_url(), open_timeout=5, close_timeout=2, max_size=None) as ws:
        assert response_extensions(ws) == REQUIRED
        await asyncio.wait_for(ws.recv(), RECV)  # welcome
        await ws.send(" " * 1_000_000)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(ws.recv(), RECV)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize(
    "case",
    [
        "rsv1-on-continuation",
        "rsv1-on-both-fragments",
        "rsv1-on-ping",
        "rsv2",
        "rsv3",
        "corrupt-data",
        "corrupt-fragmented",
        "rsv1-inside-fragmented",
    ],
)
async def test_protocol_errors_after_negotiation_close_1002(cnode: NodeProcess, case: str) -> None:
    good = deflate_raw(b'{"op": "sub", "ch": "x", "id": 1}')
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        assert ws.extensions == REQUIRED
        if case == "rsv1-on-continuation":
            await ws.send_frame(OP_TEXT, b'{"op": "sub", ', fin=False)
            await ws.send_frame(OP_CONT, b'"ch": "x", "id": 1}', fin=True, rsv=RSV1)
        elif case == "rsv1-on-both-fragments":
            await ws.send_frame(OP_TEXT, good[:5], fin=False, rsv=RSV1)
            await ws.send_frame(OP_CONT, good[5:], fin=True, rsv=RSV1)
        elif case == "rsv1-on-ping":
            await ws.send_frame(OP_PING, deflate_raw(b"ping"), rsv=RSV1)
        elif case == "rsv2":
            await ws.send_frame(OP_TEXT, good, rsv=RSV1 | 2)
        elif case == "rsv3":
            await ws.send_frame(OP_TEXT, good, rsv=1)
        elif case == "corrupt-data":
            # BFINAL=1 with the reserved block type 3: not deflate
            await ws.send_frame(OP_TEXT, b"\x07garbage that is not deflate", rsv=RSV1)
        elif case == "corrupt-fragmented":
            await ws.send_frame(OP_TEXT, b"\x07garb", fin=False, rsv=RSV1)
            await ws.send_frame(OP_CONT, b"age that is not deflate", fin=True)
        elif case == "rsv1-inside-fragmented":
            await ws.send_frame(OP_TEXT, b'{"op": "sub", ', fin=False)
            await ws.send_frame(OP_TEXT, good, rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1002, frames
    assert cnode.alive(), cnode.output_tail()


async def test_rsv1_without_agreement_closes_1002(
    cnode: NodeProcess, plain_node: NodeProcess
) -> None:
    message = deflate_raw(b'{"op": "sub", "ch": "x", "id": 1}')
    # compressing node, no offer
    async with raw_client(cnode.port) as ws:
        await ws.send_frame(OP_TEXT, message, rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1002, frames
    # compressing node, offer declined
    async with raw_client(cnode.port, "permessage-deflate; server_max_window_bits=8") as ws:
        assert ws.extensions is None
        await ws.send_frame(OP_TEXT, message, rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1002, frames
    # node without compression, offer made
    async with raw_client(plain_node.port, "permessage-deflate") as ws:
        assert ws.extensions is None
        await ws.send_frame(OP_BINARY, message, rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1002, frames


async def test_compressed_invalid_utf8_text_closes_1007(cnode: NodeProcess) -> None:
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        await ws.send_frame(OP_TEXT, deflate_raw(b'{"op": "sub", "ch": "\xff\xfe"}'), rsv=RSV1)
        code, frames = await ws.wait_close()
        assert code == 1007, frames


async def test_compressed_binary_is_a_bad_request(cnode: NodeProcess) -> None:
    async with raw_client(cnode.port, "permessage-deflate") as ws:
        await ws.send_frame(OP_BINARY, deflate_raw(b'{"op": "sub", "ch": "b", "id": 1}'), rsv=RSV1)
        f = await ws.recv_data()
        assert f.opcode == OP_TEXT and f.json()["error"]["code"] == "bad_request"
        await raw_sub(ws, unique("after-binary"), cid=2)


# --------------------------------------------------------------------------
# 5. library mode
# --------------------------------------------------------------------------


async def test_library_echo_with_compression() -> None:
    from fastws import App, Config, Handler

    class Echo(Handler):
        def on_message(self, message: str | bytes) -> None:
            self.send(message)

    app = App(Config(compression=True, compression_min_size=0))
    app.mount("/", Echo)
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    messages: list[str | bytes] = [
        "hello",
        "",
        "h\u00e9llo \U0001f600" * 50,
        "x" * 40_000,
        random_text(5000),
        b"\x00\x01\x02\xff",
        b"",
        bytes(range(256)) * 100,
        os.urandom(10_000),
    ]
    try:
        async with connect(f"ws://{HOST}:{node.port}/", open_timeout=5, close_timeout=2) as ws:
            assert response_extensions(ws) == REQUIRED
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            for m in messages:
                await ws.send(m)
                got = await asyncio.wait_for(ws.recv(), RECV)
                assert type(got) is type(m) and got == m
            # pipelined
            for m in messages:
                await ws.send(m)
            assert [await asyncio.wait_for(ws.recv(), RECV) for _ in messages] == messages

        # raw, 10-bit window: every echo is compressed (minimum size 0) within that window
        async with raw_client(
            node.port, "permessage-deflate; server_max_window_bits=10", path="/", welcome=False
        ) as raw:
            assert raw.extensions == REQUIRED + "; server_max_window_bits=10"
            block = random_text(1500).encode()
            for opcode, m in [
                (OP_TEXT, b""),
                (OP_TEXT, b"short"),
                (OP_TEXT, block + block),
                (OP_BINARY, os.urandom(3000)),
                (OP_BINARY, block * 3),
            ]:
                await raw.send_frame(opcode, deflate_raw(m), rsv=RSV1)
                f = await raw.recv_data()
                assert (f.opcode, f.rsv, f.fin) == (opcode, RSV1, True)
                assert inflate(f.payload, 10) == m
            # an uncompressed message from the client is fine too, and answered compressed
            await raw.send_frame(OP_TEXT, b"plain")
            f = await raw.recv_data()
            assert f.rsv == RSV1 and inflate(f.payload, 10) == b"plain"
    finally:
        await asyncio.wait_for(node.stop(drain_period=0), 10)
