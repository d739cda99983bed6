"""The Redis broker: every node of a deployment shares one Redis.

What is stored where, for a channel ``C`` (prefix ``fastws``)::

    fastws:{C}:epoch     string  the channel's epoch, drawn by whichever node uses it first
    fastws:{C}:seq       string  the seq of its last publication (0: none yet)
    fastws:{C}:stream    stream  its kept publications, entry id ``0-<seq>``,
                                 fields ``t`` (Redis time in ms) and ``p`` (the payload)
    fastws:{C}:presence  hash    client id -> ``<expiry ms>:<info JSON>``
    fastws:nodes         hash    node id -> ``<expiry ms>:<info JSON>``: the live nodes
    fastws:{C}           pub/sub ``<epoch>:<seq>:<payload>``; ``:0:<payload>`` for join and leave

The braces are a Redis Cluster hash tag: all of a channel's keys live in one
slot, so the scripts below may touch them together.

A publication is numbered, kept and sent by one Lua script (``PUBLISH_LUA``),
which Redis runs atomically: however many nodes publish to a channel at
once, its seqs go 1, 2, 3... with no duplicate and no gap, and every node
that listens receives them in that order. The script builds the payload
from the prefix and suffix that Python encoded around the seq, so the bytes
are those of :func:`fastws.protocol.encode_publication`.

Expiry matches the memory broker: a publication older than the channel's
``history_ttl`` is not served, and a channel's keys expire once it has been
unused (no publication, no position or history read, no subscriber on any
node) for ``history_ttl`` (at least :data:`MIN_LIFETIME`); it then starts a
new epoch when it is used again. A node refreshes the keys of the channels
it listens to, and the presence entries of its own clients, in a
background task. When the epoch or seq key is missing (expired, evicted),
the channel starts afresh: a new epoch, seq 0 and an empty stream.

Each node holds one pub/sub connection and subscribes to a channel once,
whatever the number of its local subscribers. Every pub/sub message carries
the channel's epoch, so a node notices a channel that started afresh (its
keys flushed or evicted) even while its connection stayed up.

If Redis goes away (the pub/sub connection drops, or stays silent past
:data:`SILENCE` although it is pinged), ``ready`` turns False, commands fail
with :class:`~fastws.brokers.base.Unavailable`, and the broker reconnects
with capped, jittered backoff. Once it has re-subscribed to every channel
and Redis has confirmed them all, it is ready again and calls ``resync``:
the node then compares each channel's last seq with Redis and replays the
gap from the stream (see ``App._fill``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fastws.brokers.base import Broker, Stored, Unavailable
from fastws.brokers.publisher import Publisher
from fastws.namespaces import ChannelOptions
from fastws.protocol import Position, encode_publication

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

log = logging.getLogger(__name__)

Options = Callable[[str], ChannelOptions]
# A single Redis, or a Redis Cluster for the cluster broker (fastws.brokers.cluster).
Client = aioredis.Redis | aioredis.RedisCluster

MIN_LIFETIME = 1.0  # seconds a channel's keys live at least after its last use

# The pub/sub connection is pinged this often, and given up as dead when
# nothing (no message, no pong) came for SILENCE seconds: a peer that vanished
# without closing (a cut link, a paused VM) is noticed in bounded time.
PING_PERIOD = 5.0
SILENCE = 3 * PING_PERIOD

# Reconnecting waits a random time up to min(RECONNECT_CAP, RECONNECT_BASE *
# 2 ** attempt) ("full jitter"), so that the nodes of a deployment do not all
# reconnect to a restarted Redis in the same instant.
RECONNECT_BASE = 0.1
RECONNECT_CAP = 5.0

# A command waits this long for Redis before it fails as unavailable.
COMMAND_TIMEOUT = 5.0

# Shared by the scripts: the channel's epoch and seq, starting it afresh when
# either is missing. KEYS: seq, epoch, stream. ARGV[1]: an epoch to use if new.
_ENSURE = """
if redis.replicate_commands then redis.replicate_commands() end
local function ensure()
  local epoch = redis.call('GET', KEYS[2])
  local seq = redis.call('GET', KEYS[1])
  if not epoch or not seq then
    epoch = ARGV[1]
    redis.call('SET', KEYS[2], epoch)
    redis.call('SET', KEYS[1], 0)
    redis.call('DEL', KEYS[3])
    seq = 0
  end
  return epoch, tonumber(seq)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function touch(lifetime)
  redis.call('PEXPIRE', KEYS[1], lifetime)
  redis.call('PEXPIRE', KEYS[2], lifetime)
  redis.call('PEXPIRE', KEYS[3], lifetime)
