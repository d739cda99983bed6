"""Library mode: your handler classes on paths, the channel protocol beside them.

An :class:`App` holds what a node serves: the routes (paths to connection
classes), the fanout hub and the broker. ``fastws serve`` is an App with the
channel protocol mounted on ``--path``; a library user mounts their own
:class:`Handler` subclasses and may mount the channel protocol too, and
reaches channel subscribers from their own code with :meth:`App.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import uvloop

from fastws import auth, deflate, logs, protocol
from fastws._core.fanout import Hub
from fastws.brokers import Broker, make_broker
from fastws.brokers.base import Unavailable
from fastws.config import Config, load
from fastws.connection import Connection, Step, finish, start_eagerly
from fastws.control import CONTROL, Control
from fastws.metrics import Metrics
from fastws.namespaces import Namespaces
from fastws.protocol import Position
from fastws.session import ChannelSession

if TYPE_CHECKING:
    from fastws.node import Node

logger = logging.getLogger("fastws.app")

# Longest a join waits for this node's stream of a channel to reach the
# position its history was read at (a networked broker's pub/sub lagging).
CATCH_UP_TIMEOUT = 5.0

# Filling a gap in a channel's stream from its history retries this often
# while the broker is unavailable.
FILL_RETRY = 0.5

# The close code for subscribers of a channel whose history was lost (a new
# epoch) or no longer reaches back over a gap this node's stream had: they
# reconnect, resubscribe with their position and are told it was not
# recovered.
HISTORY_LOST = 1012


class _Stream:
    """What this node received of one channel it listens to, and where that is.

    ``epoch`` and ``seq`` are the position of the last publication handed
    to local subscribers (``epoch`` is None until the channel's position
    was first read). While ``held`` is a list, a gap is being filled from
    the history and live publications wait in it, in order.
    """

    __slots__ = ("arrived", "epoch", "held", "seq")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.seq = 0
        self.held: list[tuple[str, int, bytes]] | None = None
        self.arrived: asyncio.Event | None = None


@dataclass
class Stats:
    """Plain counters, bumped on the hot path and read by /metrics when scraped.

    fastws.metrics says what each one exposes as. A new reason in
    ``refused`` shows up on its own, labelled as counted.
    """

    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)  # by close code
    messages_in: int = 0
    bytes_in: int = 0
    publications: Counter[str] = field(default_factory=Counter)  # by namespace label
    command_errors: int = 0
    rate_limited: int = 0
    rate_limit_closes: int = 0
    policy_closes: int = 0
    protocol_errors: int = 0
    handler_errors: int = 0
    slow_consumers: int = 0
    pings_sent: int = 0
    ping_timeouts: int = 0
    token_expired: int = 0
    recovered: int = 0  # sub with since: the missed publications were replayed
    not_recovered: int = 0  # ... or could not be: the client was told to refetch


class Handler(Connection):
    """One connection in library mode: subclass it and override the ``on_*`` methods.

    A new instance serves each connection. Each ``on_*`` method may be a
    plain method or ``async def``; a connection's calls run one at a time, in
    the order its messages arrived, and an exception in any of them closes
    only this connection, with 1011.
    """

    def on_connect(self) -> Step | None:
        """The client is connected."""
        return None

    def on_message(self, message: str | bytes) -> Step | None:
        """A whole message arrived: ``str`` from a TEXT frame, ``bytes`` from BINARY."""
        return None

    def on_disconnect(self, code: int) -> Step | None:
        """The connection is gone; code is the close code (1006 when there was none)."""
        return None

    def send(self, message: str | bytes) -> None:
        """Send a TEXT frame for a str, a BINARY frame for bytes."""
        if isinstance(message, str):
            self.send_text(message.encode())
        else:
            self.send_binary(bytes(message))

    def subscribe(self, channel: str) -> asyncio.Future[None]:
        """Receive the channel's publications (``{"ch", "seq", "data"}`` TEXT frames).

        The connection joins the channel at once. Awaiting the returned future
        is optional: it completes when the broker delivers the channel's
        publications from every node (at once with the memory broker).
        """
        return self.app.start(self._subscribe(channel))

    async def _subscribe(self, channel: str) -> None:
        if await self.app.join(self, channel):
            await self.app.announce_join(self, channel)

    def unsubscribe(self, channel: str) -> asyncio.Future[None]:
        """Stop receiving the channel's publications, at once."""
        return self.app.start(self.app.leave(self, channel))

    def opened(self) -> Step | None:
        return self.on_connect()

    def received(self, payload: bytes, text: bool) -> Step | None:
        if not text:
            return self.on_message(payload)
        try:
            message = payload.decode()
        except UnicodeDecodeError:
            self._protocol_error(1007, "invalid UTF-8 in a text message")
            return None
        return self.on_message(message)

    def closed(self) -> Step | None:
        return self.on_disconnect(self.close_code or 1006)


