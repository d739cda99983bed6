"""The client: one WebSocket connection at a time, replaced whenever it is lost.

A :class:`Client` keeps what the application asked for (its subscriptions
and the commands still waiting for a reply) apart from the connection that
carries them, a :class:`_Link`. A supervisor task connects, waits until
the link is gone, sleeps a backoff delay and connects again, until the
client is closed or the node refuses it for good. Each new link, once the
node's welcome arrives, gets every subscription again, each from the
position its application stream stopped at, and then every command that
was not answered, in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from fastws.client._backoff import backoff_delay
from fastws.client._errors import ClientClosed, ClientError, CommandError, Rejected
from fastws.client._subscription import Publication, Received, Subscription

logger = logging.getLogger("fastws.client")

# A close with one of these codes, or an upgrade refused with one of these
# statuses, would only happen again: the client stops instead of retrying.
FATAL_CLOSE_CODES = frozenset({1008})
FATAL_HTTP_STATUSES = frozenset({401, 403})

# The reason of the node's 1008 close when the connection's token expired:
# with a token function the client gets a fresh token and reconnects.
TOKEN_EXPIRED = "token expired"

# A token, or what makes a fresh one for each connection attempt.
Token = str | Callable[[], str | Awaitable[str]]

# The node closes with 1009 when a message is over its size limit. Sending
# the commands in flight again would repeat that forever, so they fail.
MESSAGE_TOO_BIG = 1009

# Seconds close() waits for the node to answer its close frame.
CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class History:
    """A channel's kept publications, as the ``history`` command answers them."""

    epoch: str
    seq: int  # the channel's last seq, whether or not it is among publications
    publications: list[Publication]


@dataclass(slots=True, eq=False)
class _Call:
    """A command waiting for its reply; it outlives the connection it was sent on."""

    frame: bytes
    future: asyncio.Future[dict[str, Any]]
    resend: bool  # sent again on the next connection if this one is lost first
    sent: bool = False  # on the current connection


