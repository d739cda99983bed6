"""Redis going away under load: nodes keep their clients, reconnect, and lose nothing.

Each test has a redis-server of its own (it is killed and restarted) and two
nodes in this process sharing it, A and B. Publications go in through B
while A's subscribers are watched: after the outage every subscriber must
have every seq once, in order, on the connection it had all along, unless
Redis lost the history (no persistence), which A's subscribers must be told
of: close 1012, and ``recovered: false`` when they subscribe again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import (
    HOST,
    ahttp_get,
    proto_client,
    start_redis,
    unique,
)
from tcpproxy import TcpProxy

import fastws.client
from fastws import App
from fastws.brokers.base import Unavailable
from fastws.config import Config

PUBLICATIONS = 400


class RedisProcess:
    """A redis-server on a fixed port that a test may kill and start again."""

    def __init__(self, workdir: Path, persist: bool) -> None:
        self.options = ["--dir", str(workdir)]
        if persist:  # every write on disk before it is acknowledged
            self.options += ["--appendonly", "yes", "--appendfsync", "always"]
        self.server = start_redis(*self.options)
        self.port = self.server.port
        self.url = f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.server = start_redis(*self.options, port=self.port)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed that was not already."""
        self.server.send_signal(signal.SIGKILL)
        self.server.proc.wait(5)
        self.server.cleanup_files()

    def stop(self) -> None:
        self.server.stop()
        self.server.cleanup_files()


@contextlib.contextmanager
def redis_process(tmp_path: Path, persist: bool) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, persist)
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def nodes(*urls: str) -> AsyncIterator[list[Any]]:
    started = []
    try:
        for url in urls:
            app = App(Config(redis=url, history_size=PUBLICATIONS, log_level="warning"))
            app.channels("/ws")
            started.append(await asyncio.wait_for(app.serve(host=HOST, port=0), 10))
        yield started
    finally:
        for node in started:
            await asyncio.wait_for(node.stop(), 10)


async def ready(node: Any) -> int:
    return (await ahttp_get(node.port, "/readyz")).status


async def until(check: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def publish_through_outages(app: App, ch: str, count: int) -> list[int]:
    """Publish count values, each retried until the broker takes it; their seqs."""
    seqs = []
    for n in range(count):
        while True:
            try:
                seqs.append(await app.publish(ch, n))
                break
            except Unavailable:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.003)
    return seqs


async def watch(url: str, ch: str, last: asyncio.Future[int]) -> list[int]:
    """Subscribe and collect seqs until the publisher's last one; fail on a close."""
    async with proto_client(url) as c:
        start = (await c.sub(ch))["seq"]
        seqs = [start]
        async with asyncio.timeout(30):
            while not last.done() or seqs[-1] < last.result():
                with contextlib.suppress(TimeoutError):  # recv() is cancellation-safe
                    seqs.append(json.loads(await asyncio.wait_for(c.ws.recv(), 0.2))["seq"])
        return seqs


async def test_a_cut_link_is_noticed_and_the_gap_replayed(tmp_path: Path) -> None:
    with redis_process(tmp_path, persist=False) as redis_server:
        proxy = await TcpProxy.start(HOST, redis_server.port)
        try:
            async with nodes(f"redis://{HOST}:{proxy.port}/0", redis_server.url) as (a, b):
                ch = unique("cut")
                last: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                url = f"ws://{HOST}:{a.port}/ws"
                watchers = [asyncio.create_task(watch(url, ch, last)) for _ in range(5)]
                await asyncio.sleep(0.3)
                publisher = asyncio.create_task(publish_through_outages(b.app, ch, PUBLICATIONS))
                await asyncio.sleep(0.4)
                proxy.refusing = True
                proxy.cut()  # A loses Redis; B goes on publishing
                await until(lambda: _is(ready(a), 503))
                async with proto_client(url) as c:
                    r = await c.request({"op": "pub", "ch": ch, "data": "x"})
                    assert r["error"]["code"] == "unavailable", r
                    r = await c.request({"op": "sub", "ch": unique("new")})
                    assert r["error"]["code"] == "unavailable", r
                await asyncio.sleep(0.5)
                proxy.refusing = False
                await until(lambda: _is(ready(a), 200))
                seqs = await publisher
                last.set_result(seqs[-1])
                for got in await asyncio.gather(*watchers):
                    assert got == list(range(got[0], seqs[-1] + 1)), got[:30]
                    assert got[0] < seqs[0] + 50  # subscribed before the outage
        finally:
            await proxy.close()


async def _is(status: Any, expected: int) -> bool:
    try:
        return bool(await status == expected)
    except OSError:
        return False


async def test_redis_restarted_with_its_data_loses_nothing(tmp_path: Path) -> None:
    with redis_process(tmp_path, persist=True) as redis_server:
        async with nodes(redis_server.url, redis_server.url) as (a, b):
            ch = unique("restart")
            last: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            watchers = [
                asyncio.create_task(watch(f"ws://{HOST}:{node.port}/ws", ch, last))
                for node in (a, a, a, b, b)
            ]
            await asyncio.sleep(0.3)
            publisher = asyncio.create_task(publish_through_outages(b.app, ch, PUBLICATIONS))
            await asyncio.sleep(0.4)
            redis_server.kill()
            await until(lambda: _is(ready(a), 503))
            assert await ready(b) == 503
            await asyncio.sleep(0.5)
            redis_server.start()
            await until(lambda: _is(ready(a), 200))
            await until(lambda: _is(ready(b), 200))
            seqs = await publisher
            assert seqs == sorted(set(seqs))  # one seq per publication taken, in order
            last.set_result(seqs[-1])
            for got in await asyncio.gather(*watchers):
                assert got == list(range(got[0], seqs[-1] + 1)), got[:30]