end
"""

# ARGV: new epoch, payload prefix, payload suffix, history size, lifetime ms,
# pub/sub channel. Returns the publication's seq.
PUBLISH_LUA = (
    _ENSURE
    + """
local epoch = ensure()
local seq = redis.call('INCR', KEYS[1])
local payload = ARGV[2] .. seq .. ARGV[3]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', size, '0-' .. seq, 't', now_ms(), 'p', payload)
else
  redis.call('DEL', KEYS[3])
end
redis.call('PUBLISH', ARGV[6], epoch .. ':' .. seq .. ':' .. payload)
touch(ARGV[5])
return seq
"""
)

# ARGV: new epoch, the epoch to leave, lifetime ms. Returns {epoch, seq}.
RESTART_LUA = (
    _ENSURE
    + """
local epoch, seq = ensure()
if epoch == ARGV[2] then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
touch(ARGV[3])
return {epoch, seq}
"""
)

# ARGV: new epoch, lifetime ms, ttl ms, mode ('n': no since, 's': since),
# since epoch, since seq, limit (-1: none).
# Returns {epoch, seq, served (1/0), seq1, payload1, seq2, payload2, ...}.
HISTORY_LUA = (
    _ENSURE
    + """
local epoch, seq = ensure()
touch(ARGV[2])
local oldest = now_ms() - tonumber(ARGV[3])
local limit = tonumber(ARGV[7])
local out = {epoch, seq, 1}
local function add(entries, from)
  for i = from, #entries do
    local e = entries[i]
    if tonumber(e[2][2]) >= oldest then
      out[#out + 1] = tonumber(string.sub(e[1], 3))
      out[#out + 1] = e[2][4]
    end
  end
end
if ARGV[4] == 'n' then
  if limit == 0 then return out end
  if limit < 0 then
    add(redis.call('XRANGE', KEYS[3], '-', '+'), 1)
  else
    local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', limit)
    local n = #last
    for i = 1, math.floor(n / 2) do last[i], last[n + 1 - i] = last[n + 1 - i], last[i] end
    add(last, 1)
  end
  return out
end
local since = tonumber(ARGV[6])
if ARGV[5] ~= epoch or since > seq then out[3] = 0 return out end
if since == seq then return out end
local count = seq - since
if limit >= 0 and limit < count then count = math.max(limit, 1) end
local entries = redis.call('XRANGE', KEYS[3], '0-' .. (since + 1), '+', 'COUNT', count)
local first = entries[1]
if not first or first[1] ~= '0-' .. (since + 1) or tonumber(first[2][2]) < oldest then
  out[3] = 0
  return out
end
if limit ~= 0 then add(entries, 1) end
return out
"""
)

# KEYS: presence hash. ARGV: lifetime ms, then client, info pairs.
PRESENCE_SET_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%d', expiry) .. ':' .. ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: presence hash. Returns client, info pairs that have not expired,
# and deletes those that have.
PRESENCE_GET_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local colon = string.find(v, ':', 1, true)
  if colon and tonumber(string.sub(v, 1, colon - 1)) >= now then
    out[#out + 1] = all[i]
    out[#out + 1] = string.sub(v, colon + 1)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
"""


def redact(url: str) -> str:
    """The URL without its password, fit for a log line or an error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisBroker(Broker):
    """Numbers, keeps and carries publications through one Redis (see the module doc)."""

    # The pub/sub publish command of announce and of the publish script; the
    # cluster broker uses sharded pub/sub (SPUBLISH) instead.
    _publish_command = "PUBLISH"
    _publish_lua = PUBLISH_LUA

    def __init__(
        self,
        url: str,
        options: Options,
        shortest_ttl: float = 300.0,
        *,
        prefix: str = "fastws",
        presence_ttl: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        """``options`` gives each channel's history bounds; ``shortest_ttl`` is the
        shortest ``history_ttl`` among them, which sets how often the keys of
        subscribed channels are refreshed. A presence entry lives
        ``presence_ttl`` seconds unless its node refreshes it."""
        super().__init__()
        self.url = url
        self._options = options
        self._prefix = prefix
        self._presence_ttl_ms = max(1, int(presence_ttl * 1000))
        self._refresh_period = min(presence_ttl, max(shortest_ttl, MIN_LIFETIME)) / 3
        self._max_connections = max_connections
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._redis: Client | None = None
        self._sub: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._publisher: Publisher | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._healthy = False
        self._heard = 0.0  # loop time the pub/sub connection last said anything
        # pub/sub channel name -> channel, for the channels this node listens to
        self._names: dict[bytes, str] = {}
        self._confirming: dict[bytes, deque[asyncio.Future[None]]] = {}
        # this node's clients' presence: channel -> client -> info JSON
        self._present: dict[str, dict[str, bytes]] = {}
        self._nodes: dict[str, dict[str, Any]] = {}  # the registry as last read
        self._kept = (0, 0)  # history of the channels listened to, as last sampled

    # keys

    def _keys(self, channel: str) -> list[str]:
        base = f"{self._prefix}:{{{channel}}}"
        return [base + ":seq", base + ":epoch", base + ":stream"]

    def _nodes_key(self) -> str:
        return f"{self._prefix}:nodes"

    def _presence_key(self, channel: str) -> str:
        return f"{self._prefix}:{{{channel}}}:presence"

    def _pubsub_name(self, channel: str) -> bytes:
        return f"{self._prefix}:{{{channel}}}".encode()

    def _lifetime_ms(self, options: ChannelOptions) -> int:
        return int(max(options.history_ttl, MIN_LIFETIME) * 1000)

    # lifecycle

    async def start(self) -> None:
        # No retries inside redis-py: a publish retried after Redis ran it
        # would be published twice. A failed command is answered as
        # unavailable, and the client decides.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self._max_connections,
            timeout=None,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._register_scripts(self._redis)
        try:
            await self._redis.ping()
            sub = await self._connect_pubsub()
        except (aioredis.RedisError, OSError) as exc:
            await self._close()
            raise ConnectionError(f"cannot reach Redis at {redact(self.url)}: {exc}") from exc
        self._healthy = True
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._hold_pubsub(sub))
        self._refresher = loop.create_task(self._refresh_forever())
        self._publisher = Publisher(self._command_connection, self._publish_lua)
        self._publisher.start()

    async def _command_connection(self) -> AbstractConnection:
        """A connection of its own, set like the pool's (timeouts, no retries)."""
        assert self._pool is not None
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        await conn.connect()  # type: ignore[no-untyped-call]
        return conn

    def _register_scripts(self, client: Client) -> None:
        self._history = client.register_script(HISTORY_LUA)
        self._restart = client.register_script(RESTART_LUA)
        self._presence_set = client.register_script(PRESENCE_SET_LUA)
        self._presence_get = client.register_script(PRESENCE_GET_LUA)

    async def stop(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        for task in (self._reader, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._refresher = None
        if self._redis is not None and (self._present or self._node) and self._healthy:
            with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
                async with asyncio.timeout(1.0), self._redis.pipeline(transaction=False) as p:
                    for channel, clients in self._present.items():
                        p.hdel(self._presence_key(channel), *clients)
                    if self._node is not None:
                        p.hdel(self._nodes_key(), self._node[0])
                    await p.execute()
        self._present.clear()
        self._node = None
        await self._close()

    async def _close(self) -> None:
        self._lose(ConnectionError("the Redis broker stopped"))
        self._names.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None

    @property
    def ready(self) -> bool:
        return self._healthy and self._reader is not None and not self._reader.done()

    def _client(self) -> Client:
        if self._redis is None:
            raise Unavailable("the Redis broker is not started")
        return self._redis

    @contextlib.contextmanager
    def _reaching(self, operation: str) -> Iterator[None]:
        """Time a call to Redis for ``calls`` (/metrics), and turn Redis being
        unreachable into :class:`Unavailable` for the caller."""
        started = time.perf_counter()
        try:
            yield
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            self.calls.failed(operation)
            raise Unavailable(f"Redis at {redact(self.url)} is unavailable: {exc}") from exc
        except Exception:
            self.calls.failed(operation)
            raise
        self.calls.took(operation, time.perf_counter() - started)

    # publications

    pipelines = True

    async def publish(self, channel: str, data: Any) -> int:
        return await self.publish_soon(channel, data)

    def publish_soon(self, channel: str, data: Any) -> asyncio.Future[int]:
        if self._publisher is None:
            raise Unavailable("the Redis broker is not started")
        args = self._publish_args(channel, data)
        started = time.perf_counter()
        future = self._publisher.submit(self._keys(channel), args)
        future.add_done_callback(lambda f: self._published(f, started))
        return future

    def _published(self, future: asyncio.Future[int], started: float) -> None:
        if future.cancelled() or future.exception() is not None:
            self.calls.failed("publish")
        else:
            self.calls.took("publish", time.perf_counter() - started)

    def _publish_args(self, channel: str, data: Any) -> list[Any]:
        """ARGV of the publish script; refuses data that cannot be encoded."""
        options = self._options(channel)
        head = orjson.dumps({"ch": channel})[:-1] + b',"seq":'
        whole = encode_publication(channel, 0, data)
        tail = whole[len(head) + 1 :]
        return [
            secrets.token_hex(4),
            head,
            tail,
            options.history_size,
            self._lifetime_ms(options),
            self._pubsub_name(channel),
        ]

    async def position(self, channel: str) -> Position:
        position, _ = await self._read(channel, None, 0, "position")
        return position

    async def restart(self, channel: str, epoch: str) -> Position:
        options = self._options(channel)
        with self._reaching("restart"):
            reply = await self._restart(
                keys=self._keys(channel),
                args=[secrets.token_hex(4), epoch, self._lifetime_ms(options)],
                client=self._client(),
            )
        return Position(reply[0].decode(), int(reply[1]))

    async def history(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> tuple[Position, list[Stored] | None]:
        return await self._read(channel, since, limit, "history")

    async def _read(
        self, channel: str, since: Position | None, limit: int | None, operation: str
    ) -> tuple[Position, list[Stored] | None]:
        client = self._client()
        options = self._options(channel)
        with self._reaching(operation):
            reply = await self._history(
                keys=self._keys(channel),
                args=[
                    secrets.token_hex(4),
                    self._lifetime_ms(options),
                    int(options.history_ttl * 1000),
                    "n" if since is None else "s",
                    "" if since is None else since.epoch,
                    0 if since is None else since.seq,
                    -1 if limit is None else min(limit, 1 << 30),  # Lua counts in doubles
                ],
                client=client,
            )
        position = Position(reply[0].decode(), int(reply[1]))
        if not reply[2]:
            return position, None
        return position, [Stored(int(reply[i]), reply[i + 1]) for i in range(3, len(reply), 2)]

    async def announce(self, channel: str, payload: bytes) -> None:
        with self._reaching("announce"):
            await self._client().execute_command(
                self._publish_command, self._pubsub_name(channel), b":0:" + payload
            )

    # subscriptions

    async def subscribe(self, channel: str) -> None:
        sub = self._sub
        if sub is None or not self.ready:
            raise Unavailable(f"Redis at {redact(self.url)} is unavailable (reconnecting)")
        name = self._pubsub_name(channel)
        self._names[name] = channel
        confirmed = self._confirmation(name)
        with self._reaching("subscribe"):
            await sub.send_command("SUBSCRIBE", name, check_health=False)
            # Redis answers in order; the reader resolves this once Redis has
            # confirmed, and from then on no publication to the channel is missed.
            await confirmed

    async def unsubscribe(self, channel: str) -> None:
        name = self._pubsub_name(channel)
        self._names.pop(name, None)
        if self._sub is not None and self._healthy:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._sub.send_command("UNSUBSCRIBE", name, check_health=False)

    def _confirmation(self, name: bytes) -> asyncio.Future[None]:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirming.setdefault(name, deque()).append(confirmed)
        return confirmed

    async def _connect_pubsub(self) -> AbstractConnection:
        """A new pub/sub connection, subscribed again to every channel listened to.

        It speaks RESP2, where a message is a plain reply (RESP3 would hand
        it to a push handler), and waits for messages as long as it takes.
        """
        assert self._pool is not None
        options = aioredis.ConnectionPool.from_url(
            self.url, protocol=2, socket_timeout=None, socket_connect_timeout=COMMAND_TIMEOUT
        ).connection_kwargs
        sub = self._pool.connection_class(**options)
        await sub.connect()  # type: ignore[no-untyped-call]
        self._sub = sub
        self._heard = asyncio.get_running_loop().time()
        return sub

    async def _hold_pubsub(self, sub: AbstractConnection) -> None:
        """Read the pub/sub connection; when it is lost, connect and subscribe again."""
        loop = asyncio.get_running_loop()
        confirmed: list[asyncio.Future[None]] | None = None
        while True:
            reader = loop.create_task(self._read_pubsub(sub))
            pinger = loop.create_task(self._ping_forever(sub))
            try:
                if confirmed is not None:
                    await self._rejoined(confirmed)
                await reader
            except (aioredis.RedisError, OSError) as exc:
                log.error("lost the Redis pub/sub connection to %s: %r", redact(self.url), exc)
                self.calls.failed("pubsub")
                self._lose(exc)
            finally:
                reader.cancel()
                pinger.cancel()
                await sub.disconnect()
            # Pooled connections are as dead as this one was; drop the idle
            # ones so that the next commands connect afresh.
            if self._pool is not None:
                await self._pool.disconnect(inuse_connections=False)
            if self._publisher is not None:
                await self._publisher.drop()
            sub, confirmed = await self._reconnect()

    async def _reconnect(self) -> tuple[AbstractConnection, list[asyncio.Future[None]]]:
        """Connect again, with backoff, and subscribe to every channel listened to."""
        attempt = 0
        while True:
            cap = min(RECONNECT_CAP, RECONNECT_BASE * 2**attempt)
            await asyncio.sleep(random.uniform(0, cap))
            attempt += 1
            try:
                sub = await self._connect_pubsub()
                confirmed = [self._confirmation(name) for name in self._names]
                if self._names:
                    await sub.send_command("SUBSCRIBE", *self._names, check_health=False)
                return sub, confirmed
            except (aioredis.RedisError, OSError) as exc:
                log.warning("reconnecting to Redis at %s failed: %r", redact(self.url), exc)
                self._lose(exc)

    async def _rejoined(self, confirmed: list[asyncio.Future[None]]) -> None:
        """Once Redis confirmed every subscription again: ready, and the node resyncs."""
        await asyncio.gather(*confirmed)
        log.warning("reconnected to Redis at %s", redact(self.url))
        self._healthy = True
        try:
            await self.refresh()  # presence that a restarted Redis lost comes back now
        except (aioredis.RedisError, OSError) as exc:
            log.warning("refreshing Redis keys failed: %r", exc)
        if self._resync is not None:
            self._resync()

    def _lose(self, exc: BaseException) -> None:
        """The pub/sub connection is gone: not ready, and no subscription confirms."""
        self._healthy = False
        self._sub = None
        for waiting in self._confirming.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(Unavailable(f"Redis pub/sub lost: {exc!r}"))
        self._confirming.clear()

    async def _ping_forever(self, sub: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_PERIOD)
            if loop.time() - self._heard > SILENCE:
                log.error("the Redis pub/sub connection to %s went silent", redact(self.url))
                await sub.disconnect()  # the reader fails, and reconnects
                return
            with contextlib.suppress(aioredis.RedisError, OSError):
                await sub.send_command("PING", check_health=False)

    async def _read_pubsub(self, sub: AbstractConnection) -> None:
        try:
            await self._read_messages(sub)
        except Exception as exc:
            self._lose(exc)  # fails the confirmations a reconnect waits for
            raise

    async def _read_messages(self, sub: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await sub.read_response()
            self._heard = loop.time()
            kind = message[0]
            if kind == b"message":
                self._on_message(message[1], message[2])
            elif kind == b"subscribe":
                waiting = self._confirming.get(message[1])
                if waiting:
                    future = waiting.popleft()
                    if not waiting:
                        del self._confirming[message[1]]
                    if not future.done():
                        future.set_result(None)

    def _on_message(self, name: bytes, data: bytes) -> None:
        """Hand a pub/sub message, ``<epoch>:<seq>:<payload>``, to the node."""
        channel = self._names.get(name)
        if channel is None or self._deliver is None:
            return  # unsubscribed meanwhile
        first = data.index(b":")
        second = data.index(b":", first + 1)
        try:
            self._deliver(
                channel, data[:first].decode(), int(data[first + 1 : second]), data[second + 1 :]
            )
        except Exception:
            log.exception("delivering a publication of %r failed", channel)

    # presence

    async def add_presence(self, channel: str, client: str, info: dict[str, Any]) -> None:
        encoded = orjson.dumps(info)
        self._present.setdefault(channel, {})[client] = encoded
        with self._reaching("presence_add"):
            await self._presence_set(
                keys=[self._presence_key(channel)],
                args=[self._presence_ttl_ms, client, encoded],
                client=self._client(),
            )

    async def remove_presence(self, channel: str, client: str) -> None:
        present = self._present.get(channel)
        if present is not None:
            present.pop(client, None)
            if not present:
                del self._present[channel]
        with self._reaching("presence_remove"):
            await self._client().hdel(self._presence_key(channel), client)

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        with self._reaching("presence"):
            reply = await self._presence_get(
                keys=[self._presence_key(channel)], client=self._client()
            )
        return {reply[i].decode(): orjson.loads(reply[i + 1]) for i in range(0, len(reply), 2)}

    # upkeep

    async def register(self, node: str, info: Callable[[], dict[str, Any]]) -> None:
        await super().register(node, info)
        await self.refresh()

    async def nodes(self) -> dict[str, dict[str, Any]]:
        with self._reaching("nodes"):
            reply = await self._presence_get(keys=[self._nodes_key()], client=self._client())
        self._nodes = {
            reply[i].decode(): orjson.loads(reply[i + 1]) for i in range(0, len(reply), 2)
        }
        return self._nodes

    @property
    def known_nodes(self) -> dict[str, dict[str, Any]]:
        return {**self._nodes, **super().known_nodes}

    async def refresh(self) -> None:
        """Extend the keys of the channels this node listens to, its clients' presence
        and its registry entry; then read the registry."""
        client = self._client()
        async with client.pipeline(transaction=False) as pipe:
            if self._node is not None:
                node, info = self._node
                await self._presence_set(
                    keys=[self._nodes_key()],
                    args=[self._presence_ttl_ms, node, orjson.dumps(info())],
                    client=self._in_refresh(pipe),
                )
            for channel in list(self._names.values()):
                lifetime = self._lifetime_ms(self._options(channel))
                for key in self._keys(channel):
                    pipe.pexpire(key, lifetime)
            for channel, clients in list(self._present.items()):
                args: list[Any] = [self._presence_ttl_ms]
                for pair in clients.items():
                    args.extend(pair)
                await self._presence_set(
                    keys=[self._presence_key(channel)], args=args, client=self._in_refresh(pipe)
                )
            await pipe.execute()
        await self._sample_kept(client)
        if self._node is not None:
            await self.nodes()

    async def _sample_kept(self, client: Client) -> None:
        """Read how much history the channels this node listens to keep, for ``kept``.

        The stream lengths, as stored: entries past ``history_ttl`` that no
        publication has trimmed yet count too, as they take Redis memory.
        """
        channels = list(self._names.values())
        lengths: list[int] = []
        if channels:
            async with client.pipeline(transaction=False) as pipe:
                for channel in channels:
                    pipe.xlen(self._keys(channel)[2])
                lengths = await pipe.execute()
        self._kept = (sum(1 for n in lengths if n), sum(lengths))

    def kept(self) -> tuple[int, int]:
        """As last sampled by the refresh (every few seconds), of the channels listened to."""
        return self._kept

    def _in_refresh(self, pipe: Any) -> Any:
        """Where refresh runs a script: queued in its pipeline (a cluster runs it apart)."""
        return pipe

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_period)
            if not self._healthy:
                continue  # the keys are refreshed as soon as Redis is back
            try:
                await self.refresh()
            except (aioredis.RedisError, OSError) as exc:
                log.warning("refreshing Redis keys failed: %r", exc)