class App:
    """What a node serves. Make one, mount handlers, then ``run()`` or ``await serve()``."""

    def __init__(self, config: Config | None = None, *, broker: Broker | None = None) -> None:
        # Without an explicit config, the FASTWS_* variables and FASTWS_CONFIG
        # apply in library mode as they do to `fastws serve`.
        self.config = config or load()
        self.namespaces = Namespaces(self.config)
        # Checks clients' tokens (fastws.auth); None when no key is set: open.
        self.verifier = auth.verifier(self.config)
        self.broker: Broker = broker or make_broker(self.config, self.namespaces)
        # fastws's own steps run outside a task until they first wait, unless
        # the broker's client needs a task (redis-py's timeouts do).
        self.eager = not self.broker.waits
        self.broker.attach(self._deliver, self._resync)
        self.hub: Hub = Hub()
        self.routes: dict[str, type[Connection]] = {}
        self.connections: set[Connection] = set()
        self.connections_per_ip: Counter[str] = Counter()
        self.stats: Stats = Stats()
        # What /metrics exposes; it also times the broker's calls.
        self.metrics = Metrics(self)
        self.broker.calls = self.metrics.broker_calls
        self.node_name = self._name()
        self._background: set[asyncio.Task[None]] = set()
        # Per channel this node listens to: local subscribers and joins under
        # way, the broker subscription, and what its stream delivered.
        self._listeners: Counter[str] = Counter()
        self._listening: dict[str, asyncio.Future[None]] = {}
        self._streams: dict[str, _Stream] = {}
        # Orders between nodes (fastws.control): close a user's connections everywhere.
        self.control = Control(self)

    def _name(self) -> str:
        return self.config.node_name or f"{socket.gethostname()}-{os.getpid()}"

    def mount(self, path: str, handler: type[Handler]) -> None:
        """Serve connections upgraded on path with a new handler instance each."""
        self._add_route(path, handler)

    def channels(self, path: str = "/ws") -> None:
        """Serve the channel protocol (docs/protocol.md) on path."""
        self._add_route(path, ChannelSession)

    def _add_route(self, path: str, cls: type[Connection]) -> None:
        if not path.startswith("/"):
            raise ValueError(f"a path starts with '/': {path!r}")
        if path in self.routes:
            raise ValueError(f"{path} is mounted already")
        self.routes[path] = cls

    async def publish(self, channel: str, data: Any) -> int:
        """Publish data (any JSON value) to a channel on every node; return its seq."""
        seq = await self.broker.publish(channel, data)
        self._count(channel)
        return seq

    def publish_soon(self, channel: str, data: Any) -> asyncio.Future[int]:
        """Start publishing at once, with a broker that ``pipelines``; a future of the seq.

        Publications started one after another this way are numbered in
        that order, without each waiting for the one before.
        """
        future = self.broker.publish_soon(channel, data)

        def published(done: asyncio.Future[int]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._count(channel)

        future.add_done_callback(published)
        return future

    def _count(self, channel: str) -> None:
        self.stats.publications[self.namespaces.label(channel)] += 1

    async def disconnect(
        self, user: str, code: int = 1008, reason: str = "disconnected"
    ) -> dict[str, Any]:
        """Close every open connection of user, on every node of the deployment.

        ``code`` is one of fastws.control.CLOSE_CODES. Returns how many were
        closed, in all and per node, and which nodes did not answer in time
        (``{"disconnected", "nodes", "unanswered"}``); raises Unavailable,
        having closed nothing, when the other nodes cannot be told.
        """
        return await self.control.disconnect(user, code, reason)

    async def join(
        self,
        conn: Connection,
        channel: str,
        greet: Callable[[], Awaitable[Position]] | None = None,
    ) -> bool:
        """Make conn a subscriber of channel; False if it is one already.

        ``greet`` queues what conn must get before any live publication (the
        sub reply, the replay) and returns the position that brought it to.
        Live delivery then starts right after that position: the node
        listens to the channel before ``greet`` reads it, and before conn
        joins the fanout, publications this node received meanwhile are sent
        from the history, or the node waits for its stream to reach the
        position. With the memory broker none of this waits. Presence and
        the join message come later (:meth:`announce_join`).
        """
        assert conn.outbox is not None
        if channel in conn.outbox.channels:
            return False
        await self._listen(channel)
        try:
            if greet is not None:
                await self._catch_up(conn, channel, await greet())
        except BaseException:
            self._unlisten(channel)
            raise
        if conn.outbox.closed or channel in conn.outbox.channels:
            # Gone while this waited, or joined meanwhile by another call.
            self._unlisten(channel)
            return False
        self.hub.subscribe(conn.outbox, channel)
        return True

    async def leave(self, conn: Connection, channel: str) -> None:
        assert conn.outbox is not None
        if channel not in conn.outbox.channels:
            return
        self.hub.unsubscribe(conn.outbox, channel)
        self._unlisten(channel)
        await self.announce_leave(conn, channel)

    async def _listen(self, channel: str) -> None:
        """One more local claim on channel; the broker subscribes for the first.

        Once the subscription is confirmed, the channel's position is read:
        every publication after it reaches this node through the broker, so
        it is where the node's stream of the channel starts.
        """
        self._listeners[channel] += 1
        try:
            listening = self._listening.get(channel)
            if listening is None:
                listening = self._listening[channel] = self.start(self._subscribe(channel))
            await listening
        except BaseException:
            self._unlisten(channel)
            raise

    async def _subscribe(self, channel: str) -> None:
        stream = self._streams[channel] = _Stream()
        await self.broker.subscribe(channel)
        position = await self.broker.position(channel)
        stream.epoch = position.epoch
        stream.seq = max(stream.seq, position.seq)

    def _unlisten(self, channel: str) -> None:
        self._listeners[channel] -= 1
        if self._listeners[channel] > 0:
            return
        del self._listeners[channel]
        self._listening.pop(channel, None)
        self._streams.pop(channel, None)
        # Brokers apply subscribe and unsubscribe in the order they are called.
        self.start(self.broker.unsubscribe(channel))

    async def _catch_up(self, conn: Connection, channel: str, sent: Position) -> None:
        """Bring conn from ``sent`` to where this node's stream of channel is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CATCH_UP_TIMEOUT
        last = sent.seq
        while True:
            stream = self._streams.get(channel)
            if stream is None or (stream.epoch == sent.epoch and stream.seq == last):
                return
            if stream.epoch == sent.epoch and stream.seq > last:
                _, missed = await self.broker.history(channel, Position(sent.epoch, last))
                if not missed:
                    conn.log(logger).warning(
                        "%s: history cannot catch %s up on %s", conn.id, channel, last
                    )
                    conn.close(HISTORY_LOST, "channel history lost")
                    return
                for stored in missed:
                    conn.send_text(stored.payload)
                last = missed[-1].seq
            elif loop.time() < deadline:
                # The stream lags behind (or is being filled, or is in
                # another epoch until its reset): wait for it to move.
                if stream.arrived is None:
                    stream.arrived = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.arrived.wait(), deadline - loop.time())
            else:
                conn.log(logger).warning(
                    "%s: the stream of %s lags behind its history", conn.id, channel
                )
                return

    async def announce_join(self, conn: Connection, channel: str) -> None:
        """Record conn's presence and tell the channel, where its namespace asks for it.

        With the broker unavailable the join message is lost (it is not a
        publication, and is never replayed); the broker keeps the presence
        entry and writes it when it is back.
        """
        options = self.namespaces(channel)
        try:
            if options.presence:
                await self.broker.add_presence(channel, conn.id, conn.info())
            if options.join_leave:
                await self.broker.announce(channel, protocol.encode_join(channel, conn.info()))
        except Unavailable as exc:
            conn.log(logger).warning("%s: announcing its join to %s: %s", conn.id, channel, exc)

    async def announce_leave(self, conn: Connection, channel: str) -> None:
        options = self.namespaces(channel)
        try:
            if options.presence:
                await self.broker.remove_presence(channel, conn.id)
            if options.join_leave:
                await self.broker.announce(channel, protocol.encode_leave(channel, conn.info()))
        except Unavailable as exc:
            conn.log(logger).warning("%s: announcing its leave from %s: %s", conn.id, channel, exc)

    def register(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.connections_per_ip[conn.remote_ip] += 1
        self.stats.accepted += 1

    def unregister(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.connections_per_ip[conn.remote_ip] -= 1
        if self.connections_per_ip[conn.remote_ip] <= 0:
            del self.connections_per_ip[conn.remote_ip]

    def detach(self, conn: Connection) -> None:
        """Take a closing connection out of every channel, telling the broker of the emptied."""
        if conn.outbox is None:
            return
        left = list(conn.outbox.channels)
        conn.outbox.close()
        for channel in left:
            self._unlisten(channel)
            self.start(self.announce_leave(conn, channel))

    def start(self, step: Step) -> asyncio.Future[None]:
        """Run step, in a task or (``eager``) now until it first waits; a future of its end.

        With the memory broker most steps never wait, and run eagerly they
        cost no task; an exception raised before the first wait then
        propagates here.
        """
        loop = asyncio.get_running_loop()
        if self.eager:
            started = start_eagerly(step)
            if started is None:
                done = loop.create_future()
                done.set_result(None)
                return done
            step = finish(*started)
        task = loop.create_task(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _deliver(self, channel: str, epoch: str, seq: int, payload: bytes) -> None:
        if seq:
            stream = self._streams.get(channel)
            if stream is not None:
                if stream.held is not None:
                    stream.held.append((epoch, seq, payload))
                    return
                if stream.epoch is not None:
                    if epoch == stream.epoch and seq <= stream.seq:
                        return  # this node's subscribers were given it from the history
                    if epoch != stream.epoch or seq != stream.seq + 1:
                        # A gap, or a new epoch: fill from the history first.
                        stream.held = [(epoch, seq, payload)]
                        self.start(self._fill(channel, stream))
                        return
                stream.seq = seq
                self._advanced(stream)
        elif channel == CONTROL:
            self.control.received(payload)
            return
        self._fan_out(channel, payload)

    def _advanced(self, stream: _Stream) -> None:
        arrived = stream.arrived
        if arrived is not None:
            stream.arrived = None
            arrived.set()

    def _fan_out(self, channel: str, payload: bytes) -> None:
        deflated = None
        config = self.config
        if config.compression and len(payload) >= config.compression_min_size:
            # Once per window size in use on this channel, not per subscriber.
            deflated = {
                bits: deflate.compress(payload, bits, config.compression_level)
                for bits in self.hub.deflate_bits(channel)
            }
        self.hub.publish(channel, payload, deflated)

    def _resync(self) -> None:
        """The broker may have missed publications: check every channel listened to."""
        for channel, stream in self._streams.items():
            if stream.held is None and stream.epoch is not None:
                stream.held = []
                self.start(self._fill(channel, stream))

    async def _fill(self, channel: str, stream: _Stream) -> None:
        """Hand local subscribers what the stream of channel missed, then what it held.

        The gap is read from the channel's history. When the history has
        another epoch, or no longer reaches back to the stream's position,
        the subscribers cannot be given the gap; they are closed with
        :data:`HISTORY_LOST` so that they resubscribe and are told.
        """
        assert stream.epoch is not None and stream.held is not None
        while self._streams.get(channel) is stream:
            try:
                position, missed = await self.broker.history(
                    channel, Position(stream.epoch, stream.seq)
                )
                break
            except Unavailable as exc:
                logger.warning("filling a gap in %s: %s", channel, exc)
                await asyncio.sleep(FILL_RETRY)
        else:
            return  # nobody on this node listens to the channel any more
        if missed is None:
            if position.epoch == stream.epoch and position.seq < stream.seq:
                position = await self._restart(channel, position)
            self._history_lost(channel)
            stream.epoch, stream.seq = position.epoch, position.seq
        else:
            for stored in missed:
                if stored.seq > stream.seq:
                    stream.seq = stored.seq
                    self._fan_out(channel, stored.payload)
        held, stream.held = stream.held, None
        self._advanced(stream)
        for item in held:
            self._deliver(channel, *item)

    async def _restart(self, channel: str, position: Position) -> Position:
        """The channel's seq went back: end its epoch, so that no one resumes into reused seqs."""
        logger.warning(
            "%s went back to seq %d in epoch %s; starting a new epoch",
            channel,
            position.seq,
            position.epoch,
        )
        try:
            return await self.broker.restart(channel, position.epoch)
        except Unavailable as exc:
            logger.warning("starting a new epoch of %s: %s", channel, exc)
            return position

    def _history_lost(self, channel: str) -> None:
        logger.warning("the history of %s was lost; closing its subscribers on this node", channel)
        for conn in list(self.connections):
            if conn.outbox is not None and channel in conn.outbox.channels:
                conn.close(HISTORY_LOST, "channel history lost")

    async def serve(self, **options: Any) -> Node:
        """Start a node for this app on the running loop; options override the config."""
        from fastws.node import Node

        self.config = replace(self.config, **options)
        self.namespaces.configure(self.config)
        self.verifier = auth.verifier(self.config)
        self.node_name = self._name()
        node = Node(self)
        await node.start()
        return node

    def run(self, started: Callable[[Node], object] | None = None, **options: Any) -> None:
        """Serve on uvloop until SIGTERM or SIGINT, then drain and return.

        ``started`` is called with the node once it listens, on its loop: a
        worker tells its supervisor so (fastws.workers).
        """

        async def main() -> None:
            node = await self.serve(**options)
            node.handle_signals()
            if started is not None:
                started(node)
            await node.wait_stopped()

        config = replace(self.config, **options)
        logs.configure(config.log_level, config.log_format)
        _raise_open_files_limit()
        uvloop.run(main())


def _raise_open_files_limit() -> None:
    """Let the process hold as many sockets as the hard limit allows.

    Each connection is a file descriptor, and many systems start a process
    with a soft limit of 1,024 under a hard limit a thousand times higher,
    which would refuse the 1,000th client. Raising the soft limit to the
    hard one needs no privilege; a process that owns the node does it once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an unlimited soft limit for files; its ceiling is 2**20.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
        return
    logger.info("open files limit raised from %d to %d", soft, target)
