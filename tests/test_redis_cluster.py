"""fastws on a real Redis Cluster of three masters (tests/rediscluster.py).

The broker's shared suite runs on the cluster in tests/test_brokers.py;
here are what only a cluster has: one sharded pub/sub connection per master,
a channel's slot moving to another master, a master's connection dropping
or the master crashing, and two ``fastws serve --redis-cluster`` nodes
delivering channels that live on every master.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import NodeProcess, ahttp_get, proto_client, unique
from rediscluster import SLOTS, Cluster, channel_slot, running_cluster, slot_of
from test_brokers import Node, options

from fastws.brokers.base import Unavailable
from fastws.brokers.cluster import ClusterBroker


def spread(cluster: Cluster, per_master: int) -> dict[int, list[str]]:
    """Fresh channel names, ``per_master`` of them on each master: port -> names."""
    slot_map = cluster.slot_map(cluster.ports[0])
    prefix = unique("spread")
    found: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for i in itertools.count():
        name = f"{prefix}-{i}"
        slot = channel_slot(name)
        port = next(p for lo, hi, p in slot_map if lo <= slot <= hi)
        if len(found[port]) < per_master:
            found[port].append(name)
        if all(len(names) == per_master for names in found.values()):
            return found
    raise AssertionError("unreachable")


def pubsub_clients(cluster: Cluster, port: int) -> int:
    """How many pub/sub connections the master on port holds."""
    with cluster.client(port) as r:
        return len(r.client_list(_type="pubsub"))


def shard_subscribers(cluster: Cluster, port: int, channel: str) -> int:
    """How many connections listen to channel on the master on port (PUBSUB SHARDNUMSUB)."""
    with cluster.client(port) as r:
        [(_, count)] = r.pubsub_shardnumsub(f"fastws:{{{channel}}}")
    return int(count)


class Watched(Node):
    """A Node that also counts the broker's resync calls."""

    def __init__(self, broker: ClusterBroker) -> None:
        super().__init__(broker)
        self.resyncs = 0

        def resync() -> None:
            self.resyncs += 1

        broker.attach(lambda ch, epoch, seq, payload: self.got.append((ch, seq, payload)), resync)


@pytest.fixture
async def watched(redis_cluster_nodes: Cluster) -> AsyncIterator[Watched]:
    async with aioredis.RedisCluster.from_url(redis_cluster_nodes.seed_url) as client:
        await client.flushall()
    node = Watched(ClusterBroker(redis_cluster_nodes.seed_url, options))
    await node.broker.start()
    yield node
    await node.broker.stop()


def test_the_test_cluster_has_three_masters_sharing_every_slot(
    redis_cluster_nodes: Cluster,
) -> None:
    cluster = redis_cluster_nodes
    slot_map = cluster.slot_map(cluster.ports[0])
    assert {port for *_, port in slot_map} == set(cluster.ports) and len(cluster.ports) == 3
    assert sum(hi - lo + 1 for lo, hi, _ in slot_map) == SLOTS
    assert all(cluster.slot_map(port) == slot_map for port in cluster.ports)
    # A channel's keys and its pub/sub channel share the hash tag, so one slot.
    for key in ("seq", "epoch", "stream", "presence"):
        assert slot_of(f"fastws:{{news}}:{key}") == channel_slot("news")


async def test_one_sharded_pubsub_connection_per_master_that_owns_a_channel(
    redis_cluster_nodes: Cluster, watched: Watched
) -> None:
    cluster, broker = redis_cluster_nodes, watched.broker
    by_master = spread(cluster, 3)
    first, second, third = cluster.ports
    for name in by_master[first] + by_master[second]:
        await broker.subscribe(name)
    assert [pubsub_clients(cluster, port) for port in cluster.ports] == [1, 1, 0]
    for name in by_master[third]:
        await broker.subscribe(name)
    assert [pubsub_clients(cluster, port) for port in cluster.ports] == [1, 1, 1]
    for port, names in by_master.items():  # each channel on the master of its slot
        with cluster.client(port) as r:
            listened = {c.decode() for c in r.execute_command("PUBSUB SHARDCHANNELS")}
        assert listened == {f"fastws:{{{name}}}" for name in names}
    for i, name in enumerate(itertools.chain(*by_master.values())):
        assert await broker.publish(name, i) == 1
    await watched.until(lambda: len(watched.got) == 9)
    # A master none of whose channels is listened to any more is let go.
    for name in by_master[third]:
        await broker.unsubscribe(name)
    await asyncio.sleep(0.1)  # Redis confirms the SUNSUBSCRIBEs
    await broker.refresh()
    await asyncio.sleep(0.1)
    assert [pubsub_clients(cluster, port) for port in cluster.ports] == [1, 1, 0]


