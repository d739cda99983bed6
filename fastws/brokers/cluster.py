"""The Redis Cluster broker: the Redis broker's keys and scripts, spread over shards.

Everything the Redis broker keeps for a channel ``C`` is named with the hash
tag ``{C}`` (``fastws:{C}:seq``, ``:epoch``, ``:stream``, ``:presence``), and
so is its pub/sub channel ``fastws:{C}``: all of a channel lives in one hash
slot, on the master (shard) that owns the slot. The scripts run there
(redis-py's RedisCluster routes EVALSHA by its keys), and the publish script
sends with SPUBLISH, sharded pub/sub, which carries a message within its
shard only, where PUBLISH would copy it to every node of the cluster.

A node holds one sharded pub/sub connection per master that owns channels it
listens to, and SSUBSCRIBEs each channel on the master that owns the
channel's slot. Each command on such a connection is sent with a
``PING <token>`` after it: Redis answers in order, so whatever arrives
before the token's pong (a MOVED error, or a ``sunsubscribe`` that Redis
pushed because the slot left) belongs to that command.

A channel loses its subscription when its slot moves to another master
(resharding; or a failover, where a replica takes over the slots) or when
its connection drops or goes silent (the master died, or cannot be
reached). The old master then pushes ``sunsubscribe``, answers SSUBSCRIBE
with MOVED, or is gone. Either way the broker reads the slot map again
(CLUSTER SLOTS), subscribes the channel on the master that owns it now,
retrying with the Redis broker's capped, jittered backoff while no master
answers for the slot, and then calls ``resync``: the node compares each
channel's last seq with its history and replays what passed meanwhile.
While any channel waits for its new subscription, ``ready`` is False.

Why not redis-py's own ``ClusterPubSub``: its ``ssubscribe`` returns before
Redis confirms (the node's join relies on "subscribed, then read the
position"), reading means polling each shard's connection in turn with a
timeout, and after a slot moves or a connection is re-made it subscribes
again without telling anyone that messages may have been missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions as errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fastws.brokers.base import Unavailable
from fastws.brokers.redis import (
    COMMAND_TIMEOUT,
    PING_PERIOD,
    PUBLISH_LUA,
    RECONNECT_BASE,
    RECONNECT_CAP,
    SILENCE,
    RedisBroker,
    redact,
)

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode

log = logging.getLogger(__name__)

SPUBLISH_LUA = PUBLISH_LUA.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
assert SPUBLISH_LUA != PUBLISH_LUA

# Times a subscription goes after its channel's slot (MOVED, a master that
# does not answer) before the call fails as unavailable; the slot map is
# read again between two tries.
MAX_TRIES = 5

# Errors that say a master or the slot map is unavailable right now.
_CLUSTER_TROUBLE = (
    errors.ClusterDownError,  # and MasterDownError
    errors.TryAgainError,
    errors.RedisClusterException,  # no reachable startup node, a slot not covered
)


class _Cluster(aioredis.RedisCluster):
    """A RedisCluster whose commands wait for one of ``limit`` slots.

    A RedisCluster fails a command when a master's connections are all in
    use, where the Redis broker's blocking pool waits for one: a burst of
    publications would be refused as unavailable. Commands queue here
    instead, and each master is allowed more connections than ``limit``.
    """

    def __init__(self, *args: Any, limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit = asyncio.Semaphore(limit)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.limit:
            return await super().execute_command(*args, **kwargs)


@dataclass(eq=False)
class _Command:
    """SSUBSCRIBE or SUNSUBSCRIBE of one channel, sent and not yet answered."""

    token: bytes
    verb: str
    name: bytes
    # Redis's error, or None; no future when nobody waits for the answer.
    answered: asyncio.Future[Exception | None] | None = field(default=None)


class _Shard:
    """The sharded pub/sub connection to one master."""

    def __init__(self, broker: ClusterBroker, node: ClusterNode) -> None:
        self.broker = broker
        self.name = node.name
        # RESP2, where a message is a plain reply, waiting as long as it takes.
        options = dict(node.connection_kwargs)
        options.update(protocol=2, socket_timeout=None, socket_connect_timeout=COMMAND_TIMEOUT)
        if "maint_notifications_config" in options:  # redis-py 7+; they need RESP3
            options["maint_notifications_config"] = None
            options.pop("oss_cluster_maint_notifications_handler", None)
        self.conn = node.connection_class(**options)
        self.names: set[bytes] = set()  # channels this node listens to here
        self.subscribed: set[bytes] = set()  # what Redis said it subscribed, in its order
        self.window: deque[_Command] = deque()
        self.alive = False
        self.heard = 0.0
        self._tokens = itertools.count(1)
        self._holder: asyncio.Task[None] | None = None
        self.opened = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        await self.conn.connect()  # type: ignore[no-untyped-call]
        self.alive = True
        self.heard = asyncio.get_running_loop().time()
        self._holder = asyncio.get_running_loop().create_task(self._hold())

    async def close(self) -> None:
        self.alive = False
        for task in (self.opened, self._holder):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail(ConnectionError("closed"))
        await self.conn.disconnect()

    async def send(self, verb: str, name: bytes, wait: bool = True) -> Exception | None:
        """Send ``verb name``; with ``wait``, Redis's error for it, or None once done."""
        if not self.alive or not self.conn.is_connected:  # never connect again unseen
            raise Unavailable(f"the Redis Cluster master {self.name} is not connected")
        command = _Command(str(next(self._tokens)).encode(), verb, name)
        if wait:
            command.answered = asyncio.get_running_loop().create_future()
        self.window.append(command)
        packed = self.conn.pack_commands([(verb, name), ("PING", command.token)])
        try:
            # Written at once (no socket timeout), so commands go out in call order.
            await self.conn.send_packed_command(packed, check_health=False)
        except BaseException:
            if command.answered is not None:
                command.answered.cancel()  # the reader fails too, and orphans name
            raise
        return None if command.answered is None else await command.answered

    async def _hold(self) -> None:
        pinger = asyncio.get_running_loop().create_task(self._ping_forever())
        try:
            await self._read()
        except Exception as exc:
            log.error(
                "lost the sharded pub/sub connection to %s: %s: %s",
                self.name,
                type(exc).__name__,
                exc,
            )
            self.alive = False
            self._fail(exc)
            await self.conn.disconnect()
            self.broker._lost(self)
        finally:
            pinger.cancel()

    def _fail(self, exc: BaseException) -> None:
        for command in self.window:
            if command.answered is not None and not command.answered.done():
                command.answered.set_exception(Unavailable(f"Redis pub/sub lost: {exc!r}"))
        self.window.clear()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        error: Exception | None = None  # the answer of the command in the window
        while True:
            try:
                message = await conn.read_response()
            except errors.ResponseError as exc:  # MOVED, mostly
                self.heard = loop.time()
                error = exc
                continue
            self.heard = loop.time()
            if isinstance(message, list):
                kind = message[0]
                if kind == b"smessage":
                    self.broker._on_message(message[1], message[2])
                    continue
                if kind == b"ssubscribe":
                    self.subscribed.add(message[1])
                    continue
                if kind == b"sunsubscribe":  # our SUNSUBSCRIBE's answer, or the slot left
                    self.subscribed.discard(message[1])
                    self._dropped(message[1])
                    continue
                token = message[1] if kind == b"pong" else b""
            else:
                token = message  # PING <token> on a connection without subscriptions
            if self.window and self.window[0].token == token:
                command = self.window.popleft()
                dropped = command.verb == "SSUBSCRIBE" and command.name not in self.subscribed
                if error is None and dropped:  # subscribed, then the slot left, before the pong
                    error = errors.ResponseError(f"{self.name} dropped it: the slot left")
                if command.answered is not None and not command.answered.done():
                    command.answered.set_result(error)
                error = None

    def _dropped(self, name: bytes) -> None:
        if name not in self.names or any(c.name == name for c in self.window):
            return  # not listened to here, or a command in flight settles it
        self.names.discard(name)
        self.broker._orphan([name], self)

    async def _ping_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_PERIOD)
            if loop.time() - self.heard > SILENCE:
                log.error("the sharded pub/sub connection to %s went silent", self.name)
                await self.conn.disconnect()  # the reader fails
                return
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self.conn.send_command("PING", check_health=False)