class _Link(WSListener):
    """One WebSocket connection under the client: frames in, the closing handshake."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.transport: WSTransport | None = None
        self.welcomed = False
        self.close_code: int | None = None  # from the node's close frame, if one came
        self.close_reason = ""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fragments: bytearray | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # PINGs are answered by picows itself. Every frame, a PONG included,
        # tells picows' heartbeat that the connection is alive; none needs
        # anything more here.
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT:
            if frame.fin:
                self._message(transport, frame.get_payload_as_memoryview())
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CONTINUATION and self._fragments is not None:
            self._fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                message, self._fragments = self._fragments, None
                self._message(transport, message)
        elif msg_type == WSMsgType.CLOSE:
            close = frame.get_payload_as_bytes()
            self.close_code = int.from_bytes(close[:2], "big") if len(close) >= 2 else 1005
            self.close_reason = close[2:].decode("utf-8", "replace")
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def _message(self, transport: WSTransport, payload: bytes | bytearray | memoryview) -> None:
        try:
            self.client._message(self, orjson.loads(payload))
        except Exception:
            # A message that breaks the contract, or a bug here: either way
            # this connection's state is in doubt, and a new one recovers it.
            logger.exception("unexpected message from %s; reconnecting", self.client.url)
            self.client._lost(self)
            transport.disconnect(graceful=False)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client._lost(self)
        if not self.done.done():
            self.done.set_result(None)


class Client:
    """A client of a fastws node that stays connected: see :func:`fastws.client.connect`."""

    def __init__(
        self,
        url: str,
        *,
        min_delay: float = 0.1,
        max_delay: float = 10.0,
        heartbeat_timeout: float = 45.0,
        connect_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        token: Token | None = None,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        if heartbeat_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("heartbeat_timeout and connect_timeout must be positive")
        self.url = url
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self._headers = dict(headers or {})
        self._ssl = ssl
        self._token = token
        self.connects = 0  # connections that got their welcome, over the client's life
        self.client_id: str | None = None  # from the current or last welcome
        self.node: str | None = None
        self._link: _Link | None = None
        self._ready = False  # the current link got its welcome: commands may go out
        self._wake = asyncio.Event()  # set while ready, and once stopped
        self._subs: dict[str, Subscription] = {}
        self._sub_ids: dict[int, Subscription] = {}  # sub commands awaiting their reply
        # Resubscriptions the node answered `unavailable` (its backplane is
        # down), by channel: how many times in a row, for the retry's backoff.
        self._sub_retries: dict[str, int] = {}
        self._calls: dict[int, _Call] = {}  # in the order they were made
        self._last_id = 0
        self._task: asyncio.Task[None] | None = None
        self._error: ClientClosed | None = None  # set once the client has stopped

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected" if self._ready else "connecting"
        return f"<fastws.client.Client {self.url} {state}>"

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # The application's side.

    @property
    def connected(self) -> bool:
        """True while a connection is up and welcomed."""
        return self._ready

    @property
    def closed(self) -> bool:
        """True once the client has stopped for good."""
        return self._error is not None

    def start(self) -> None:
        """Start connecting, in the background. ``async with`` calls it."""
        if self._task is None and self._error is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._supervise(), name=f"fastws.client {self.url}")

    async def wait_connected(self) -> None:
        """Return once a connection is up and welcomed; ClientClosed if the client stops."""
        while not self._ready:
            self._check_open()
            await self._wake.wait()
        self._check_open()

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel``; returns once the node has confirmed it.

        The subscription then lasts until unsubscribed or the client is
        closed, across any number of reconnects. Raises CommandError if the
        node refuses it, ValueError if this client already holds one for
        the channel (one stream per channel: two readers of one queue would
        each see half of it).
        """
        self._check_open()
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel!r}")
        sub = Subscription(self, channel)
        self._subs[channel] = sub
        if self._ready:
            self._send_sub(sub)
        try:
            await sub._confirmed
        except asyncio.CancelledError:
            self._forget(sub, notify_node=True)  # the node may have it already
            raise
        except ClientError:
            self._forget(sub, notify_node=False)
            raise
        return sub

    async def publish(self, channel: str, data: Any) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; returns its seq.

        At-least-once: a publication whose reply did not arrive before the
        connection was lost is sent again on the next connection, after any
        made before it. If the node had received it and only its reply was
        lost, the channel gets it twice, under two seqs. Cancelling the call
        stops any resending (the node may still have received it).
        """
        reply = await self._call({"op": "pub", "ch": channel, "data": data})
        return int(reply["seq"])

    async def history(
        self, channel: str, *, since: tuple[str, int] | None = None, limit: int | None = None
    ) -> History:
        """The channel's kept publications: all, the last ``limit``, or those after ``since``.

        ``since`` is an (epoch, seq) position, such as a Reset's or a
        subscription's ``position``; CommandError('unrecoverable') when the
        history no longer reaches back to it.
        """
        command: dict[str, Any] = {"op": "history", "ch": channel}
        if since is not None:
            command["since"] = {"epoch": since[0], "seq": since[1]}
        if limit is not None:
            command["limit"] = limit
        reply = await self._call(command)
        pubs = [Publication(int(p["seq"]), p.get("data")) for p in reply["pubs"]]
        return History(str(reply["epoch"]), int(reply["seq"]), pubs)

    async def presence(self, channel: str) -> dict[str, Any]:
        """The channel's clients, {client_id: info}; CommandError('not_available') for now."""
        reply = await self._call({"op": "presence", "ch": channel})
        clients: dict[str, Any] = reply["clients"]
        return clients

    async def refresh(self, token: str | None = None) -> None:
        """Give the node a fresh token before the connection's token expires.

        ``token`` defaults to a new one from the client's token function.
        A token string given to :func:`connect` is replaced by this one for
        later connections; a token function is kept (it is called for each
        new connection). CommandError('forbidden') when the node does not
        accept the token (invalid, expired, or for another user): the
        connection keeps its old token, and is closed when that expires.
        While no connection is up there is nothing to refresh: the next
        connection presents the new token.
        """
        if token is None:
            if not callable(self._token):
                raise ValueError("refresh() needs a token, or a token function given to connect()")
            token = await self._fresh_token()
        await self._call({"op": "refresh", "token": token}, resend=False)
        if not callable(self._token):
            self._token = token

    async def _fresh_token(self) -> str:
        assert callable(self._token)
        token = self._token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError(f"the token function returned {type(token).__name__}, not str")
        return token

    async def close(self) -> None:
        """Stop for good: close the connection, fail pending calls, end every iteration."""
        self._stop(ClientClosed("the client was closed"), by_user=True)
        link, task = self._link, self._task
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait({task})
        if link is not None and not link.done.done():
            await asyncio.wait({link.done}, timeout=CLOSE_TIMEOUT)
            if link.transport is not None and not link.done.done():
                link.transport.disconnect(graceful=False)

    # Commands.

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    async def _call(self, command: dict[str, Any], *, resend: bool = True) -> dict[str, Any]:
        """Send a command (now, or once connected) and return its reply."""
        self._check_open()
        if not resend and not self._ready:
            return {}
        id = command["id"] = self._next_id()
        call = _Call(orjson.dumps(command), asyncio.get_running_loop().create_future(), resend)
        self._calls[id] = call
        if self._ready:
            self._send_call(call)
        try:
            return await call.future
        finally:
            self._calls.pop(id, None)

    def _send(self, frame: bytes) -> None:
        assert self._link is not None and self._link.transport is not None
        self._link.transport.send(WSMsgType.TEXT, frame)

    def _send_call(self, call: _Call) -> None:
        call.sent = True
        self._send(call.frame)

    def _send_sub(self, sub: Subscription) -> None:
        id = self._next_id()
        self._sub_ids[id] = sub
        sub.resubscribing()
        command: dict[str, Any] = {"op": "sub", "ch": sub.channel, "id": id}
        since = sub.since()
        if since is not None:
            command["since"] = since
        self._send(orjson.dumps(command))

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is not sub:
            return
        self._forget(sub, notify_node=False)
        # Not resent: a new connection simply does not subscribe again.
        await self._call({"op": "unsub", "ch": sub.channel}, resend=False)

    def _forget(self, sub: Subscription, *, notify_node: bool) -> None:
        """End a subscription here; with notify_node, tell the node without waiting."""
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub.end(None)
        if notify_node and self._ready:
            self._send(orjson.dumps({"op": "unsub", "ch": sub.channel}))

    # What the node sends.

    def _message(self, link: _Link, msg: Any) -> None:
        if link is not self._link or not isinstance(msg, dict):
            return
        if "ok" in msg or "error" in msg:
            self._reply(msg)
        elif "seq" in msg and "ch" in msg:
            self._publication(link, msg)
        elif "welcome" in msg:
            self._welcome(link, msg["welcome"])
        # join and leave, and whatever later versions add: nothing to do yet.

    def _welcome(self, link: _Link, welcome: dict[str, Any]) -> None:
        if link.welcomed:
            return
        link.welcomed = True
        self._ready = True
        self.connects += 1
        self.client_id, self.node = welcome.get("client"), welcome.get("node")
        logger.info("connected to %s (node %s, client %s)", self.url, self.node, self.client_id)
        # Subscriptions first, so that publishes sent again find them in place.
        for sub in self._subs.values():
            self._send_sub(sub)
        for call in self._calls.values():
            if not call.future.done():
                self._send_call(call)
        self._wake.set()

    def _reply(self, msg: dict[str, Any]) -> None:
        id, error = msg.get("id"), msg.get("error")
        failure = None
        if isinstance(error, dict):
            failure = CommandError(str(error.get("code")), str(error.get("message")))
        sub = self._sub_ids.pop(id, None) if isinstance(id, int) else None
        if sub is not None:
            if failure is not None and failure.code == "unavailable" and sub.position is not None:
                self._retry_sub(sub)
            elif failure is not None:
                if self._subs.get(sub.channel) is sub:
                    del self._subs[sub.channel]
                sub.end(failure)
            elif sub.active:
                self._sub_retries.pop(sub.channel, None)
                sub.subscribed(str(msg["epoch"]), int(msg["seq"]), msg.get("recovered") is True)
            return
        call = self._calls.pop(id, None) if isinstance(id, int) else None
        if call is None or call.future.done():
            if failure is not None:
                logger.warning("the node refused a command (id %r): %s", id, failure)
            return
        if failure is not None:
            call.future.set_exception(failure)
        else:
            call.future.set_result(msg)

    def _retry_sub(self, sub: Subscription) -> None:
        """Send a resubscription again later, on this connection: the node will recover.

        Its backplane is down for now; the subscription keeps its position,
        and the retries back off as reconnects do, so that the clients of a
        node without Redis do not hammer it.
        """
        attempt = self._sub_retries.get(sub.channel, 0)
        self._sub_retries[sub.channel] = attempt + 1
        delay = backoff_delay(attempt + 1, self.min_delay, self.max_delay)
        asyncio.get_running_loop().call_later(delay, self._resend_sub, sub, self._link)

    def _resend_sub(self, sub: Subscription, link: _Link | None) -> None:
        if link is self._link and self._ready and self._subs.get(sub.channel) is sub:
            self._send_sub(sub)

    def _publication(self, link: _Link, msg: dict[str, Any]) -> None:
        sub = self._subs.get(msg["ch"])
        if sub is None:
            return
        seq = msg["seq"]
        if sub.receive(seq, msg.get("data")) is Received.GAP:
            # The contract says this cannot happen; if it does, resume from
            # what was delivered on a new connection rather than skip ahead.
            logger.warning(
                "channel %r: publication %d after %s; resuming on a new connection",
                sub.channel,
                seq,
                sub.position,
            )
            self._lost(link)
            if link.transport is not None:
                link.transport.send_close(WSCloseCode.GOING_AWAY)
                link.transport.disconnect()

    # Connections.

    def _new_link(self, request: Any = None, response: Any = None) -> _Link:
        """picows' listener factory: the new link becomes current at once.

        At once, because the welcome may come in the same read as the
        upgrade response, before ws_connect returns.
        """
        link = _Link(self)
        self._link = link
        return link

    def _lost(self, link: _Link) -> None:
        """The current link is gone: keep everything for the next one."""
        if link is not self._link:
            return
        self._link = None
        was_ready, self._ready = self._ready, False
        if self._error is None:
            self._wake.clear()
        self._sub_ids.clear()
        for sub in self._subs.values():
            sub.resubscribing()
        too_big = link.close_code == MESSAGE_TOO_BIG
        for id, call in list(self._calls.items()):
            if call.future.done():
                continue
            if not call.resend:
                call.future.set_result({})
            elif too_big and call.sent:
                call.future.set_exception(
                    CommandError("message_too_big", "the node closed the connection with 1009")
                )
            else:
                call.sent = False
                continue
            del self._calls[id]
        if was_ready:
            how = f"close {link.close_code}" if link.close_code is not None else "connection lost"
            logger.info("disconnected from %s (%s)", self.url, how)

    async def _supervise(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("the client's connection loop failed")
            error = ClientClosed(f"the client failed: {exc!r}")
            error.__cause__ = exc
            self._stop(error, by_user=False)

    async def _run(self) -> None:
        """Connect, wait for the link to go, back off, again; until stopped."""
        attempt = 0
        while True:
            link = await self._connect()
            if self._error is not None:
                return
            if link is not None:
                if link.welcomed:
                    attempt = 0
                if link.close_code in FATAL_CLOSE_CODES and not self._renewable(link):
                    self._stop(Rejected(link.close_code, link.close_reason), by_user=False)
                    return
            delay = backoff_delay(attempt, self.min_delay, self.max_delay)
            attempt += 1
            logger.debug("reconnecting to %s in %.3f s", self.url, delay)
            await asyncio.sleep(delay)

    def _renewable(self, link: _Link) -> bool:
        """A close at token expiry, which a token function can cure with a fresh token."""
        return link.close_reason == TOKEN_EXPIRED and callable(self._token)

    async def _connect(self) -> _Link | None:
        """One connection, from the attempt to its end; None if it never opened."""
        headers = self._headers
        if self._token is not None:
            try:
                token = await self._fresh_token() if callable(self._token) else self._token
            except Exception:
                logger.exception("the token function failed; retrying")
                return None
            headers = {**headers, "Authorization": f"Bearer {token}"}
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, listener = await ws_connect(
                    self._new_link,
                    self.url,
                    ssl_context=self._ssl,
                    websocket_handshake_timeout=self.connect_timeout,
                    # A silent connection is pinged after two thirds of the
                    # timeout and declared dead if the last third brings no
                    # pong. At the defaults (a ping after 30 s of silence) an
                    # idle connection hears the node's ping (after 25 s) first.
                    enable_auto_ping=True,
                    auto_ping_idle_timeout=self.heartbeat_timeout * 2 / 3,
                    auto_ping_reply_timeout=self.heartbeat_timeout / 3,
                    auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
                    extra_headers=headers or None,
                )
        except Exception as exc:
            self._abandon()
            status = getattr(getattr(exc, "response", None), "status", None)
            if isinstance(exc, WSHandshakeError) and status in FATAL_HTTP_STATUSES:
                self._stop(Rejected(int(status), "upgrade refused"), by_user=False)
                return None
            logger.info("could not connect to %s: %s", self.url, str(exc) or type(exc).__name__)
            return None
        except BaseException:
            self._abandon()
            raise
        if not isinstance(listener, _Link):
            # picows returns no listener when the connection was lost
            # during the upgrade, rather than raising.
            self._abandon()
            logger.info("could not connect to %s: lost during the upgrade", self.url)
            return None
        timer = asyncio.get_running_loop().call_later(
            self.connect_timeout, self._welcome_overdue, listener
        )
        try:
            await listener.done
        finally:
            timer.cancel()
        return listener

    def _abandon(self) -> None:
        """An attempt failed: drop the link it may have made before failing."""
        link = self._link
        if link is not None:
            self._lost(link)
            if link.transport is not None:
                link.transport.disconnect(graceful=False)

    def _welcome_overdue(self, link: _Link) -> None:
        if not link.welcomed and link.transport is not None:
            logger.warning(
                "no welcome from %s in %s s; reconnecting", self.url, self.connect_timeout
            )
            self._lost(link)
            link.transport.disconnect(graceful=False)

    def _stop(self, error: ClientClosed, *, by_user: bool) -> None:
        """Stop for good: fail what waits, end the subscriptions, close the link."""
        if self._error is not None:
            return
        self._error = error
        self._ready = False
        self._wake.set()
        if not by_user:
            logger.warning("client for %s stopped: %s", self.url, error)
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(error)
        self._calls.clear()
        for sub in self._subs.values():
            sub.end(None if by_user else error)
        self._subs.clear()
        self._sub_ids.clear()
        link = self._link
        if link is not None and link.transport is not None and not link.done.done():
            with contextlib.suppress(Exception):
                link.transport.send_close(WSCloseCode.OK)
            link.transport.disconnect()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def connect(
    url: str,
    *,
    min_delay: float = 0.1,
    max_delay: float = 10.0,
    heartbeat_timeout: float = 45.0,
    connect_timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    token: Token | None = None,
) -> Client:
    """A client of the node at ``url`` (``ws://host:port/ws``); use it with ``async with``.

    It connects in the background and stays connected: after any loss it
    waits ``random.uniform(0, min(max_delay, min_delay * 2**attempt))``
    seconds (the attempt count starts again after a connection that got
    the node's welcome) and connects again, until it is closed or the node
    refuses it for good (close 1008, HTTP 401 or 403: :class:`Rejected`).
    A connection on which nothing at all arrives for about
    ``heartbeat_timeout`` seconds is taken for dead; the client pings a
    silent one so that a live node always has something to answer.
    ``connect_timeout`` bounds an attempt, from TCP connect to the welcome.
    ``headers`` go on every upgrade request; ``ssl`` is the context for
    ``wss://`` URLs. ``token`` is the JWT for a node that checks tokens
    (docs/auth.md), sent as ``Authorization: Bearer``: a string, or a
    function (plain or async) called before every attempt for a fresh one.
    With a function, a close at token expiry is followed by a reconnect
    with a new token rather than the end of the client; keep a long-lived
    connection open without one with :meth:`Client.refresh`.
    """
    return Client(
        url,
        min_delay=min_delay,
        max_delay=max_delay,
        heartbeat_timeout=heartbeat_timeout,
        connect_timeout=connect_timeout,
        headers=headers,
        ssl=ssl,
        token=token,
    )