@contextlib.contextmanager
def moved(cluster: Cluster, channel: str) -> Any:
    """Move channel's slot to another master for the block, then back."""
    slot = channel_slot(channel)
    home = cluster.owner(slot)
    away = next(port for port in cluster.ports if port != home)
    cluster.move_slot(slot, away)
    try:
        yield away
    finally:
        cluster.move_slot(slot, home)


async def test_a_channel_whose_slot_moves_is_followed_and_the_node_resyncs(
    redis_cluster_nodes: Cluster, watched: Watched
) -> None:
    cluster, broker = redis_cluster_nodes, watched.broker
    ch = unique("moving")
    await broker.subscribe(ch)
    for i in range(3):
        await broker.publish(ch, i)
    await watched.until(lambda: watched.seqs(ch) == [1, 2, 3])
    with moved(cluster, ch) as away:
        # The old master drops the subscription as the slot leaves; the
        # broker subscribes on the new one and asks the node to resync.
        await watched.until(lambda: watched.resyncs == 1 and broker.ready)
        assert shard_subscribers(cluster, away, ch) == 1
        assert await broker.publish(ch, 3) == 4  # the keys moved along
        await watched.until(lambda: watched.seqs(ch) == [1, 2, 3, 4])
    await watched.until(lambda: watched.resyncs == 2 and broker.ready)
    assert await broker.publish(ch, 4) == 5
    await watched.until(lambda: watched.seqs(ch) == [1, 2, 3, 4, 5])


async def test_subscribing_with_a_stale_slot_map_follows_moved(
    redis_cluster_nodes: Cluster, watched: Watched
) -> None:
    cluster, broker = redis_cluster_nodes, watched.broker
    ch = unique("stale")
    await broker.position(ch)  # the slot map is read; then the slot moves unseen
    with moved(cluster, ch) as away:
        await broker.subscribe(ch)  # MOVED from the old master, then the new one
        assert shard_subscribers(cluster, away, ch) == 1
        await broker.publish(ch, 0)
        await watched.until(lambda: watched.seqs(ch) == [1])
        assert watched.resyncs == 0  # nothing was listened to before


async def test_a_dropped_shard_connection_is_made_again_and_the_node_resyncs(
    redis_cluster_nodes: Cluster, watched: Watched
) -> None:
    cluster, broker = redis_cluster_nodes, watched.broker
    by_master = spread(cluster, 1)
    for names in by_master.values():
        await broker.subscribe(names[0])
    victim = cluster.ports[1]
    with cluster.client(victim) as r:
        assert r.client_kill_filter(_type="pubsub") == 1
    await watched.until(lambda: watched.resyncs == 1 and broker.ready)
    assert [pubsub_clients(cluster, port) for port in cluster.ports] == [1, 1, 1]
    for names in by_master.values():
        await broker.publish(names[0], 0)
    await watched.until(lambda: len(watched.got) == 3)


async def test_a_master_that_crashes_and_comes_back_empty_is_listened_to_again() -> None:
    with running_cluster() as cluster:  # of its own: this one is crashed
        broker = ClusterBroker(cluster.seed_url, options)
        node = Watched(broker)
        await broker.start()
        try:
            by_master = spread(cluster, 1)
            for names in by_master.values():
                await broker.subscribe(names[0])
                await broker.publish(names[0], "before")
            victim = cluster.ports[2]
            ch = by_master[victim][0]
            epoch = (await broker.position(ch)).epoch
            await asyncio.to_thread(cluster.kill, victim)
            await node.until(lambda: not broker.ready)
            with pytest.raises(Unavailable):  # answered as such to clients, who retry
                await broker.publish(ch, "while down")
            await asyncio.to_thread(cluster.restart, victim)
            await node.until(lambda: node.resyncs == 1 and broker.ready, timeout=15)
            # Its keys are gone: the channel goes on in a new epoch, which
            # tells the node that the history before it is lost.
            assert await broker.publish(ch, "after") == 1
            assert (await broker.position(ch)).epoch != epoch
            await node.until(lambda: node.seqs(ch) == [1, 1])
        finally:
            await broker.stop()


