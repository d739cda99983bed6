"""One suite for every broker: the Broker API driven directly, in this process.

Each test runs against the memory broker, the Redis broker on a real
redis-server (the ``redis_server`` fixture) and the Redis Cluster broker on
a real three-master cluster (``redis_cluster``), each flushed before the
test. The Redis-only tests at the end run two brokers on one Redis, or one
cluster, as two nodes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from fastws.brokers import Broker, MemoryBroker, make_broker
from fastws.brokers.cluster import ClusterBroker
from fastws.brokers.redis import MIN_LIFETIME, RedisBroker
from fastws.config import Config
from fastws.namespaces import ChannelOptions, Namespaces
from fastws.protocol import Position, encode_publication

DEFAULT = ChannelOptions(history_size=100, history_ttl=300.0, presence=True, join_leave=True)
BY_NAMESPACE = {
    "small": ChannelOptions(3, 300.0, True, True),
    "none": ChannelOptions(0, 300.0, True, True),
    "short": ChannelOptions(100, 0.3, True, True),
}
SHORTEST_TTL = 0.3


def options(channel: str) -> ChannelOptions:
    name, colon, _ = channel.partition(":")
    return BY_NAMESPACE.get(name, DEFAULT) if colon else DEFAULT


class Node:
    """A broker as a node sees it: everything delivered to it, in order."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.got: list[tuple[str, int, bytes]] = []
        broker.attach(lambda ch, epoch, seq, payload: self.got.append((ch, seq, payload)))

    def seqs(self, channel: str) -> list[int]:
        return [seq for ch, seq, _ in self.got if ch == channel and seq]

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)


MakeNode = Callable[[], Awaitable[Node]]


async def backplane(request: pytest.FixtureRequest, kind: str) -> Callable[..., Broker]:
    """Brokers of one kind (keyword arguments go to a Redis one), its data flushed."""
    if kind == "memory":
        return lambda: MemoryBroker(options, SHORTEST_TTL)
    if kind == "redis":
        url = request.getfixturevalue("redis_server")
        async with aioredis.from_url(url) as r:
            await r.flushall()
        return lambda **kw: RedisBroker(url, options, SHORTEST_TTL, **kw)
    url = request.getfixturevalue("redis_cluster")
    async with aioredis.RedisCluster.from_url(url) as cluster:
        await cluster.flushall()  # on every master
    return lambda **kw: ClusterBroker(url, options, SHORTEST_TTL, **kw)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_node(request: pytest.FixtureRequest) -> AsyncIterator[MakeNode]:
    """Start nodes of one kind; all stopped at teardown. Memory nodes share nothing."""
    new_broker = await backplane(request, request.param)
    nodes: list[Node] = []

    async def make() -> Node:
        broker = new_broker()
        node = Node(broker)
        await broker.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.broker.stop()


@pytest.fixture
async def node(make_node: MakeNode) -> Node:
    return await make_node()


async def publish(node: Node, ch: str, values: range) -> list[int]:
    return [await node.broker.publish(ch, value) for value in values]


async def delivered(node: Node, ch: str, n: int) -> list[int]:
    await node.until(lambda: len(node.seqs(ch)) >= n)
    return node.seqs(ch)


async def test_seqs_count_from_one_in_each_channel_with_an_epoch_each(node: Node) -> None:
    b = node.broker
    assert await b.position("a") == Position((await b.position("a")).epoch, 0)
    assert await publish(node, "a", range(3)) == [1, 2, 3]
    assert await publish(node, "b", range(2)) == [1, 2]
    a, bb = await b.position("a"), await b.position("b")
    assert (a.seq, bb.seq) == (3, 2)
    assert a.epoch != bb.epoch
    assert (await b.position("a")).epoch == a.epoch  # stable while in use


