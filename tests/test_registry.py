"""The node registry: every node of a deployment enters itself in Redis, with a TTL.

A node's ``/info`` lists the live nodes (id, address, state, connections,
start time, pid); a node that stops takes its entry away, and one that dies
drops out once its entry's TTL passes without a refresh.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from conftest import NodeProcess, ahttp_get, proto_client

from fastws.brokers.memory import MemoryBroker
from fastws.brokers.redis import RedisBroker
from fastws.namespaces import ChannelOptions


def options(channel: str) -> ChannelOptions:
    return ChannelOptions(100, 300.0, False, False)


async def test_nodes_register_refresh_and_drop_out(redis_server: str) -> None:
    prefix = f"registry-{time.monotonic_ns()}"
    a = RedisBroker(redis_server, options, prefix=prefix, presence_ttl=1.0)
    b = RedisBroker(redis_server, options, prefix=prefix, presence_ttl=1.0)
    c = RedisBroker(redis_server, options, prefix=prefix, presence_ttl=1.0)
    for broker in (a, b, c):
        await broker.start()
    try:
        conns = {"a": 1}
        await a.register("a", lambda: {"address": "10.0.0.1:8080", "connections": conns["a"]})
        await b.register("b", lambda: {"address": "10.0.0.2:8080", "connections": 0})
        await c.register("c", lambda: {"address": "10.0.0.3:8080", "connections": 0})
        assert set(await a.nodes()) == {"a", "b", "c"}
        conns["a"] = 7
        await asyncio.sleep(0.8)  # each refreshes its own entry with fresh info
        live = await b.nodes()
        assert set(live) == {"a", "b", "c"} and live["a"]["connections"] == 7
        assert b.known_nodes.keys() == live.keys()  # kept for /info, read without waiting
        await c.stop()  # a node that stops takes its entry away at once
        assert set(await a.nodes()) == {"a", "b"}
        assert b._refresher is not None
        b._refresher.cancel()  # a node that died: nobody refreshes its entry
        await asyncio.sleep(1.5)
        assert set(await a.nodes()) == {"a"}
    finally:
        await a.stop()
        await b.stop()


async def test_a_single_node_knows_only_itself() -> None:
    broker = MemoryBroker(options)
    assert await broker.nodes() == {}
    await broker.register("solo", lambda: {"connections": 3})
    assert await broker.nodes() == {"solo": {"connections": 3}}


async def test_info_lists_the_live_nodes(
    redis_server: str, node_factory: Callable[..., NodeProcess]
) -> None:
    a = node_factory(args=["--redis", redis_server, "--node-name", "info-a"])
    b = node_factory(args=["--redis", redis_server, "--node-name", "info-b"])
    async with proto_client(b.ws_url()), proto_client(b.ws_url()):
        async with asyncio.timeout(10):  # /info reads the registry for the next request
            while True:
                response = await ahttp_get(a.port, "/info")
                assert response.status == 200
                info: dict[str, Any] = json.loads(response.body)
                if "info-b" in info["nodes"]:
                    break
                await asyncio.sleep(0.1)
        assert response.headers["content-type"] == "application/json"
        assert info["node"] == "info-a"
        nodes = info["nodes"]
        assert {"info-a", "info-b"} <= set(nodes)
        assert nodes["info-a"]["address"].endswith(f":{a.port}")
        assert nodes["info-b"]["address"].endswith(f":{b.port}")
        assert nodes["info-a"]["state"] == "serving"
        assert nodes["info-b"]["pid"] == b.pid
        assert 0 < time.time() - nodes["info-b"]["started"] < 120
        own = await ahttp_get(b.port, "/info")
        assert json.loads(own.body)["nodes"]["info-b"]["connections"] == 2