async def test_start_stop_and_an_unreachable_cluster(redis_cluster: str) -> None:
    broker = ClusterBroker(redis_cluster, options)
    assert not broker.ready
    before = asyncio.all_tasks()
    await broker.start()
    assert broker.ready
    await broker.subscribe("ch")
    await broker.add_presence("ch", "c1", {})
    await broker.stop()
    assert not broker.ready
    assert asyncio.all_tasks() == before  # no task left behind
    from conftest import free_port

    unreachable = ClusterBroker(f"redis://127.0.0.1:{free_port()}", options)
    with pytest.raises(ConnectionError, match="cannot reach the Redis Cluster"):
        await unreachable.start()
    assert not unreachable.ready


# --------------------------------------------------------------------------
# two `fastws serve --redis-cluster` nodes
# --------------------------------------------------------------------------


async def test_two_nodes_deliver_channels_of_every_master_with_no_gap_or_duplicate(
    redis_cluster_nodes: Cluster, node_factory: Callable[..., NodeProcess]
) -> None:
    cluster = redis_cluster_nodes
    a = node_factory(args=["--redis-cluster", cluster.seed_url])
    b = node_factory(args=["--redis-cluster", cluster.seed_url])
    assert (await ahttp_get(a.port, "/readyz")).status == 200
    channels = [name for names in spread(cluster, 2).values() for name in names]
    rounds = 10
    async with proto_client(a.ws_url()) as on_a, proto_client(b.ws_url()) as on_b:
        for ch in channels:
            await on_a.sub(ch)
            await on_b.sub(ch)
        # Each node holds one sharded pub/sub connection per master.
        assert [pubsub_clients(cluster, port) for port in cluster.ports] == [2, 2, 2]
        for i in range(rounds):
            for ch in channels:
                assert await (on_a if i % 2 else on_b).pub(ch, i) == i + 1
        for c in (on_a, on_b):
            for ch in channels:
                got = [await c.next_pub(ch) for _ in range(rounds)]
                assert [(m["seq"], m["data"]) for m in got] == [(i + 1, i) for i in range(rounds)]
            await c.expect_silence()


async def test_a_slot_moving_under_two_nodes_loses_and_repeats_nothing(
    redis_cluster_nodes: Cluster, node_factory: Callable[..., NodeProcess]
) -> None:
    cluster = redis_cluster_nodes
    a = node_factory(args=["--redis-cluster", cluster.seed_url])
    b = node_factory(args=["--redis-cluster", cluster.seed_url])
    ch = unique("resharded")
    total = 300
    async with (
        proto_client(a.ws_url()) as on_a,
        proto_client(b.ws_url()) as on_b,
        proto_client(a.ws_url()) as publisher,
    ):
        await on_a.sub(ch)
        await on_b.sub(ch)
        published: list[int] = []

        async def publish() -> None:
            for i in range(total):
                reply = await publisher.request({"op": "pub", "ch": ch, "data": i})
                if reply.get("ok"):  # unavailable for a moment while the slot moves
                    published.append(i)
                await asyncio.sleep(0.002)

        publishing = asyncio.create_task(publish())
        while len(published) < total // 3:
            await asyncio.sleep(0.01)
        with moved(cluster, ch):
            while len(published) < 2 * total // 3 and not publishing.done():
                await asyncio.sleep(0.01)
        await publishing
        assert len(published) >= total - 10
        for c in (on_a, on_b):
            got = [await c.next_pub(ch) for _ in range(len(published))]
            assert [m["seq"] for m in got] == list(range(1, len(published) + 1))
            assert [m["data"] for m in got] == published
            await c.expect_silence()
