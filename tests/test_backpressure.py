"""Slow consumers: a subscriber that stops reading is closed with 1013, not buffered forever.

Loopback sockets buffer megabytes in the kernel, so "slow" here means a
raw-socket client with a small receive buffer that stops calling recv()
after subscribing; the node is then published to until the kernel buffers
and the node's per-connection bound (``--max-send-buffer``) are both full.
A fast subscriber on the same channel must receive every publication, in
order, meanwhile; the node's resident memory must stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    OP_CLOSE,
    OP_TEXT,
    NodeProcess,
    PeerClosed,
    RawWS,
    ascrape,
    metric,
    rss_kb,
    unique,
)
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

pytestmark = pytest.mark.timeout(90)

RSS_BOUND_MB = 64
NO_RATE_LIMIT = ["--rate-limit", "1000000000", "--rate-burst", "1000000000"]


class Peer(WSListener):  # type: ignore[misc]
    """A picows client that reads everything at once: replies by id, publication seqs."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.seqs: list[int] = []
        self.bad_data: list[Any] = []
        self.expect_data: Any = None
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.close_code: int | None = None
        self.disconnected = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if "seq" in msg and "data" in msg and "id" not in msg:
            self.seqs.append(msg["seq"])
            if self.expect_data is not None and msg["data"] != self.expect_data:
                self.bad_data.append(msg["seq"])
        elif "id" in msg:
            w = self.waiters.pop(msg["id"], None)
            if w is not None and not w.done():
                w.set_result(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    async def request(self, msg: dict[str, Any], timeout: float = 10.0) -> Any:
        assert self.transport is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiters[msg["id"]] = fut
        self.transport.send(WSMsgType.TEXT, json.dumps(msg).encode())
        return await asyncio.wait_for(fut, timeout)


async def peer(node: NodeProcess) -> Peer:
    _, p = await ws_connect(Peer, node.ws_url(), max_frame_size=16 * 1024 * 1024)
    return p


async def slow_subscriber(node: NodeProcess, ch: str) -> RawWS:
    slow = await RawWS.open(node.port, rcvbuf=4096)
    await slow.welcome()
    r = await slow.request({"op": "sub", "ch": ch, "id": 1})
    assert r.get("ok") is True, r
    return slow


class Flood:
    """Publishes to a channel in batches, keeping a fast subscriber in step."""

    def __init__(self, node: NodeProcess, publisher: Peer, fast: Peer, ch: str, size: int) -> None:
        self.node, self.pub, self.fast, self.ch = node, publisher, fast, ch
        self.data = "x" * size
        self.frame = json.dumps({"op": "pub", "ch": ch, "data": self.data}).encode()
        self.size = size
        self.published = 0
        self.rss0 = rss_kb(node.pid)
        self.rss_max = self.rss0
        self.sync_id = 0
        fast.expect_data = self.data

    async def batch(self, n: int, max_lag_bytes: int = 256 * 1024) -> None:
        assert self.pub.transport is not None
        for _ in range(n - 1):
            self.pub.transport.send(WSMsgType.TEXT, self.frame)
        self.sync_id += 1
        r = await self.pub.request(
            {"op": "pub", "ch": self.ch, "data": self.data, "id": self.sync_id}
        )
        assert r.get("ok") is True, r
        self.published = r["seq"]
        # keep the fast subscriber well within its own bound
        max_lag = max(1, max_lag_bytes // self.size)
        deadline = time.monotonic() + 20
        while len(self.fast.seqs) < self.published - max_lag:
            assert time.monotonic() < deadline, (
                f"fast subscriber stuck at {len(self.fast.seqs)} of {self.published}; "
                f"close code {self.fast.close_code}"
            )
            await asyncio.sleep(0.002)
        self.rss_max = max(self.rss_max, rss_kb(self.node.pid))

    async def until_slow_closed(self, batch: int, max_bytes: int) -> float | None:
        """Publish until the node reports a slow-consumer close; when it did (monotonic)."""
        while self.published * self.size < max_bytes:
            await self.batch(batch)
            samples = await ascrape(self.node.port)
            if metric(samples, "fastws_slow_consumer_closes_total") >= 1:
                return time.monotonic()
        return None

    async def fast_has_everything(self) -> None:
        deadline = time.monotonic() + 20
        while len(self.fast.seqs) < self.published and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        seqs = self.fast.seqs
        assert seqs == list(range(1, self.published + 1)), (
            f"fast subscriber: {len(seqs)} of {self.published}, in order: "
            f"{seqs == sorted(seqs)}, close code {self.fast.close_code}"
        )
        assert not self.fast.bad_data, self.fast.bad_data[:5]
        assert self.fast.close_code is None


async def read_to_close(slow: RawWS, ch: str, timeout: float) -> tuple[int | None, list[int]]:
    """Read everything the slow client was sent; (close code or None, publication seqs)."""
    seqs: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            f = await slow.recv_frame(deadline - time.monotonic())
            if f.opcode == OP_CLOSE:
                with contextlib.suppress(OSError):
                    await slow.send_frame(OP_CLOSE, f.payload[:2])
                return f.close_code, seqs
            assert f.opcode == OP_TEXT and f.fin, f
            m = f.json()
            assert m.get("ch") == ch, m
            seqs.append(m["seq"])
    except PeerClosed:
        return None, seqs


@pytest.mark.parametrize("size", [1000, 100_000], ids=["1KB", "100KB"])
async def test_slow_consumer_closed_1013_fast_one_gets_everything(
    node_factory: Callable[..., NodeProcess], size: int
) -> None:
    node = node_factory(
        args=[*NO_RATE_LIMIT, "--max-message-size", "1000000", "--close-timeout", "5"]
    )
    ch = unique("slow")
    slow = await slow_subscriber(node, ch)
    fast, publisher = await peer(node), await peer(node)
    try:
        r = await fast.request({"op": "sub", "ch": ch, "id": 1})
        assert r.get("ok") is True, r
        flood = Flood(node, publisher, fast, ch, size)
        # kernel buffers (~3 MB here) + the 1 MB bound: 24 MB is plenty
        closed_at = await flood.until_slow_closed(batch=max(4, 200_000 // size), max_bytes=24 << 20)
        grown = (flood.rss_max - flood.rss0) / 1024
        assert closed_at is not None, (
            f"no slow-consumer close after {flood.published} publications of {size} B "
            f"({flood.published * size >> 20} MB) to a client that reads nothing; "
            f"node RSS grew {grown:.1f} MB"
        )
        # the slow client resumes reading at once: whatever it was sent, then 1013
        code, seqs = await read_to_close(slow, ch, timeout=10)
        assert code == 1013, (code, len(seqs))
        assert seqs == list(range(1, len(seqs) + 1)), "the slow client's stream has a gap inside"
        # the close frame was the last thing sent; the node then ends the TCP connection
        with pytest.raises(PeerClosed):
            extra = await slow.recv_frame(timeout=3)
            pytest.fail(f"a frame after the close frame: {extra!r}")
        # nothing more is queued for it: keep publishing, memory stays flat
        for _ in range(5):
            await flood.batch(max(4, 200_000 // size))
        grown = (flood.rss_max - flood.rss0) / 1024
        print(
            f"\n{size} B x {flood.published}: node RSS grew {grown:.1f} MB, slow client got "
            f"{len(seqs)} publications then 1013"
        )
        assert grown < RSS_BOUND_MB, f"node RSS grew {grown:.1f} MB"
        await flood.fast_has_everything()
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_slow_consumer_closes_total") == 1, samples
        assert metric(samples, "fastws_connections_open") == 2, samples
    finally:
        slow.close()
        for p in (fast, publisher):
            if p.transport is not None:
                p.transport.disconnect()


async def test_slow_consumer_that_never_reads_is_aborted_after_close_timeout(
    node_factory: Callable[..., NodeProcess],
) -> None:
    close_timeout = 1.0
    node = node_factory(args=[*NO_RATE_LIMIT, "--close-timeout", str(close_timeout)])
    ch = unique("slow")
    slow = await slow_subscriber(node, ch)
    fast, publisher = await peer(node), await peer(node)
    try:
        await fast.request({"op": "sub", "ch": ch, "id": 1})
        flood = Flood(node, publisher, fast, ch, 1000)
        closed_at = await flood.until_slow_closed(batch=200, max_bytes=24 << 20)
        assert closed_at is not None, f"no slow-consumer close after {flood.published} pubs"
        # the client never answers the close (it cannot even read it): cut after close-timeout
        while True:
            samples = await ascrape(node.port)
            if metric(samples, "fastws_connections_open") == 2:
                break
            waited = time.monotonic() - closed_at
            assert waited < close_timeout + 2.0, (
                f"slow client still counted open {waited:.1f} s after its 1013 "
                f"(close-timeout {close_timeout})"
            )
            await asyncio.sleep(0.05)
        waited = time.monotonic() - closed_at
        print(f"\nslow client cut {waited:.2f} s after its 1013 was seen")
        assert waited >= close_timeout - 0.3, (
            f"cut {waited:.2f} s after the 1013: before close-timeout ({close_timeout} s)"
        )
        # reading now finds the stream cut: reset or EOF, never a clean end of the handshake
        code, seqs = await read_to_close(slow, ch, timeout=10)
        assert code in (None, 1013), code
        assert seqs == list(range(1, len(seqs) + 1))
        await flood.fast_has_everything()
        assert (flood.rss_max - flood.rss0) / 1024 < RSS_BOUND_MB
    finally:
        slow.close()
        for p in (fast, publisher):
            if p.transport is not None:
                p.transport.disconnect()


async def test_many_slow_consumers_on_one_channel(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Ten stalled subscribers are all closed with 1013; a fast one misses nothing."""
    node = node_factory(
        args=[*NO_RATE_LIMIT, "--max-send-buffer", "131072", "--close-timeout", "5"]
    )
    ch = unique("slow")
    slows = [await slow_subscriber(node, ch) for _ in range(10)]
    fast, publisher = await peer(node), await peer(node)
    try:
        await fast.request({"op": "sub", "ch": ch, "id": 1})
        flood = Flood(node, publisher, fast, ch, 4000)
        while flood.published * 4000 < (24 << 20):
            await flood.batch(10, max_lag_bytes=64 * 1024)
            if metric(await ascrape(node.port), "fastws_slow_consumer_closes_total") >= 10:
                break
        codes = await asyncio.gather(*(read_to_close(s, ch, 10) for s in slows))
        assert [c for c, _ in codes] == [1013] * 10, [c for c, _ in codes]
        await flood.fast_has_everything()
        grown = (flood.rss_max - flood.rss0) / 1024
        assert grown < RSS_BOUND_MB, f"node RSS grew {grown:.1f} MB"
    finally:
        for s in slows:
            s.close()
        for p in (fast, publisher):
            if p.transport is not None:
                p.transport.disconnect()
