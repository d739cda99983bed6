"""Publishing through one Redis connection, pipelined, in the order asked.

A publication waits for Redis's answer, its seq. Sent one at a time, each
reaches Redis alone, Redis publishes it alone, and every node writes it to
each of its subscribers in a write of its own: the batching that makes a
node's fanout cheap (many publications in one write per subscriber) is
lost. A :class:`Publisher` keeps one connection and, while a batch is in
flight, queues what comes next; the queue then goes out in one write, Redis
runs the scripts back to back, and the nodes read their publications
together and write them to each subscriber together.

One connection also keeps the order: publications submitted one after
another (a client's pipelined ``pub`` commands) are numbered in that order,
which a pool of connections would not promise.

A failed connection fails what was in flight as unavailable (Redis may or
may not have run it, as for any command whose answer was lost) and the next
batch connects again. The script is loaded on every new connection, since a
restarted Redis has forgotten it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from fastws.brokers.base import Unavailable

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

Command = tuple[Any, ...]


class Publisher:
    """Runs one Lua script per submission, in submission order, batched (see the module doc)."""

    def __init__(self, connect: Callable[[], Awaitable[AbstractConnection]], script: str) -> None:
        self._connect = connect
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._queue: list[tuple[Command, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._conn: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail(self._queue, Unavailable("the Redis broker stopped"))
        self._queue = []
        await self.drop()

    def submit(self, keys: list[Any], args: list[Any]) -> asyncio.Future[int]:
        """Queue one run of the script; its future is the script's integer answer."""
        if self._task is None:
            raise Unavailable("the Redis broker is not started")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((("EVALSHA", self._sha, len(keys), *keys, *args), future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._send(batch)
            except (aioredis.RedisError, OSError) as exc:
                await self.drop()
                self._fail(batch, Unavailable(f"publishing through Redis failed: {exc!r}"))
            except Exception as exc:  # a bug: fail this batch, keep publishing the next
                await self.drop()
                self._fail(batch, exc)

    async def _send(self, batch: list[tuple[Command, asyncio.Future[int]]]) -> None:
        conn = self._conn or await self._open()
        await conn.send_packed_command(conn.pack_commands([c for c, _ in batch]), False)
        forgotten: list[tuple[Command, asyncio.Future[int]]] = []
        reordered = False  # one was run after one that was not
        for item in batch:
            future = item[1]
            try:
                answer = await conn.read_response()
            except NoScriptError:
                forgotten.append(item)
                continue
            except aioredis.ResponseError as exc:
                # OOM, READONLY (a replica now): Redis cannot take it now.
                self._fail([item], Unavailable(f"Redis refused the publication: {exc}"))
                continue
            reordered = reordered or bool(forgotten)
            if not future.done():
                future.set_result(int(answer))
        if forgotten:
            # The script cache was flushed (SCRIPT FLUSH, or a Redis that
            # restarted under this connection): none of these was run. Sent
            # again once the script is loaded, unless a later one was run
            # meanwhile, which sending them now would overtake.
            await self.drop()
            if reordered:
                self._fail(forgotten, Unavailable("Redis lost the publish script"))
            else:
                await self._send(forgotten)

    async def _open(self) -> AbstractConnection:
        conn = await self._connect()
        await conn.send_command("SCRIPT", "LOAD", self._script, check_health=False)
        await conn.read_response()
        self._conn = conn
        return conn

    async def drop(self) -> None:
        """Close the connection (Redis went away); the next batch opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()

    @staticmethod
    def _fail(batch: list[tuple[Command, asyncio.Future[int]]], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