async def test_subscribed_channels_are_delivered_in_order_as_encoded(node: Node) -> None:
    b = node.broker
    await b.subscribe("live")
    await publish(node, "unheard", range(2))
    data = [{"n": i, "s": 'é"x'} for i in range(20)]
    for item in data:
        await b.publish("live", item)
    assert await delivered(node, "live", 20) == list(range(1, 21))
    assert [p for ch, _, p in node.got if ch == "live"] == [
        encode_publication("live", i + 1, item) for i, item in enumerate(data)
    ]
    if isinstance(b, RedisBroker):  # the memory broker hands the node everything
        assert node.seqs("unheard") == []


async def test_unsubscribe_stops_delivery(node: Node) -> None:
    b = node.broker
    await b.subscribe("ch")
    await b.publish("ch", 1)
    await delivered(node, "ch", 1)
    await b.unsubscribe("ch")
    await b.publish("ch", 2)
    await b.subscribe("other")  # confirmed after the publication above went by
    await b.publish("other", 1)
    await delivered(node, "other", 1)
    # The memory broker hands the node every publication (its fanout finds
    # no subscriber); a networked one stops sending the channel.
    assert node.seqs("ch") == ([1] if isinstance(b, RedisBroker) else [1, 2])


async def test_history_without_since_is_the_last_limit(node: Node) -> None:
    b = node.broker
    await publish(node, "h", range(1, 6))
    position, kept = await b.history("h", None)
    assert kept is not None and position.seq == 5
    assert [(s.seq, orjson.loads(s.payload)["data"]) for s in kept] == [(i, i) for i in range(1, 6)]
    assert kept[0].payload == encode_publication("h", 1, 1)
    _, last = await b.history("h", None, 2)
    assert last is not None and [s.seq for s in last] == [4, 5]
    _, every = await b.history("h", None, 10**30)
    assert every is not None and [s.seq for s in every] == [1, 2, 3, 4, 5]
    _, none = await b.history("h", None, 0)
    assert none == []
    _, empty = await b.history("fresh", None)
    assert empty == []


async def test_history_since_serves_everything_after_or_none(node: Node) -> None:
    b = node.broker
    await publish(node, "h", range(1, 6))
    epoch = (await b.position("h")).epoch

    async def since(seq: int, limit: int | None = None, ep: str = epoch) -> list[int] | None:
        position, kept = await b.history("h", Position(ep, seq), limit)
        assert position == Position(epoch, 5)
        return None if kept is None else [s.seq for s in kept]

    assert await since(2) == [3, 4, 5]
    assert await since(0) == [1, 2, 3, 4, 5]
    assert await since(2, 1) == [3]
    assert await since(2, 0) == []
    assert await since(5) == []  # at the end: nothing missed
    assert await since(6) is None  # past the end
    assert await since(10**30) is None
    assert await since(2, 10**30) == [3, 4, 5]
    assert await since(2, ep="another") is None


async def test_history_is_bounded_per_namespace(node: Node) -> None:
    b = node.broker
    await publish(node, "small:x", range(1, 11))
    epoch = (await b.position("small:x")).epoch
    _, kept = await b.history("small:x", None)
    assert kept is not None and [s.seq for s in kept] == [8, 9, 10]
    assert (await b.history("small:x", Position(epoch, 7)))[1] is not None
    assert (await b.history("small:x", Position(epoch, 6)))[1] is None  # no longer reaches back
    await publish(node, "none:x", range(1, 4))
    position, kept = await b.history("none:x", None)
    assert position.seq == 3 and kept == []
    assert (await b.history("none:x", Position(position.epoch, 2)))[1] is None
    assert (await b.history("none:x", Position(position.epoch, 3)))[1] == []


