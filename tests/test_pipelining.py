"""A client's pub commands, pipelined through Redis: numbered, answered and applied in order.

With the Redis broker a node hands a connection's pubs to one Redis
connection without waiting for each seq (fastws/brokers/publisher.py), so a
burst reaches Redis, and every node, as one batch. These tests hold it to
what one-at-a-time gave: seqs in the order sent, replies in that order,
subscribers seeing the data in that order, and a later command taking
effect after them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from conftest import HOST, proto_client, unique

from fastws import App
from fastws.config import Config

BURST = 300


@pytest.fixture
async def node(redis_server: str) -> AsyncIterator[Any]:
    app = App(Config(redis=redis_server, history_size=1000, log_level="warning"))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    yield node
    await asyncio.wait_for(node.stop(), 10)


async def test_a_burst_of_pubs_is_numbered_answered_and_delivered_in_order(node: Any) -> None:
    ch = unique("burst")
    url = f"ws://{HOST}:{node.port}/ws"
    async with proto_client(url) as publisher, proto_client(url) as subscriber:
        start = (await subscriber.sub(ch))["seq"]
        for n in range(BURST):
            await publisher.send({"op": "pub", "ch": ch, "data": n, "id": n})
        replies = [await publisher.recv() for _ in range(BURST)]
        assert [r["id"] for r in replies] == list(range(BURST))
        assert [r["seq"] for r in replies] == list(range(start + 1, start + BURST + 1))
        got = [await subscriber.next_pub(ch) for _ in range(BURST)]
        assert [(m["seq"], m["data"]) for m in got] == [(start + 1 + n, n) for n in range(BURST)]


async def test_a_command_after_pipelined_pubs_takes_effect_after_them(node: Any) -> None:
    ch = unique("after")
    async with proto_client(f"ws://{HOST}:{node.port}/ws") as c:
        for n in range(50):
            await c.send({"op": "pub", "ch": ch, "data": n})  # no id: no reply
        await c.send({"op": "history", "ch": ch, "id": 1})
        reply = await c.reply_to(1)
        assert reply["seq"] == 50
        assert [json.loads(json.dumps(p))["data"] for p in reply["pubs"]] == list(range(50))


async def test_bad_data_is_refused_before_it_takes_a_seq(node: Any) -> None:
    ch = unique("bad")
    async with proto_client(f"ws://{HOST}:{node.port}/ws") as c:
        assert await c.pub(ch, "one") == 1
        # Read up to 1024 levels deep, written up to 254: refused, no seq taken.
        deep = "[" * 300 + "]" * 300
        await c.send(f'{{"op": "pub", "ch": "{ch}", "data": {deep}, "id": 7}}')
        reply = await c.reply_to(7)
        assert reply["error"]["code"] == "bad_request", reply
        assert await c.pub(ch, "two") == 2


async def test_a_flushed_script_cache_is_loaded_again_without_losing_a_pub(
    node: Any, redis_server: str
) -> None:
    ch = unique("flush")
    async with proto_client(f"ws://{HOST}:{node.port}/ws") as c:
        assert await c.pub(ch, 1) == 1
        r = aioredis.Redis.from_url(redis_server)
        try:
            await r.script_flush()
        finally:
            await r.aclose()
        for n in range(20):
            await c.send({"op": "pub", "ch": ch, "data": n, "id": n})
        replies = [await c.recv() for _ in range(20)]
        assert [r.get("seq") for r in replies] == list(range(2, 22)), replies


async def test_pipelined_pubs_are_held_to_the_same_permissions(redis_server: str) -> None:
    secret = "pipelining-secret-" + "k" * 40
    config = Config(
        redis=redis_server,
        token_secret=secret,
        namespaces={"feed": {"client_publish": False}},
        log_level="warning",
    )
    app = App(config)
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    try:
        grant = {"sub": "ann", "exp": time.time() + 60, "pubs": ["chat:*", "feed:*"]}
        url = f"ws://{HOST}:{node.port}/ws?token={jwt.encode(grant, secret, 'HS256')}"
        async with proto_client(url) as c:
            for n, ch in enumerate([f"feed:{unique()}", f"other:{unique()}", f"chat:{unique()}"]):
                await c.send({"op": "pub", "ch": ch, "data": n, "id": n})
            replies = [await c.recv() for _ in range(3)]
        assert [r.get("error", {}).get("code") for r in replies] == ["forbidden", "forbidden", None]
        assert replies[2]["seq"] == 1
    finally:
        await asyncio.wait_for(node.stop(), 10)
