"""fastws.client against real nodes: the stream survives cuts, silence and restarts.

The subscriber of the reconnect tests goes through a TcpProxy that the test
cuts or silences; publishers connect to the node directly. The proof is
``test_every_publication_once_in_order_through_25_cuts``: 2,000 numbered
publications, the subscriber's connection cut 25 times at random moments,
and the application sees every number exactly once, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from conftest import HOST, NodeProcess, free_port, start_node, unique
from tcpproxy import TcpProxy

import fastws.client
from fastws.client import (
    ClientClosed,
    CommandError,
    Item,
    Publication,
    Rejected,
    Reset,
    Subscription,
    backoff_delay,
)

pytestmark = pytest.mark.timeout(60)

FAST = {"min_delay": 0.02, "max_delay": 0.3}  # reconnect within milliseconds in tests


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    """This module's node keeps enough history for the long streams to be recovered."""
    n = start_node(args=["--history-size", "10000"])
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture
async def proxy(node: NodeProcess) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy.start(HOST, node.port)
    yield p
    await p.close()


def via(proxy: TcpProxy) -> str:
    return f"ws://{HOST}:{proxy.port}/ws"


async def take(sub: Subscription, n: int, timeout: float = 5.0) -> list[Item]:
    async def go() -> list[Item]:
        return [await sub.get() for _ in range(n)]

    return await asyncio.wait_for(go(), timeout)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# The API on a steady connection.


async def test_subscribe_publish_and_iterate(node: NodeProcess) -> None:
    ch = unique("cli")
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        sub = await client.subscribe(ch)
        assert sub.position is not None and sub.position[1] == 0
        assert [await client.publish(ch, {"n": n}) for n in range(3)] == [1, 2, 3]
        assert await take(sub, 3) == [Publication(s, {"n": s - 1}) for s in (1, 2, 3)]
        assert sub.position[1] == 3
        assert client.connected and client.connects == 1 and client.client_id


async def test_a_refused_command_raises_command_error_and_the_client_goes_on(
    node: NodeProcess,
) -> None:
    ch = unique("cli")
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        with pytest.raises(CommandError) as refused:
            await client.publish("", 1)
        assert refused.value.code == "bad_request"
        try:
            assert isinstance(await client.presence(ch), dict)
        except CommandError as refused:  # where the node keeps no presence for the channel
            assert refused.code == "not_available"
        for _ in range(2):  # a refused subscription is forgotten: the same error again
            with pytest.raises(CommandError):
                await client.subscribe("")
        with pytest.raises(TypeError):
            await client.publish(ch, object())  # not JSON: refused before it is sent
        sub = await client.subscribe(ch)
        with pytest.raises(ValueError):
            await client.subscribe(ch)  # one stream per channel
        assert await client.publish(ch, "ok") == 1
        assert await take(sub, 1) == [Publication(1, "ok")]
        assert client.connects == 1


async def test_unsubscribe_ends_the_iteration_after_what_was_buffered(node: NodeProcess) -> None:
    ch = unique("cli")
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        sub = await client.subscribe(ch)
        await client.publish(ch, "a")  # the node sends the publication before the reply
        assert sub.buffered == 1
        await sub.unsubscribe()
        await client.publish(ch, "b")
        assert [item async for item in sub] == [Publication(1, "a")]
        with pytest.raises(StopAsyncIteration):
            await sub.get()
        again = await client.subscribe(ch)
        await client.publish(ch, "c")
        assert await take(again, 1) == [Publication(3, "c")]


async def test_history_returns_the_kept_publications(node: NodeProcess) -> None:
    ch = unique("cli")
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        for n in range(1, 6):
            await client.publish(ch, n)
        everything = await client.history(ch)
        assert everything.seq == 5
        assert everything.publications == [Publication(n, n) for n in range(1, 6)]
        assert [p.seq for p in (await client.history(ch, limit=2)).publications] == [4, 5]
        after = await client.history(ch, since=(everything.epoch, 3))
        assert [p.data for p in after.publications] == [4, 5]
        with pytest.raises(CommandError) as refused:
            await client.history(ch, since=("another epoch", 0))
        assert refused.value.code == "unrecoverable"