async def test_old_publications_expire_and_an_unused_channel_starts_a_new_epoch(
    node: Node,
) -> None:
    b = node.broker
    await publish(node, "short:x", range(3))
    first = await b.position("short:x")
    assert [s.seq for s in (await b.history("short:x", None))[1] or []] == [1, 2, 3]
    await asyncio.sleep(0.4)
    # Too old to serve. (The memory broker may also have forgotten the
    # channel by now; the Redis one keeps its keys for MIN_LIFETIME at least.)
    assert (await b.history("short:x", None))[1] == []
    assert (await b.history("short:x", Position(first.epoch, 1)))[1] is None
    await asyncio.sleep(max(SHORTEST_TTL, MIN_LIFETIME) + 0.3)  # unused for its TTL
    again = await b.position("short:x")
    assert again.epoch != first.epoch and again.seq == 0
    assert await b.publish("short:x", 0) == 1


async def test_a_subscribed_channel_is_not_forgotten(node: Node) -> None:
    b = node.broker
    await b.subscribe("short:kept")
    await b.publish("short:kept", 0)
    first = await b.position("short:kept")
    await asyncio.sleep(max(SHORTEST_TTL, MIN_LIFETIME) + 0.5)
    assert (await b.position("short:kept")).epoch == first.epoch
    assert await b.publish("short:kept", 0) == 2


async def test_announce_is_delivered_with_seq_zero_and_not_kept(node: Node) -> None:
    b = node.broker
    await b.subscribe("room")
    await b.publish("room", "a")
    await b.announce("room", b'{"ch":"room","join":{"user":"u"}}')
    await b.publish("room", "b")
    await node.until(lambda: len(node.got) >= 3)
    assert [(seq, p) for _, seq, p in node.got][1] == (0, b'{"ch":"room","join":{"user":"u"}}')
    assert node.seqs("room") == [1, 2]
    assert (await b.position("room")).seq == 2


async def test_presence_add_remove_list(node: Node) -> None:
    b = node.broker
    assert await b.presence("room") == {}
    await b.add_presence("room", "c1", {"user": "ann"})
    await b.add_presence("room", "c2", {"user": "bob", "n": [1, 2]})
    await b.add_presence("other", "c1", {"user": "ann"})
    assert await b.presence("room") == {"c1": {"user": "ann"}, "c2": {"user": "bob", "n": [1, 2]}}
    await b.remove_presence("room", "c1")
    await b.remove_presence("room", "nobody")
    assert await b.presence("room") == {"c2": {"user": "bob", "n": [1, 2]}}
    await b.remove_presence("room", "c2")
    assert await b.presence("room") == {}
    assert await b.presence("other") == {"c1": {"user": "ann"}}


async def test_a_publication_that_cannot_be_encoded_takes_no_seq(node: Node) -> None:
    from fastws.protocol import CommandError

    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    with pytest.raises(CommandError):
        await node.broker.publish("ch", deep)
    assert await node.broker.publish("ch", 1) == 1


# --------------------------------------------------------------------------
# Redis only: two nodes on one Redis, or on one Redis Cluster
# --------------------------------------------------------------------------


@pytest.fixture(params=["redis", "cluster"])
async def two_nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Node, Node]]:
    new_broker = await backplane(request, request.param)
    nodes = (Node(new_broker()), Node(new_broker()))
    for n in nodes:
        await n.broker.start()
    yield nodes
    for n in nodes:
        await n.broker.stop()


async def test_two_nodes_publishing_at_once_make_one_gapless_sequence(
    two_nodes: tuple[Node, Node],
) -> None:
    a, b = two_nodes
    await a.broker.subscribe("race")
    await b.broker.subscribe("race")
    seqs = await asyncio.gather(
        *(a.broker.publish("race", ("a", i)) for i in range(500)),
        *(b.broker.publish("race", ("b", i)) for i in range(500)),
    )
    assert sorted(seqs) == list(range(1, 1001))
    assert await delivered(a, "race", 1000) == list(range(1, 1001))
    assert await delivered(b, "race", 1000) == list(range(1, 1001))
    assert [p for *_, p in a.got] == [p for *_, p in b.got]
    made = sorted(tuple(orjson.loads(p)["data"]) for *_, p in a.got)
    assert made == sorted([("a", i) for i in range(500)] + [("b", i) for i in range(500)])