async def test_redis_restarted_empty_closes_subscribers_who_then_learn_it(
    tmp_path: Path,
) -> None:
    with redis_process(tmp_path, persist=False) as redis_server:
        async with nodes(redis_server.url, redis_server.url) as (a, b):
            ch = unique("lost")
            url = f"ws://{HOST}:{a.port}/ws"
            async with proto_client(url) as raw, fastws.client.connect(url, min_delay=0.05) as sdk:
                before = await raw.sub(ch)
                subscription = await sdk.subscribe(ch)
                for n in range(3):
                    await b.app.publish(ch, n)
                for _ in range(3):
                    await raw.next_pub(ch)
                    assert isinstance(await subscription.get(), fastws.client.Publication)
                redis_server.kill()
                await until(lambda: _is(ready(a), 503))
                redis_server.start()
                await until(lambda: _is(ready(a), 200))
                await until(lambda: _is(ready(b), 200))
                await b.app.publish(ch, "after")  # seq 1 of a new epoch
                with pytest.raises(Exception) as closed:
                    while True:
                        await raw.recv(10)
                assert getattr(closed.value, "rcvd", None) is not None, closed.value
                assert closed.value.rcvd.code == 1012  # type: ignore[attr-defined]
                async with proto_client(url) as again:
                    r = await again.sub(ch, since={"epoch": before["epoch"], "seq": 3})
                    assert r["recovered"] is False and r["epoch"] != before["epoch"]
                # The SDK's subscription says so too: a Reset at the new epoch.
                item = await asyncio.wait_for(subscription.get(), 10)
                assert isinstance(item, fastws.client.Reset), item
                assert item.epoch != before["epoch"]


async def test_a_flushed_channel_is_noticed_while_connected(
    redis_server: str,
) -> None:
    async with nodes(redis_server, redis_server) as (a, b):
        ch = unique("flushed")
        async with proto_client(f"ws://{HOST}:{a.port}/ws") as c:
            await c.sub(ch)
            await b.app.publish(ch, 1)
            assert (await c.next_pub(ch))["seq"] == 1
            await b.app.publish(ch, 2)
            assert (await c.next_pub(ch))["seq"] == 2
            r = aioredis.Redis.from_url(redis_server)
            try:
                keys = [k async for k in r.scan_iter(match=f"fastws:{{{ch}}}*")]
                await r.delete(*keys)  # evicted, or flushed by an operator
            finally:
                await r.aclose()
            await b.app.publish(ch, 3)  # seq 1 of a new epoch: not dropped as old
            with pytest.raises(Exception) as closed:
                while True:
                    await c.recv(10)
            assert closed.value.rcvd.code == 1012  # type: ignore[attr-defined]


async def test_a_client_resubscribing_while_redis_is_down_waits_and_recovers(
    redis_server: str,
) -> None:
    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    to_redis = await TcpProxy.start(HOST, redis_port)
    try:
        async with nodes(f"redis://{HOST}:{to_redis.port}/0", redis_server) as (a, b):
            to_a = await TcpProxy.start(HOST, a.port)
            ch = unique("resub")
            url = f"ws://{HOST}:{to_a.port}/ws"
            try:
                async with fastws.client.connect(url, min_delay=0.05, max_delay=0.2) as client:
                    subscription = await client.subscribe(ch)
                    for n in range(5):
                        await b.app.publish(ch, n)
                    to_redis.refusing = True
                    to_redis.cut()  # A loses Redis...
                    await until(lambda: _is(ready(a), 503))
                    to_a.cut()  # ...and the client A: it comes back and resubscribes
                    await until(lambda: _bool(client.connects == 2))
                    for n in range(5, 10):
                        await b.app.publish(ch, n)
                    await asyncio.sleep(0.5)  # resubscriptions answered `unavailable`
                    to_redis.refusing = False
                    items = [await asyncio.wait_for(subscription.get(), 10) for _ in range(10)]
                    assert [(i.seq, i.data) for i in items] == [(n + 1, n) for n in range(10)]
            finally:
                await to_a.close()
    finally:
        await to_redis.close()


async def _bool(value: bool) -> bool:
    return value


async def test_a_channel_whose_seq_went_back_gets_a_new_epoch(redis_server: str) -> None:
    async with nodes(redis_server, redis_server) as (a, b):
        ch = unique("back")
        url = f"ws://{HOST}:{a.port}/ws"
        async with proto_client(url) as c:
            first = await c.sub(ch)
            for n in range(5):
                await b.app.publish(ch, n)
            assert [(await c.next_pub(ch))["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
            r = aioredis.Redis.from_url(redis_server)
            try:
                # What a failover to a replica that lagged two writes behind looks like.
                await r.set(f"fastws:{{{ch}}}:seq", 3)
                await r.xdel(f"fastws:{{{ch}}}:stream", "0-4", "0-5")
                await r.execute_command("XSETID", f"fastws:{{{ch}}}:stream", "0-3")
                await r.client_kill_filter(_type="pubsub")  # and the nodes' links drop
            finally:
                await r.aclose()
            with pytest.raises(Exception) as closed:
                while True:
                    await c.recv(10)
            assert closed.value.rcvd.code == 1012  # type: ignore[attr-defined]
        async with proto_client(url) as again:
            for seq in (5, 2):  # a position past the end, or in the reused range
                r2 = await again.request(
                    {"op": "sub", "ch": ch, "since": {"epoch": first["epoch"], "seq": seq}}
                )
                assert r2["recovered"] is False and r2["epoch"] != first["epoch"], r2
                assert r2["seq"] == 3
                await again.unsub(ch)
            await again.sub(ch)
            assert await b.app.publish(ch, "next") == 4
            m = await again.next_pub(ch)
            assert (m["seq"], m["data"]) == (4, "next")
