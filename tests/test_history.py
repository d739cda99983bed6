"""Channel history and recovery: sub with since, and the history op."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conftest import NodeProcess, proto_client, unique


async def epoch_of(c: object, ch: str) -> str:
    """A channel's epoch (each channel has its own), read with the history op."""
    reply = await c.request({"op": "history", "ch": ch, "limit": 0})  # type: ignore[attr-defined]
    return str(reply["epoch"])


async def publish(node: NodeProcess, ch: str, values: range) -> int:
    async with proto_client(node.ws_url()) as pub:
        seq = 0
        for value in values:
            seq = await pub.pub(ch, value)
        return seq


async def test_sub_since_replays_what_was_missed_then_live_in_order(node: NodeProcess) -> None:
    ch = unique("hist")
    async with proto_client(node.ws_url()) as c:
        first = await c.sub(ch)
        assert first["seq"] == 0 and first["recovered"] is False
        await publish(node, ch, range(1, 4))
        assert [(await c.next_pub(ch))["seq"] for _ in range(3)] == [1, 2, 3]
        epoch = first["epoch"]
    await publish(node, ch, range(4, 9))  # seq 4..8 while away
    async with proto_client(node.ws_url()) as c:
        await c.send({"op": "sub", "ch": ch, "id": 1, "since": {"epoch": epoch, "seq": 3}})
        reply = await c.recv()
        assert reply == {"id": 1, "ok": True, "ch": ch, "epoch": epoch, "seq": 8, "recovered": True}
        replay = [await c.recv() for _ in range(5)]
        assert [(m["seq"], m["data"]) for m in replay] == [(s, s) for s in range(4, 9)]
        await publish(node, ch, range(9, 10))
        live = await c.next_pub(ch)
        assert live["seq"] == 9


async def test_sub_since_the_current_position_recovers_nothing_missed(node: NodeProcess) -> None:
    ch = unique("hist")
    seq = await publish(node, ch, range(3))
    async with proto_client(node.ws_url()) as c:
        r = await c.sub(ch, since={"epoch": await epoch_of(c, ch), "seq": seq})
        assert r["recovered"] is True and r["seq"] == seq
        await publish(node, ch, range(1))
        assert (await c.next_pub(ch))["seq"] == seq + 1


async def test_a_stale_epoch_is_not_recovered(node: NodeProcess) -> None:
    ch = unique("hist")
    await publish(node, ch, range(3))
    async with proto_client(node.ws_url()) as c:
        r = await c.sub(ch, since={"epoch": "another", "seq": 1})
        assert r["recovered"] is False and r["seq"] == 3
        await publish(node, ch, range(1))
        # no replay: the next frame is the live publication
        assert (await c.next_pub(ch))["seq"] == 4
        assert c.pending == []


async def test_a_position_past_the_end_is_not_recovered(node: NodeProcess) -> None:
    ch = unique("hist")
    await publish(node, ch, range(2))
    async with proto_client(node.ws_url()) as c:
        r = await c.sub(ch, since={"epoch": await epoch_of(c, ch), "seq": 10})
        assert r["recovered"] is False


async def test_a_position_older_than_the_history_is_not_recovered(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--history-size", "5"])
    ch = unique("hist")
    await publish(node, ch, range(10))  # history keeps seq 6..10
    async with proto_client(node.ws_url()) as c:
        epoch = await epoch_of(c, ch)
        assert (await c.sub(ch, since={"epoch": epoch, "seq": 4}))["recovered"] is False
    async with proto_client(node.ws_url()) as c:
        r = await c.sub(ch, since={"epoch": epoch, "seq": 5})
        assert r["recovered"] is True
        assert [(await c.recv())["seq"] for _ in range(5)] == [6, 7, 8, 9, 10]


async def test_publications_older_than_the_ttl_are_forgotten(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--history-ttl", "0.5"])
    ch = unique("hist")
    async with proto_client(node.ws_url()) as c:
        await c.sub(ch)  # a subscribed channel keeps its epoch and seq
        epoch = await epoch_of(c, ch)
        await publish(node, ch, range(3))
        await asyncio.sleep(0.8)
        r = await c.request({"op": "history", "ch": ch})
        assert r["ok"] is True and r["pubs"] == []
        assert (r["epoch"], r["seq"]) == (epoch, 3)
        assert (await c.sub(ch, since={"epoch": epoch, "seq": 1}))["recovered"] is False


async def test_an_unused_channel_is_forgotten_and_starts_a_new_epoch(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--history-ttl", "0.3"])
    ch = unique("hist")
    await publish(node, ch, range(3))
    async with proto_client(node.ws_url()) as c:
        epoch = await epoch_of(c, ch)
    await asyncio.sleep(1.0)  # past the TTL, with no subscriber: forgotten
    async with proto_client(node.ws_url()) as c:
        r = await c.sub(ch, since={"epoch": epoch, "seq": 3})
        assert r["recovered"] is False and r["epoch"] != epoch and r["seq"] == 0


async def test_a_restarted_node_has_a_new_epoch(node_factory: Callable[..., NodeProcess]) -> None:
    first = node_factory()
    async with proto_client(first.ws_url()) as c:
        epoch = (await c.sub("restart"))["epoch"]
    first.stop()
    second = node_factory()
    async with proto_client(second.ws_url()) as c:
        r = await c.sub("restart", since={"epoch": epoch, "seq": 0})
        assert r["epoch"] != epoch and r["recovered"] is False


async def test_history_op_returns_the_kept_publications_oldest_first(node: NodeProcess) -> None:
    ch = unique("hist")
    await publish(node, ch, range(1, 8))
    async with proto_client(node.ws_url()) as c:
        everything = await c.request({"op": "history", "ch": ch})
        assert everything["ok"] is True and everything["seq"] == 7
        assert everything["pubs"] == [{"ch": ch, "seq": s, "data": s} for s in range(1, 8)]
        epoch = everything["epoch"]
        last = await c.request({"op": "history", "ch": ch, "limit": 2})
        assert [p["seq"] for p in last["pubs"]] == [6, 7]
        since = await c.request(
            {"op": "history", "ch": ch, "since": {"epoch": epoch, "seq": 3}, "limit": 2}
        )
        assert [p["seq"] for p in since["pubs"]] == [4, 5]
        empty = await c.request({"op": "history", "ch": unique("never")})
        assert empty["ok"] is True and empty["pubs"] == [] and empty["seq"] == 0


async def test_history_op_refuses_a_position_it_cannot_serve(node: NodeProcess) -> None:
    ch = unique("hist")
    await publish(node, ch, range(2))
    async with proto_client(node.ws_url()) as c:
        r = await c.request(
            {"op": "history", "ch": ch, "since": {"epoch": "another", "seq": 0}, "id": 5}
        )
        assert r["id"] == 5 and r["error"]["code"] == "unrecoverable"
        assert (await c.sub(ch))["ok"] is True  # the connection goes on


async def test_history_size_zero_keeps_nothing(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--history-size", "0"])
    ch = unique("hist")
    await publish(node, ch, range(3))
    async with proto_client(node.ws_url()) as c:
        r = await c.request({"op": "history", "ch": ch})
        assert r["pubs"] == [] and r["seq"] == 3
