"""Joining a channel mid-stream with a broker that waits, as a networked one does.

Twice: through the memory broker given a network's timing, and through a
real Redis shared by two nodes, subscribers on both.

The memory broker never waits, so a subscription's reply, replay and join
happen in one loop turn. A networked broker reads positions and history
over the network while its pub/sub stream runs behind or ahead of them.
Here the memory broker is given those delays (reads that wait and return
a position already stale, deliveries that lag the history), and clients
subscribe at random moments of a numbered stream: each must get every
publication after its reply's position exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import HOST, proto_client, unique

from fastws import App
from fastws.brokers import MemoryBroker
from fastws.brokers.base import Deliver, Stored
from fastws.config import Config
from fastws.namespaces import ChannelOptions
from fastws.protocol import Position

pytestmark = pytest.mark.timeout(60)

PUBLICATIONS = 1200


class LaggingBroker(MemoryBroker):
    """The memory broker with a network's timing; its data stays the memory broker's."""

    def __init__(self, seed: int) -> None:
        super().__init__(lambda channel: ChannelOptions(PUBLICATIONS, 300.0, False, False))
        self.rng = random.Random(seed)
        self.queue: asyncio.Queue[tuple[str, str, int, bytes]] = asyncio.Queue()
        self.pump: asyncio.Task[None] | None = None

    def attach(self, deliver: Deliver, resync: Callable[[], None] | None = None) -> None:
        self.late = deliver
        super().attach(
            lambda ch, epoch, seq, payload: self.queue.put_nowait((ch, epoch, seq, payload)),
            resync,
        )

    async def start(self) -> None:
        await super().start()
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        await super().stop()

    async def _pump(self) -> None:
        """Deliver in order, each a little late: the pub/sub stream behind the history."""
        while True:
            item = await self.queue.get()
            await asyncio.sleep(self.rng.uniform(0, 0.004))
            self.late(*item)

    async def subscribe(self, channel: str) -> None:
        await asyncio.sleep(self.rng.uniform(0, 0.003))
        await super().subscribe(channel)

    async def position(self, channel: str) -> Position:
        position = await super().position(channel)  # read now, answered later: stale
        await asyncio.sleep(self.rng.uniform(0, 0.004))
        return position

    async def history(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> tuple[Position, list[Stored] | None]:
        answer = await super().history(channel, since, limit)
        await asyncio.sleep(self.rng.uniform(0, 0.004))
        return answer


@pytest.fixture
async def node() -> AsyncIterator[Any]:
    app = App(Config(log_level="warning"), broker=LaggingBroker(7))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    yield node
    await asyncio.wait_for(node.stop(), 10)


async def subscriber(url: str, ch: str, start_after: float, since: bool) -> tuple[int, list[int]]:
    """Subscribe after a delay (with since: from a position read earlier); collect seqs."""
    async with proto_client(url) as c:
        first: dict[str, Any] | None = None
        if since:
            first = await c.sub(ch)
            await c.unsub(ch)
            c.pending.clear()
        await asyncio.sleep(start_after)
        extra = {"since": {"epoch": first["epoch"], "seq": first["seq"]}} if first else {}
        reply = await c.sub(ch, **extra)
        assert reply["recovered"] is bool(first), reply  # the history reaches back
        start = first["seq"] if first else reply["seq"]
        seqs = [m["seq"] for m in c.pending if "seq" in m and "id" not in m]
        while not seqs or seqs[-1] < PUBLICATIONS:
            m = json.loads(await asyncio.wait_for(c.ws.recv(), 10))
            seqs.append(m["seq"])
        return start, seqs


async def test_subscribers_joining_mid_stream_get_each_publication_once_in_order(node: Any) -> None:
    ch = unique("join")
    url = f"ws://{HOST}:{node.port}/ws"
    rng = random.Random(11)
    subs = [
        asyncio.create_task(subscriber(url, ch, rng.uniform(0.05, 1.2), since=i % 3 == 0))
        for i in range(24)
    ]
    await asyncio.sleep(0.2)  # every subscriber connected before the stream starts
    for n in range(PUBLICATIONS):
        await node.app.publish(ch, n)
        if n % 4 == 0:
            await asyncio.sleep(0.003)
    for start, seqs in await asyncio.gather(*subs):
        assert seqs == list(range(start + 1, PUBLICATIONS + 1)), (start, seqs[:20])


@pytest.fixture
async def redis_nodes(redis_server: str) -> AsyncIterator[list[Any]]:
    nodes = []
    for _ in range(2):
        app = App(Config(redis=redis_server, history_size=PUBLICATIONS, log_level="warning"))
        app.channels("/ws")
        nodes.append(await asyncio.wait_for(app.serve(host=HOST, port=0), 10))
    yield nodes
    for node in nodes:
        await asyncio.wait_for(node.stop(), 10)


async def test_the_same_across_two_nodes_sharing_redis(redis_nodes: list[Any]) -> None:
    ch = unique("join-redis")
    rng = random.Random(13)
    subs = [
        asyncio.create_task(
            subscriber(
                f"ws://{HOST}:{redis_nodes[i % 2].port}/ws",
                ch,
                rng.uniform(0.05, 1.0),
                since=i % 3 == 0,
            )
        )
        for i in range(16)
    ]
    await asyncio.sleep(0.3)
    publishers = [node.app for node in redis_nodes]
    for n in range(PUBLICATIONS):
        await publishers[n % 2].publish(ch, n)
    for start, seqs in await asyncio.gather(*subs):
        assert seqs == list(range(start + 1, PUBLICATIONS + 1)), (start, seqs[:20])
