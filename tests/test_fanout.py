"""Fanout at scale: many picows subscribers on one channel, churn during a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    OP_PING,
    OP_PONG,
    OP_TEXT,
    NodeProcess,
    RawWS,
    ahttp_get,
    proto_client,
    unique,
    ws_frame,
)
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECT_CONCURRENCY = 64


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_nofile()


class Collector(WSListener):  # type: ignore[misc]
    """A picows client that records the welcome, replies and publications it gets."""

    def __init__(self) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.transport: WSTransport | None = None
        self.welcome: asyncio.Future[Any] = loop.create_future()
        self.replies: dict[Any, Any] = {}
        self.reply_waiters: dict[Any, asyncio.Future[Any]] = {}
        self.pubs: list[tuple[int, Any]] = []  # (seq, data) in arrival order
        self.other: list[Any] = []  # anything unexpected
        self.expected = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.disconnected: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        # set once the test decided to drop this client: frames that were
        # already in the read buffer are not counted
        self.left = False
        # set by the churn test: called after every publication
        self.on_pub: Callable[[Collector], None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.left:
            return
        mt = frame.msg_type
        if mt == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if mt != WSMsgType.TEXT or not frame.fin:
            self.other.append((mt, frame.fin, frame.get_payload_as_bytes()))
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if not isinstance(msg, dict):
            self.other.append(msg)
        elif "welcome" in msg and not self.welcome.done():
            self.welcome.set_result(msg)
        elif "id" in msg:
            self.replies[msg["id"]] = msg
            w = self.reply_waiters.pop(msg["id"], None)
            if w is not None and not w.done():
                w.set_result(msg)
        elif "seq" in msg and "ch" in msg:
            self.pubs.append((msg["seq"], msg.get("data")))
            if self.expected and len(self.pubs) >= self.expected and not self.done.done():
                self.done.set_result(None)
            if self.on_pub is not None:
                self.on_pub(self)
        else:
            self.other.append(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        if not self.done.done():
            self.done.set_result(None)  # stop waiting; the counts will tell

    def send_json(self, msg: Any) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, json.dumps(msg).encode())

    async def request(self, msg: dict[str, Any], timeout: float = 10.0) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.reply_waiters[msg["id"]] = fut
        self.send_json(msg)
        return await asyncio.wait_for(fut, timeout)


async def connect_collectors(url: str, n: int) -> list[Collector]:
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> Collector:
        async with sem:
            _, listener = await ws_connect(Collector, url, websocket_handshake_timeout=10)
            await asyncio.wait_for(listener.welcome, 10)
            return listener

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, Collector)]
    errors = [r for r in results if not isinstance(r, Collector)]
    if errors:
        await disconnect_all(clients)
        raise AssertionError(f"{len(errors)} of {n} connections failed; first: {errors[0]!r}")
    return clients


async def subscribe_all(clients: list[Collector], ch: str) -> None:
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY * 2)

    async def one(c: Collector) -> None:
        async with sem:
            r = await c.request({"op": "sub", "ch": ch, "id": 1})
            assert r.get("ok") is True, r

    await asyncio.gather(*(one(c) for c in clients))


async def disconnect_all(clients: list[Collector]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.disconnect(graceful=False)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            asyncio.gather(*(c.disconnected for c in clients), return_exceptions=True), 10
        )


def assert_complete(clients: list[Collector], n: int, data_of: Callable[[int], Any]) -> None:
    want = [(i, data_of(i)) for i in range(1, n + 1)]
    bad = []
    for idx, c in enumerate(clients):
        if c.pubs != want:
            got_seqs = [s for s, _ in c.pubs]
            bad.append(
                f"client #{idx}: got {len(c.pubs)} pubs; first seqs {got_seqs[:5]}, "
                f"last seqs {got_seqs[-5:]}; in order={got_seqs == sorted(got_seqs)}; "
                f"data ok={[d for _, d in c.pubs] == [d for _, d in want[: len(c.pubs)]]}; "
                f"close_code={c.close_code}; other={c.other[:3]!r}"
            )
        elif c.other:
            bad.append(f"client #{idx}: unexpected frames {c.other[:3]!r}")
    assert not bad, f"{len(bad)} of {len(clients)} subscribers incomplete:\n" + "\n".join(bad[:10])


@pytest.mark.timeout(120)
async def test_fanout_1000_subscribers_500_pubs(node: NodeProcess) -> None:
    n_subs, n_pubs = 1000, 500
    ch = unique("fan")
    url = node.ws_url()
    subs = await connect_collectors(url, n_subs)
    publisher: Collector | None = None
    try:
        await subscribe_all(subs, ch)
        for c in subs:
            c.expected = n_pubs
        _, publisher = await ws_connect(Collector, url, websocket_handshake_timeout=10)
        await asyncio.wait_for(publisher.welcome, 10)

        def data_of(i: int) -> Any:
            return {"n": i, "text": f"message number {i}"}

        ack_waiters = []
        for i in range(1, n_pubs + 1):
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            publisher.reply_waiters[i] = fut
            ack_waiters.append(fut)
            publisher.send_json({"op": "pub", "ch": ch, "data": data_of(i), "id": i})
        acks = await asyncio.wait_for(asyncio.gather(*ack_waiters), 60)
        assert all(a.get("ok") is True for a in acks), [a for a in acks if not a.get("ok")][:3]
        assert [a["seq"] for a in acks] == list(range(1, n_pubs + 1))

        await asyncio.wait_for(asyncio.gather(*(c.done for c in subs)), 60)
        assert_complete(subs, n_pubs, data_of)
        assert publisher.pubs == [], "the publisher is not subscribed"
        assert node.alive(), node.output_tail()
    finally:
        await disconnect_all(subs + ([publisher] if publisher else []))


@pytest.mark.timeout(120)
async def test_fanout_survives_churn(node: NodeProcess) -> None:
    n_subs, n_pubs, batch = 200, 300, 10
    ch = unique("churn")
    url = node.ws_url()
    clients = await connect_collectors(url, n_subs)
    publisher: Collector | None = None
    try:
        await subscribe_all(clients, ch)
        stayers = clients[::2]
        leavers = clients[1::2]
        for c in stayers:
            c.expected = n_pubs

        # Each leaver goes away once it has seen k publications, k spread over
        # the whole stream; even ones with a close frame, odd ones by
        # aborting the TCP connection (RST, no close frame).
        def make_leaver(k: int, clean: bool) -> Callable[[Collector], None]:
            def on_pub(c: Collector) -> None:
                if len(c.pubs) == k and c.transport is not None:
                    c.on_pub = None
                    c.left = True
                    if clean:
                        c.transport.send_close(WSCloseCode.OK)
                        c.transport.disconnect(graceful=True)
                    else:
                        c.transport.disconnect(graceful=False)

            return on_pub

        leave_at: dict[int, int] = {}
        for j, c in enumerate(leavers):
            k = 1 + (j * (n_pubs - 2)) // len(leavers)
            leave_at[j] = k
            c.on_pub = make_leaver(k, clean=(j % 2 == 0))
        # a few leave before the stream starts at all
        for c in leavers[:4]:
            c.on_pub = None
            c.left = True
            c.transport.disconnect(graceful=(leavers.index(c) % 2 == 0))  # type: ignore[union-attr]

        _, publisher = await ws_connect(Collector, url, websocket_handshake_timeout=10)
        await asyncio.wait_for(publisher.welcome, 10)

        def data_of(i: int) -> Any:
            return [i, "x" * (i % 50)]

        for start in range(1, n_pubs + 1, batch):
            waiters = []
            for i in range(start, min(start + batch, n_pubs + 1)):
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                publisher.reply_waiters[i] = fut
                waiters.append(fut)
                publisher.send_json({"op": "pub", "ch": ch, "data": data_of(i), "id": i})
            acks = await asyncio.wait_for(asyncio.gather(*waiters), 20)
            assert [a.get("seq") for a in acks] == list(range(start, start + len(waiters))), acks
            await asyncio.sleep(0.005)  # let the leavers act between batches

        await asyncio.wait_for(asyncio.gather(*(c.done for c in stayers)), 30)
        assert_complete(stayers, n_pubs, data_of)

        # leavers did leave (sanity of the test itself), and got an in-order prefix
        await asyncio.wait_for(
            asyncio.gather(*(c.disconnected for c in leavers), return_exceptions=True), 15
        )
        for j, c in enumerate(leavers):
            seqs = [s for s, _ in c.pubs]
            assert seqs == list(range(1, len(seqs) + 1)), seqs[:10]
            if j >= 4:  # left mid-stream, right after its k-th publication
                assert len(seqs) == leave_at[j], (j, len(seqs), leave_at[j])
            else:  # left before the stream
                assert seqs == [], (j, seqs[:5])

        # the node is fine
        assert node.alive(), node.output_tail()
        assert (await ahttp_get(node.port, "/healthz")).status == 200
        async with proto_client(url) as newcomer:
            r = await newcomer.sub(ch)
            assert r["seq"] == n_pubs, r
            seq = await newcomer.pub(ch, "after churn")
            assert seq == n_pubs + 1
            m = await newcomer.next_pub(ch)
            assert m == {"ch": ch, "seq": n_pubs + 1, "data": "after churn"}, m
        # ... and so do the stayers
        await asyncio.sleep(0.2)
        for c in stayers:
            assert c.pubs[-1] == (n_pubs + 1, "after churn"), c.pubs[-3:]
    finally:
        await disconnect_all(clients + ([publisher] if publisher else []))


async def test_a_pong_is_not_queued_behind_the_batch_of_its_read(node: NodeProcess) -> None:
    """Frames queued during a read leave at the end of the loop turn; a pong leaves at once.

    One TCP write carries a sub, a pub with an id and a ping: the sub reply,
    the publication and the pub reply are batched, the pong is written
    straight away, so it arrives first although it was asked for last.
    """
    ws = await RawWS.open(node.port)
    try:
        assert "welcome" in (await ws.recv_msg()).json()
        ch = unique("pong")
        commands = [
            {"op": "sub", "ch": ch, "id": 1},
            {"op": "pub", "ch": ch, "data": "x", "id": 2},
        ]
        frames = [ws_frame(OP_TEXT, json.dumps(c).encode()) for c in commands]
        await ws.send_raw(b"".join(frames) + ws_frame(OP_PING, b"now"))
        first = await ws.recv_frame()
        assert (first.opcode, first.payload) == (OP_PONG, b"now")
        rest = [(await ws.recv_frame()).json() for _ in range(3)]
        assert [m.get("id", m.get("seq")) for m in rest] == [1, 1, 2]
    finally:
        ws.close()
