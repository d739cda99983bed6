"""Keepalive: silent peers are pinged, then cut; peers that answer stay.

The node sweeps its connections every min(interval, timeout)/4 s (at least
0.05 s), so every bound below allows that much slack on top of the
configured figure, plus scheduling noise on a busy two-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from conftest import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    NodeProcess,
    PeerClosed,
    RawWS,
    ascrape,
    metric,
    proto_client,
    unique,
)
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

pytestmark = pytest.mark.timeout(60)

SLACK = 0.6  # scheduling noise allowed on top of interval/timeout + one sweep


def hb_node(factory: Callable[..., NodeProcess], interval: float, timeout: float) -> NodeProcess:
    return factory(args=["--ping-interval", str(interval), "--ping-timeout", str(timeout)])


@pytest.mark.parametrize(
    ("interval", "timeout"), [(1.0, 1.0), (0.5, 1.5), (1.5, 0.5)], ids=["1+1", "0.5+1.5", "1.5+0.5"]
)
async def test_silent_peer_is_pinged_then_cut_without_close_frame(
    node_factory: Callable[..., NodeProcess], interval: float, timeout: float
) -> None:
    sweep = max(0.05, min(interval, timeout) / 4)
    node = hb_node(node_factory, interval, timeout)
    before = await ascrape(node.port)

    ws = await RawWS.open(node.port)
    t_open = time.monotonic()
    try:
        await ws.welcome()
        # the client never sends a frame: the first thing after the welcome is a PING
        f = await ws.recv_frame(timeout=interval + sweep + 3)
        t_ping = time.monotonic()
        assert f.opcode == OP_PING, f"expected a PING, got {f!r}"
        quiet = t_ping - t_open
        assert interval - 0.1 <= quiet <= interval + sweep + SLACK, f"PING after {quiet:.2f} s"

        # no answer: the node cuts the TCP connection, with no close frame
        with pytest.raises(PeerClosed):
            while True:
                g = await ws.recv_frame(timeout=timeout + sweep + 3)
                assert g.opcode not in (OP_CLOSE,), f"expected an abort, got a close: {g!r}"
                assert g.opcode == OP_PING, f"unexpected frame while waiting to be cut: {g!r}"
        waited = time.monotonic() - t_ping
        assert timeout - 0.1 <= waited <= timeout + sweep + SLACK, f"cut {waited:.2f} s after PING"
    finally:
        ws.close()

    after = await ascrape(node.port)
    assert metric(after, "fastws_pings_sent_total") - metric(before, "fastws_pings_sent_total") >= 1
    assert (
        metric(after, "fastws_ping_timeouts_total") - metric(before, "fastws_ping_timeouts_total")
        == 1
    ), after
    assert metric(after, "fastws_connections_open") == 0, after


async def test_raw_peer_that_answers_pings_stays_connected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = hb_node(node_factory, 0.5, 0.5)
    before = await ascrape(node.port)
    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        pings = 0
        end = time.monotonic() + 3.5
        while (left := end - time.monotonic()) > 0:
            try:
                f = await ws.recv_frame(timeout=left)
            except TimeoutError:
                break
            assert f.opcode == OP_PING, f"unexpected frame {f!r}"
            pings += 1
            await ws.send_frame(OP_PONG, f.payload)  # a pong, and nothing else, ever
        assert pings >= 3, f"only {pings} pings in 3.5 s with a 0.5 s interval"
        r = await ws.request({"op": "sub", "ch": unique("hb"), "id": 1})
        assert r.get("ok") is True, r
    finally:
        ws.close()
    after = await ascrape(node.port)
    assert metric(after, "fastws_ping_timeouts_total") == metric(
        before, "fastws_ping_timeouts_total"
    ), after


async def test_silent_websockets_client_stays_connected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """websockets answers pings by itself; with its own pings off it sends nothing else."""
    node = hb_node(node_factory, 0.5, 0.5)
    async with proto_client(node.ws_url(), ping_interval=None) as c:
        await asyncio.sleep(3.5)  # 7 intervals of silence from the application
        assert c.ws.close_code is None, (c.ws.close_code, node.output_tail())
        await c.sub(unique("hb"))
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_pings_sent_total") >= 3, samples
    assert metric(samples, "fastws_ping_timeouts_total") == 0, samples


class PongCounter(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[WSMsgType, bytes]] = []
        self.disconnected = False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.PING:
            self.frames.append((frame.msg_type, frame.get_payload_as_bytes()))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True


async def test_silent_picows_client_stays_connected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = hb_node(node_factory, 0.5, 0.5)
    transport, listener = await ws_connect(PongCounter, node.ws_url(), enable_auto_ping=False)
    try:
        await asyncio.sleep(3.5)
        assert not listener.disconnected, node.output_tail()
        samples = await ascrape(node.port)
        # picows answers pings itself and does not show them to the listener
        assert metric(samples, "fastws_pings_sent_total") >= 3, samples
        assert metric(samples, "fastws_ping_timeouts_total") == 0, samples
        transport.send(WSMsgType.TEXT, b'{"op":"sub","ch":"hb-picows","id":7}')
        for _ in range(100):
            if any(b'"id":7' in p for _, p in listener.frames):
                break
            await asyncio.sleep(0.02)
        assert any(b'"id":7' in p and b'"ok":true' in p for _, p in listener.frames), (
            listener.frames
        )
    finally:
        transport.disconnect()
        await transport.wait_disconnected()


async def test_chatty_peer_is_never_pinged(node_factory: Callable[..., NodeProcess]) -> None:
    """Pings go only to connections from which nothing arrived for ping-interval."""
    node = hb_node(node_factory, 1.0, 1.0)
    ch = unique("hb")
    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        for i in range(15):  # a command every 0.2 s for 3 s
            await ws.send_json({"op": "sub", "ch": ch, "id": i})
            f = await ws.recv_frame(timeout=2)
            assert f.opcode != OP_PING, f"pinged after {i} commands 0.2 s apart"
            assert f.json().get("id") == i, f
            await asyncio.sleep(0.2)
        # and nothing else is waiting
        with pytest.raises(TimeoutError):
            f = await ws.recv_frame(timeout=0.1)
            pytest.fail(f"unexpected frame {f!r}")
    finally:
        ws.close()


async def test_any_frame_answers_a_ping(node_factory: Callable[..., NodeProcess]) -> None:
    """A pinged peer that sends a command instead of a PONG is not cut."""
    interval, timeout = 0.8, 0.8
    node = hb_node(node_factory, interval, timeout)
    ch = unique("hb")
    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        answered = 0
        end = time.monotonic() + 4.0
        while (left := end - time.monotonic()) > 0:
            try:
                f = await ws.recv_frame(timeout=left)
            except TimeoutError:
                break
            if f.opcode == OP_PING:
                # answer with a command, never a PONG
                answered += 1
                await ws.send_json({"op": "sub", "ch": ch, "id": answered})
            else:
                assert f.opcode != OP_CLOSE, f"closed: {f.close_code}"
                assert f.json().get("ok") is True, f
        assert answered >= 2, answered
        r = await ws.request({"op": "unsub", "ch": ch, "id": 999})
        assert r.get("ok") is True, r
    finally:
        ws.close()
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_ping_timeouts_total") == 0, samples


async def test_ping_options_from_env(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(env={"FASTWS_PING_INTERVAL": "0.5", "FASTWS_PING_TIMEOUT": "0.5"})
    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        f = await ws.recv_frame(timeout=2)
        assert f.opcode == OP_PING, f
        t0 = time.monotonic()
        with pytest.raises(PeerClosed):
            while True:
                await ws.recv_frame(timeout=3)
        assert time.monotonic() - t0 < 0.5 + 0.125 + SLACK
    finally:
        ws.close()