class ClusterBroker(RedisBroker):
    """The Redis broker on a Redis Cluster, with sharded pub/sub (see the module doc)."""

    _publish_command = "SPUBLISH"
    _publish_lua = SPUBLISH_LUA
    # Channels live on different masters: one connection cannot carry all
    # publications, so each goes through the cluster client on its own.
    pipelines = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards: dict[str, _Shard] = {}  # master name (host:port) -> connection
        self._home: dict[bytes, _Shard] = {}  # channel name -> where it is subscribed
        self._orphans: set[bytes] = set()  # channels waiting to be subscribed again
        self._mender: asyncio.Task[None] | None = None

    async def publish(self, channel: str, data: Any) -> int:
        client = self._client()
        with self._reaching("publish"):
            seq = await self._publish(
                keys=self._keys(channel), args=self._publish_args(channel, data), client=client
            )
        return int(seq)

    async def start(self) -> None:
        # As in the Redis broker, no retries of a command that may have run;
        # redirections (MOVED, ASK) are followed, they are not retries.
        client = _Cluster.from_url(
            self.url,
            limit=self._max_connections,
            max_connections=self._max_connections + 8,  # room for pipelines
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = client
        self._register_scripts(client)
        # One call per publication here (see `pipelines`), not the Publisher.
        self._publish = client.register_script(self._publish_lua)
        try:
            await client.initialize()
        except (aioredis.RedisError, OSError, *_CLUSTER_TROUBLE) as exc:
            await self._close()
            raise ConnectionError(
                f"cannot reach the Redis Cluster at {redact(self.url)}: {exc}"
            ) from exc
        self._healthy = True
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._mender is not None:
            self._mender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._mender
            self._mender = None
        shards = list(self._shards.values())
        self._shards.clear()
        self._home.clear()
        self._orphans.clear()
        for shard in shards:
            await shard.close()
        await super().stop()

    @property
    def ready(self) -> bool:
        return self._healthy and self._redis is not None and not self._orphans

    @contextlib.contextmanager
    def _reaching(self, operation: str) -> Iterator[None]:
        try:
            with super()._reaching(operation):
                yield
        except _CLUSTER_TROUBLE as exc:
            raise Unavailable(
                f"the Redis Cluster at {redact(self.url)} is unavailable: {exc}"
            ) from exc

    def _cluster(self) -> aioredis.RedisCluster:
        client = self._client()
        assert isinstance(client, aioredis.RedisCluster)
        return client

    # subscriptions

    async def subscribe(self, channel: str) -> None:
        if not self._healthy:
            raise Unavailable("the Redis Cluster broker is not started")
        name = self._pubsub_name(channel)
        self._names[name] = channel
        with self._reaching("subscribe"):
            await self._route(name)

    async def unsubscribe(self, channel: str) -> None:
        name = self._pubsub_name(channel)
        self._names.pop(name, None)
        await self._leave(name)

    async def _leave(self, name: bytes) -> None:
        self._orphans.discard(name)
        shard = self._home.pop(name, None)
        if shard is not None:
            shard.names.discard(name)
            with contextlib.suppress(aioredis.RedisError, OSError):
                await shard.send("SUNSUBSCRIBE", name, wait=False)

    async def _route(self, name: bytes) -> None:
        """SSUBSCRIBE name on the master that owns its slot, wherever that went."""
        client = self._cluster()
        problem: Exception | None = None
        for attempt in range(MAX_TRIES):
            if attempt:
                await self._remap()
            try:
                node = client.get_node_from_key(name)  # type: ignore[arg-type]
                if node is None:
                    raise errors.SlotNotCoveredError(f"no master serves {name!r}")
                shard = await self._shard(node)
                shard.names.add(name)
                problem = await shard.send("SSUBSCRIBE", name)
            except (errors.SlotNotCoveredError, aioredis.ConnectionError, OSError) as exc:
                problem = exc  # OSError: Unavailable too
            if problem is None:
                self._home[name] = shard
                if name not in self._names:  # unsubscribed meanwhile
                    await self._leave(name)
                return
            log.debug("subscribing to %r: %r; reading the slot map again", name, problem)
        raise Unavailable(f"cannot subscribe to {name!r} on the Redis Cluster: {problem}")

    async def _shard(self, node: ClusterNode) -> _Shard:
        """The connection to node, made if there is none."""
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(self, node)
        try:
            await asyncio.shield(shard.opened)
        except (aioredis.RedisError, OSError) as exc:
            if self._shards.get(node.name) is shard:
                del self._shards[node.name]
            raise Unavailable(f"cannot reach the Redis Cluster master {node.name}: {exc}") from exc
        return shard

    async def _remap(self) -> None:
        """Read the slot map again (CLUSTER SLOTS from a master that answers)."""
        try:
            await self._cluster().nodes_manager.initialize()
        except (aioredis.RedisError, OSError, *_CLUSTER_TROUBLE) as exc:
            log.warning("reading the Redis Cluster slot map failed: %r", exc)

    def _lost(self, shard: _Shard) -> None:
        """shard's connection is gone: its channels go elsewhere, or wait for it."""
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        self._orphan(shard.names, shard)
        shard.names = set()

    def _orphan(self, names: Iterable[bytes], shard: _Shard) -> None:
        """These channels lost their subscription on shard: subscribe them where they live."""
        for name in names:
            if self._home.get(name) is shard:
                del self._home[name]
            if name in self._names:
                self._orphans.add(name)
        if self._orphans and (self._mender is None or self._mender.done()):
            self._mender = asyncio.get_running_loop().create_task(self._mend())

    async def _mend(self) -> None:
        """Subscribe the orphans again, with backoff while that fails.

        After each round that brought channels back, the keys and presence
        are refreshed (a restarted master lost them) and the node resyncs;
        channels whose master is still away wait for the next round.
        """
        attempt = 0
        while True:
            self._orphans.intersection_update(self._names)
            if not self._orphans:
                return
            if attempt:
                cap = min(RECONNECT_CAP, RECONNECT_BASE * 2**attempt)
                await asyncio.sleep(random.uniform(0, cap))
            attempt += 1
            await self._remap()
            names = list(self._orphans)
            results = await asyncio.gather(
                *(self._route(name) for name in names), return_exceptions=True
            )
            back, failed = [], []
            for name, result in zip(names, results, strict=True):
                if result is None:
                    back.append(name)
                elif isinstance(result, Exception):
                    failed.append(result)
                else:
                    raise result  # cancelled
            if failed:
                log.warning(
                    "%d channels wait for their Redis Cluster master: %s", len(failed), failed[0]
                )
            if back:
                self._orphans.difference_update(back)
                log.warning("listening again to %d channels on their new masters", len(back))
                try:
                    await self.refresh()
                except (aioredis.RedisError, OSError, *_CLUSTER_TROUBLE) as exc:
                    log.warning("refreshing Redis keys failed: %r", exc)
                if self._resync is not None:
                    self._resync()

    # upkeep

    def _in_refresh(self, pipe: Any) -> Any:
        # redis-py refuses scripts in a cluster pipeline: run them one by one.
        return self._client()

    async def refresh(self) -> None:
        for name, shard in list(self._shards.items()):
            if shard.alive and not shard.names and not shard.window:  # nothing to hear there
                del self._shards[name]
                await shard.close()
        await super().refresh()