async def test_a_second_node_recovers_what_the_first_published(
    two_nodes: tuple[Node, Node],
) -> None:
    a, b = two_nodes
    await b.broker.subscribe("ch")
    await publish(a, "ch", range(1, 6))
    position = await a.broker.position("ch")
    assert await b.broker.position("ch") == position
    _, kept = await b.broker.history("ch", Position(position.epoch, 2))
    assert kept is not None and [s.seq for s in kept] == [3, 4, 5]
    assert [s.payload for s in kept] == [encode_publication("ch", i, i) for i in (3, 4, 5)]
    assert await delivered(b, "ch", 5) == [1, 2, 3, 4, 5]
    assert a.got == []  # a node hears only what it subscribed to


async def test_join_leave_and_presence_reach_every_node(two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    await a.broker.subscribe("room")
    await b.broker.subscribe("room")
    await a.broker.add_presence("room", "c1", {"user": "ann"})
    await b.broker.add_presence("room", "c2", {"user": "bob"})
    await a.broker.announce("room", b"join")
    for n in (a, b):
        await n.until(lambda n=n: ("room", 0, b"join") in n.got)
        assert await n.broker.presence("room") == {"c1": {"user": "ann"}, "c2": {"user": "bob"}}
    await b.broker.stop()  # a node that stops takes its clients' presence with it
    assert await a.broker.presence("room") == {"c1": {"user": "ann"}}


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_presence_of_a_node_that_stopped_refreshing_expires(
    request: pytest.FixtureRequest, kind: str
) -> None:
    new_broker = await backplane(request, kind)
    a, b = new_broker(presence_ttl=0.3), new_broker()
    assert isinstance(a, RedisBroker)
    await a.start()
    await b.start()
    try:
        await a.add_presence("room", "c1", {"user": "ann"})
        await asyncio.sleep(0.5)  # a refreshes it
        assert await b.presence("room") == {"c1": {"user": "ann"}}
        assert a._refresher is not None
        a._refresher.cancel()  # a node that died: nobody refreshes its entries
        await asyncio.sleep(0.4)
        assert await b.presence("room") == {}
    finally:
        await a.stop()
        await b.stop()


async def test_ready_start_and_stop(redis_server: str) -> None:
    broker = RedisBroker(redis_server, options)
    assert not broker.ready
    before = asyncio.all_tasks()
    await broker.start()
    assert broker.ready
    await broker.subscribe("ch")
    await broker.add_presence("ch", "c1", {})
    await broker.stop()
    assert not broker.ready
    assert asyncio.all_tasks() == before  # no task left behind
    unreachable = RedisBroker(f"redis://127.0.0.1:{_closed_port()}/0", options)
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        await unreachable.start()
    assert not unreachable.ready


def _closed_port() -> int:
    from conftest import free_port

    return free_port()


def test_make_broker_picks_by_the_redis_option(redis_server: str) -> None:
    memory = Config()
    assert isinstance(make_broker(memory, Namespaces(memory)), MemoryBroker)
    remote = Config(redis=redis_server)
    broker = make_broker(remote, Namespaces(remote))
    assert isinstance(broker, RedisBroker) and broker.url == redis_server
    assert not isinstance(broker, ClusterBroker)
    sharded = Config(redis_cluster="redis://127.0.0.1:7000")
    broker = make_broker(sharded, Namespaces(sharded))
    assert isinstance(broker, ClusterBroker) and broker.url == sharded.redis_cluster


def test_fastws_runs_without_the_redis_package() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"  # as if the extra were not installed
        "import fastws.app, fastws.brokers, fastws.config, fastws.namespaces\n"
        "c = fastws.config.Config()\n"
        "b = fastws.brokers.make_broker(c, fastws.namespaces.Namespaces(c))\n"
        "assert type(b).__name__ == 'MemoryBroker'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
