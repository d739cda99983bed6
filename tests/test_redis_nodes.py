"""Two `fastws serve --redis` processes sharing a real redis-server: one system.

A publication on either node reaches subscribers on both, in one seq
order, and a client that leaves one node recovers what it missed on the
other.
"""

from __future__ import annotations

from collections.abc import Callable

from conftest import NodeProcess, ahttp_get, proto_client, unique


async def test_two_nodes_share_channels_numbering_and_history(
    redis_server: str, node_factory: Callable[..., NodeProcess]
) -> None:
    a = node_factory(args=["--redis", redis_server])
    b = node_factory(args=["--redis", redis_server])
    assert (await ahttp_get(a.port, "/readyz")).status == 200
    ch = unique("redis")
    async with proto_client(a.ws_url()) as on_a, proto_client(b.ws_url()) as on_b:
        first = await on_a.sub(ch)
        await on_b.sub(ch)
        seqs = [await (on_a if n % 2 else on_b).pub(ch, n) for n in range(6)]
        assert seqs == [1, 2, 3, 4, 5, 6]
        for c in (on_a, on_b):
            got = [await c.next_pub(ch) for _ in range(6)]
            assert [(m["seq"], m["data"]) for m in got] == list(zip(seqs, range(6), strict=True))
    # Away from node a, then back through node b: the gap comes from Redis.
    async with proto_client(a.ws_url()) as pub:
        for n in range(6, 9):
            await pub.pub(ch, n)
    async with proto_client(b.ws_url()) as back:
        since = {"epoch": first["epoch"], "seq": 6}
        reply = await back.sub(ch, since=since)
        assert reply["recovered"] is True and reply["seq"] == 9
        replay = [await back.next_pub(ch) for _ in range(3)]
        assert [m["data"] for m in replay] == [6, 7, 8]