async def test_close_ends_iterations_and_fails_what_waits(node: NodeProcess) -> None:
    client = fastws.client.connect(node.ws_url(), **FAST)
    client.start()
    sub = await client.subscribe(unique("cli"))
    reader = asyncio.create_task(take(sub, 1))
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await reader
    assert client.closed and not client.connected
    with pytest.raises(ClientClosed):
        await client.publish("anything", 1)
    await client.close()  # twice is fine

    nowhere = fastws.client.connect(f"ws://{HOST}:{free_port()}/ws", **FAST)
    nowhere.start()
    waiting = asyncio.create_task(nowhere.publish("anything", 1))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # queued until a connection is up
    await nowhere.close()
    with pytest.raises(ClientClosed):
        await waiting


# Backoff.


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(7)
    means = []
    for attempt in range(10):
        ceiling = min(10.0, 0.1 * 2**attempt)
        draws = [backoff_delay(attempt, 0.1, 10.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.9 * ceiling  # the whole window is used...
        assert min(draws) < 0.1 * ceiling  # ...down to nothing: full jitter
        assert len(set(draws)) == len(draws)
        means.append(sum(draws) / len(draws))
    assert all(a < b for a, b in itertools.pairwise(means[:8]))  # grows up to the cap
    assert 4.0 < means[-1] < 6.0  # capped at max_delay: uniform(0, 10)
    same = [backoff_delay(a, 0.1, 10.0, random.Random(3)) for a in range(5)]
    assert same == [backoff_delay(a, 0.1, 10.0, random.Random(3)) for a in range(5)]
    assert backoff_delay(10**9, 0.1, 10.0, rng) <= 10.0  # days of failures do not overflow


# Reconnecting.


async def test_a_cut_connection_is_replaced_and_what_was_missed_arrives(
    node: NodeProcess, proxy: TcpProxy
) -> None:
    ch = unique("cli")
    async with (
        fastws.client.connect(via(proxy), **FAST) as client,
        fastws.client.connect(node.ws_url()) as publisher,
    ):
        sub = await client.subscribe(ch)
        await publisher.publish(ch, 1)
        assert await take(sub, 1) == [Publication(1, 1)]
        assert proxy.cut() == 1
        for n in range(2, 6):
            await publisher.publish(ch, n)
        assert await take(sub, 4) == [Publication(n, n) for n in range(2, 6)]
        await client.wait_connected()
        assert client.connects == 2


async def test_every_publication_once_in_order_through_25_cuts(
    node: NodeProcess, proxy: TcpProxy
) -> None:
    """The issue's proof: no loss, no duplicate, no reordering, no reset."""
    ch = unique("proof")
    total = 2000
    rng = random.Random(20261125)
    async with (
        fastws.client.connect(via(proxy), **FAST) as subscriber,
        fastws.client.connect(node.ws_url()) as publisher,
    ):
        sub = await subscriber.subscribe(ch)

        async def publish_all() -> None:
            for n in range(1, total + 1):
                await publisher.publish(ch, n)
                if n % 20 == 0:
                    await asyncio.sleep(0.025)  # spread the stream over the cuts

        async def cut_often() -> int:
            cut = 0
            for _ in range(25):
                await asyncio.sleep(rng.uniform(0.02, 0.15))
                cut += proxy.cut()
            return cut

        async def read_all() -> list[Item]:
            items: list[Item] = []
            while len(items) < total:
                items.append(await sub.get())
                if isinstance(items[-1], Reset):
                    break
            return items

        _, cut, items = await asyncio.wait_for(
            asyncio.gather(publish_all(), cut_often(), read_all()), 30
        )
    assert not [i for i in items if isinstance(i, Reset)]
    assert items == [Publication(n, n) for n in range(1, total + 1)]
    assert cut >= 15, f"only {cut} cuts found a connection to cut"
    assert subscriber.connects >= 15


async def test_publishes_through_cuts_are_all_acknowledged_at_least_once(
    node: NodeProcess, proxy: TcpProxy
) -> None:
    ch = unique("atleast")
    total = 500
    rng = random.Random(11)
    async with (
        fastws.client.connect(via(proxy), **FAST) as publisher,
        fastws.client.connect(node.ws_url()) as reader,
    ):

        async def publish_all() -> list[int]:
            seqs = []
            for n in range(total):
                seqs.append(await publisher.publish(ch, n))
                if n % 10 == 0:
                    await asyncio.sleep(0.02)
            return seqs

        async def cut_often() -> None:
            for _ in range(15):
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                proxy.cut()

        seqs, _ = await asyncio.wait_for(asyncio.gather(publish_all(), cut_often()), 30)
        kept = (await reader.history(ch)).publications
    assert seqs == sorted(seqs) and len(set(seqs)) == total
    by_seq = {p.seq: p.data for p in kept}
    assert [by_seq[s] for s in seqs] == list(range(total))  # each reply names its own
    first_seen = list(dict.fromkeys(p.data for p in kept))
    assert first_seen == list(range(total))  # nothing lost, first copies in order


async def test_a_restarted_node_yields_a_reset_then_the_new_stream(
    node_factory: Callable[..., NodeProcess],
) -> None:
    port = free_port()
    first = node_factory(port=port, args=["--drain-period", "0.1"])
    ch = unique("restart")
    async with fastws.client.connect(first.ws_url(), min_delay=0.05, max_delay=0.3) as client:
        sub = await client.subscribe(ch)
        for n in (1, 2, 3):
            await client.publish(ch, n)
        assert await take(sub, 3) == [Publication(n, n) for n in (1, 2, 3)]
        assert sub.position is not None
        old_epoch = sub.position[0]
        # In threads: the client must go on running while the nodes stop and start.
        await asyncio.to_thread(first.stop)  # drains: a close with 1001
        await asyncio.to_thread(node_factory, port=port)
        reset = await asyncio.wait_for(sub.get(), 10)
        assert isinstance(reset, Reset), reset
        assert reset.epoch != old_epoch and reset.seq == 0
        assert [await client.publish(ch, n) for n in (4, 5)] == [1, 2]
        assert await take(sub, 2) == [Publication(1, 4), Publication(2, 5)]
        assert (await client.history(ch)).epoch == reset.epoch
        assert client.connects == 2


async def test_commands_made_before_the_node_is_up_go_once_it_is(
    node_factory: Callable[..., NodeProcess],
) -> None:
    port = free_port()
    ch = unique("early")
    async with fastws.client.connect(
        f"ws://{HOST}:{port}/ws", min_delay=0.05, max_delay=0.3
    ) as client:
        subscribing = asyncio.create_task(client.subscribe(ch))
        await asyncio.sleep(0)
        publishing = asyncio.create_task(client.publish(ch, "early"))
        await asyncio.sleep(0.3)
        assert not subscribing.done() and not publishing.done()
        await asyncio.to_thread(node_factory, port=port)
        sub = await asyncio.wait_for(subscribing, 10)
        assert await asyncio.wait_for(publishing, 10) == 1
        # The subscription is sent first, so it sees the publication made after it.
        assert await take(sub, 1) == [Publication(1, "early")]


# Heartbeat.


async def test_a_silent_connection_is_found_by_heartbeat(
    node: NodeProcess, proxy: TcpProxy
) -> None:
    ch = unique("silent")
    timeout = 1.0
    async with (
        fastws.client.connect(via(proxy), heartbeat_timeout=timeout, **FAST) as client,
        fastws.client.connect(node.ws_url()) as publisher,
    ):
        sub = await client.subscribe(ch)
        await asyncio.sleep(2.5 * timeout)
        assert client.connects == 1  # idle but answering pings: alive
        proxy.pause()
        silenced = time.monotonic()
        await publisher.publish(ch, "while silent")
        assert await take(sub, 1) == [Publication(1, "while silent")]
        noticed = time.monotonic() - silenced
        assert client.connects == 2
        assert noticed < timeout + 1.0, f"found dead after {noticed:.2f} s"


# Ends and failures.


async def test_a_policy_close_ends_the_client_with_rejected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--max-bad-commands", "2"])
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        sub = await client.subscribe(unique("policy"))
        for _ in range(2):
            with pytest.raises(CommandError):
                await client.publish("", "malformed")  # the second one gets 1008
        await eventually(lambda: client.closed)
        with pytest.raises(Rejected) as rejected:
            await sub.get()
        assert rejected.value.code == 1008
        with pytest.raises(Rejected):
            await client.publish("anything", 1)
        with pytest.raises(Rejected):
            await client.wait_connected()
        assert client.connects == 1


async def test_a_message_too_big_fails_its_publish_instead_of_resending_it(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--max-message-size", "1024"])
    ch = unique("big")
    async with fastws.client.connect(node.ws_url(), **FAST) as client:
        with pytest.raises(CommandError) as refused:
            await client.publish(ch, "x" * 2000)
        assert refused.value.code == "message_too_big"
        seq = await client.publish(ch, "small")  # on a new connection
        assert client.connects == 2
        kept = (await client.history(ch)).publications
        assert kept[-1] == Publication(seq, "small")
        # Sent once, not again and again. (A node that executes the oversize
        # message before closing with 1009 keeps that one copy.)
        assert len(kept) <= 2
