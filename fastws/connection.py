"""One WebSocket connection: its state, its frame layer and its error fence.

:class:`Connection` sits between picows, which parses frames, and the code
that handles whole messages: the channel protocol (:mod:`fastws.session`) or
a user's :class:`fastws.Handler`. It reassembles fragmented messages within
the size limit, runs the closing handshake, and keeps every exception raised
while handling a message inside this one connection, which it closes with
1011 while the node and the other connections go on.

Message handlers may be coroutines. They run eagerly: a handler that
finishes without waiting costs no task at all, and one that does wait gets a
task that also runs the messages queued behind it, so a connection's
messages are always handled one at a time, in order.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import secrets
import struct
import time
import types
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator
from enum import Enum
from typing import TYPE_CHECKING, Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest

from fastws import deflate, logs

if TYPE_CHECKING:
    from fastws._core.fanout import Outbox
    from fastws.app import App
    from fastws.auth import Grant

logger = logging.getLogger("fastws.connection")

Step = Coroutine[Any, Any, None]

_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# The frame types, bound once: looking a member up on an enum class costs
# ~200 ns on Python 3.11, several times per frame on the hot path. picows hands
# out these very members, so `is` compares them.
TEXT, BINARY, CONTINUATION = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
PING_FRAME, PONG_FRAME, CLOSE_FRAME = WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE
PING, PONG = WSMsgType.PING.value, WSMsgType.PONG.value  # opcodes for Outbox.control

# A keepalive ping carries the monotonic clock when it left, which the peer
# echoes in its pong: the round trip is measured without a per-connection field.
_PING_CLOCK = struct.Struct("!d")


def valid_close_code(code: int) -> bool:
    """Whether a peer may send this close code (RFC 6455 7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class State(Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# A token's expiry timer waits at most this long before it looks again, so
# that a far-off exp never makes a timer the loop cannot hold, and a wall
# clock that jumped is noticed within a day.
EXPIRY_CHECK = 86400.0

# The close reason at token expiry (with 1008): clients that can get a fresh
# token tell it from other 1008 closes by it (docs/protocol.md).
TOKEN_EXPIRED = "token expired"

# Bound once, like the frame types below: the state is checked on every message.
CONNECTING, OPEN, CLOSING, CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED


@types.coroutine
def _resume(coro: Step, waiting_on: Any) -> Generator[Any, None, None]:
    """Go on with a coroutine that was started outside a task and then waited."""
    if asyncio.isfuture(waiting_on):
        waiting_on._asyncio_future_blocking = True  # taken back by the task, see start_eagerly
    yield waiting_on
    yield from coro


def start_eagerly(step: Step) -> tuple[Step, Any] | None:
    """Run step until it first waits; None if it finished, else what resumes it.

    Exceptions raised before the first wait propagate to the caller.
    """
    try:
        waiting_on = step.send(None)
    except StopIteration:
        return None
    if asyncio.isfuture(waiting_on):
        # Awaiting a pending future marks it "blocking" until a task takes it
        # and clears the mark; a second await of the same future while it is
        # marked fails. No task takes it until _resume, so clear it here, as a
        # task would, for other coroutines that await the same future meanwhile.
        waiting_on._asyncio_future_blocking = False
    return step, waiting_on


async def finish(step: Step, waiting_on: Any) -> None:
    """Await the rest of a step that start_eagerly began."""
    await _resume(step, waiting_on)


class Connection(WSListener):
    """Base of every server-side connection; subclasses handle whole messages."""

    # Whether this class's steps may run outside a task until they first wait
    # (see _run): true for fastws's own code, which avoids what needs a task.
    eager = False

    # Slots, not a __dict__: about a kilobyte less per idle connection.
    __slots__ = (
        "_close_timer",
        "_expiry",
        "_fragments",
        "_fragments_compressed",
        "_fragments_text",
        "_queue",
        "_task",
        "_utf8",
        "app",
        "close_code",
        "deflate_bits",
        "grant",
        "id",
        "outbox",
        "pinged_at",
        "quiet_since",
        "remote_ip",
        "request",
        "seen",
        "state",
        "trace",
        "transport",
        "user",
    )

    def __init__(self, app: App, request: WSUpgradeRequest, remote_ip: str) -> None:
        super().__init__()
        self.app = app
        # The upgrade request (path, query, headers), for handlers that want it;
        # a connection class with no use for it drops it to save its ~1 KB.
        self.request: WSUpgradeRequest | None = request
        self.remote_ip = remote_ip
        self.id = secrets.token_hex(8)
        self.user = ""  # who the client is, once authenticated; "" for anonymous
        # The W3C trace id this connection's log lines carry (fastws.logs):
        # from the upgrade's traceparent header, or made up; sent in the welcome.
        self.trace = logs.trace_id(request.headers.getall("traceparent", ()))
        # The verified token's claims (fastws.auth); None on an open node.
        self.grant: Grant | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.state = CONNECTING
        self.transport: WSTransport | None = None
        self.outbox: Outbox | None = None
        self.close_code: int | None = None
        # The deflate window negotiated for what this node sends; 0: none.
        self.deflate_bits = 0
        # Keepalive bookkeeping, read by fastws.heartbeat's sweep.
        self.seen = False
        self.quiet_since = 0.0
        self.pinged_at = 0.0
        self._fragments: bytearray | None = None
        self._fragments_text = False
        self._fragments_compressed = False
        self._utf8: codecs.IncrementalDecoder | None = None
        self._queue: deque[Step] | None = None
        self._task: asyncio.Task[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    def authorize(self, grant: Grant) -> None:
        """Take a verified token's claims: at the upgrade, and again on each refresh.

        The connection is closed with 1008 when the token expires (its
        ``exp`` plus the configured leeway), unless a later grant moved that.
        """
        self.grant = grant
        self.user = grant.user
        if self.state is OPEN:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        verifier = self.app.verifier
        if self.grant is None or verifier is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        delay = min(max(verifier.remaining(self.grant), 0.0), EXPIRY_CHECK)
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        verifier = self.app.verifier
        if self.grant is None or verifier is None or self.state is not OPEN:
            return
        if verifier.remaining(self.grant) > 0:
            self._arm_expiry()  # a long-lived token, or the wall clock moved
            return
        self.app.stats.token_expired += 1
        self.log().info(
            "connection %s (user %s): token expired, closing with 1008", self.id, self.user
        )
        self.close(1008, TOKEN_EXPIRED)

    def info(self) -> dict[str, Any]:
        """What other clients may see of this one: in presence, join and leave."""
        return {"client": self.id, "user": self.user}

    def log(self, to: logging.Logger = logger) -> logs.ConnectionLog:
        """``to`` (this module's logger by default), its lines carrying this connection's
        client id, user, remote address and trace id (fastws.logs)."""
        return logs.ConnectionLog(to, self)

    # Hooks for subclasses.

    def opened(self) -> Step | None:
        """The connection is open; the outbox is ready. May return a coroutine."""
        return None

    def received(self, payload: bytes, text: bool) -> Step | None:
        """Handle one whole message; may return a coroutine to run in order."""
        raise NotImplementedError

    def closed(self) -> Step | None:
        """The TCP connection is gone; ``close_code`` says how it ended."""
        return None

    # Sending and closing.

    def send_text(self, payload: bytes) -> None:
        """Queue a TEXT frame (payload is UTF-8); written at the end of the loop turn."""
        if self.outbox is None:
            return
        if self.deflate_bits and len(payload) >= self.app.config.compression_min_size:
            self.outbox.send_deflated(self._compress(payload), True)
        else:
            self.outbox.send_text(payload)

    def send_binary(self, payload: bytes) -> None:
        if self.outbox is None:
            return
        if self.deflate_bits and len(payload) >= self.app.config.compression_min_size:
            self.outbox.send_deflated(self._compress(payload), False)
        else:
            self.outbox.send_binary(payload)

    def _compress(self, payload: bytes) -> bytes:
        return deflate.compress(payload, self.deflate_bits, self.app.config.compression_level)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection is cut if it does not finish.

        The close frame follows whatever the outbox holds. The peer then has
        ``close_timeout`` seconds to answer before the connection is aborted,
        so a peer that stopped reading cannot keep its buffers alive.
        """
        if self.state is not OPEN or self.transport is None:
            return
        assert self.outbox is not None
        self.state = CLOSING
        self.close_code = code
        self.outbox.flush()
        self.app.detach(self)
        self.transport.send_close(WSCloseCode(code), reason.encode()[:123])
        self._close_timer = asyncio.get_running_loop().call_later(
            self.app.config.close_timeout, self.abort
        )

    def abort(self) -> None:
        """Cut the TCP connection now, dropping whatever is unsent."""
        if self.transport is not None and self.state is not CLOSED:
            if self.close_code is None:
                self.close_code = 1006
            self.transport.disconnect(graceful=False)

    def ping(self) -> None:
        """Send a keepalive PING; its pong's round trip goes to the ping_rtt histogram."""
        if self.outbox is not None and self.state is OPEN:
            self.outbox.control(PING, _PING_CLOCK.pack(time.monotonic()))

    def _pong(self, frame: WSFrame) -> None:
        """The answer to a keepalive ping: observe its round trip, once per ping."""
        if not self.pinged_at or frame.payload_size != _PING_CLOCK.size:
            return
        self.pinged_at = 0.0  # the next sweep starts over anyway: the peer was heard
        (sent,) = _PING_CLOCK.unpack(frame.get_payload_as_bytes())
        rtt = time.monotonic() - sent
        if 0.0 <= rtt <= self.app.config.ping_timeout + 1.0:  # not a made-up payload
            self.app.metrics.ping_rtt.observe(rtt)

    def fail(self, exc: BaseException) -> None:
        """An unexpected error in this connection's code: log it, close with 1011."""
        self.app.stats.handler_errors += 1
        self.log().error("connection %s: unhandled error, closing with 1011", self.id, exc_info=exc)
        self.close(1011, "internal error")

    def _slow_consumer(self, outbox: Outbox) -> None:
        self.app.stats.slow_consumers += 1
        self.log().info("connection %s: send buffer over its limit, closing with 1013", self.id)
        self.close(1013, "slow consumer")

    # picows callbacks.

    def on_ws_connected(self, transport: WSTransport) -> None:
        limit = self.app.config.max_send_buffer
        self.transport = transport
        self.outbox = self.app.hub.outbox(transport, limit)
        self.outbox.on_overflow = self._slow_consumer
        self.outbox.deflate_bits = self.deflate_bits
        if limit:
            # Past this the transport calls pause_writing: a slow consumer.
            transport.underlying_transport.set_write_buffer_limits(high=limit)
        self.state = OPEN
        self.quiet_since = asyncio.get_running_loop().time()
        self.app.register(self)
        if self.grant is not None:
            # Armed only now: a token that expired during the handshake is
            # closed at once rather than missed by a close() that is not yet
            # allowed.
            self._arm_expiry()
        try:
            self._run(self.opened())
        except Exception as exc:
            self.fail(exc)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.seen = True
        msg_type = frame.msg_type
        text = msg_type is TEXT
        data = text or msg_type is BINARY
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and not (data and self.deflate_bits)):
            # RSV1 marks a compressed message, on its first frame only.
            self._protocol_error(1002, "reserved bits set without an extension")
        elif data:
            if self._fragments is not None:
                self._protocol_error(1002, "new message inside a fragmented one")
            elif frame.fin:
                self._message(frame.get_payload_as_bytes(), text, frame.rsv1)
            else:
                self._start_fragments(frame)
        elif msg_type is CONTINUATION:
            if self._fragments is None:
                self._protocol_error(1002, "continuation frame without a start")
            elif self._add_fragment(frame) and frame.fin:
                self._end_fragments()
        elif msg_type is PING_FRAME and self.outbox is not None:
            # Straight to the socket: a pong never waits behind queued frames.
            self.outbox.control(PONG, frame.get_payload_as_bytes())
        elif msg_type is PONG_FRAME:
            self._pong(frame)
        elif msg_type is CLOSE_FRAME:
            self._peer_closed(frame)

    def pause_writing(self) -> None:
        if self.outbox is not None and self.outbox.limit:
            self.outbox.overflow()

    def resume_writing(self) -> None:
        """Nothing to resume: a connection that paused writing is being closed."""

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.state is CLOSED:
            return
        if self.close_code is None:
            self.close_code = 1006
        self.state = CLOSED
        self.app.stats.closes[self.close_code] += 1
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.app.detach(self)
        if self.outbox is not None:
            self.outbox.on_overflow = None
        self.app.unregister(self)
        self._drop_queue()
        try:
            self._run(self.closed())
        except Exception as exc:
            self.log().error("connection %s: error in close handler", self.id, exc_info=exc)

    # Internals.

    def _start_fragments(self, frame: WSFrame) -> None:
        self._fragments = bytearray()
        self._fragments_text = frame.msg_type is TEXT
        self._fragments_compressed = bool(frame.rsv1)
        if self._fragments_text and not frame.rsv1:
            # Text is checked as it arrives, so bad UTF-8 fails at its fragment.
            self._utf8 = _utf8_decoder()
        self._add_fragment(frame)

    def _add_fragment(self, frame: WSFrame) -> bool:
        assert self._fragments is not None
        if len(self._fragments) + frame.payload_size > self.app.config.max_message_size:
            self._fragments = self._utf8 = None
            self._protocol_error(1009, "message too big")
            return False
        chunk = frame.get_payload_as_memoryview()
        if self._utf8 is not None:
            try:
                self._utf8.decode(chunk, final=bool(frame.fin))
            except UnicodeDecodeError:
                self._fragments = self._utf8 = None
                self._protocol_error(1007, "invalid UTF-8 in a text message")
                return False
        self._fragments += chunk
        return True

    def _end_fragments(self) -> None:
        assert self._fragments is not None
        payload = bytes(self._fragments)
        self._fragments = self._utf8 = None
        self._message(payload, self._fragments_text, self._fragments_compressed)

    def _message(self, payload: bytes, text: bool, compressed: bool = False) -> None:
        if self.state is not OPEN or self.transport is None or self.transport.is_close_frame_sent:
            # picows closes with 1009 by itself on a frame over max_message_size,
            # but when the rest of that frame was read with its header it still
            # hands the frame over: it is refused, not a message.
            return
        stats = self.app.stats
        stats.bytes_in += len(payload)  # the payload as it came, compressed or not
        if compressed:
            try:
                payload = deflate.decompress(payload, self.app.config.max_message_size)
            except deflate.MessageTooBig:
                self._protocol_error(1009, "message too big")
                return
            except deflate.DecompressionError:
                self._protocol_error(1002, "compressed message does not inflate")
                return
        stats.messages_in += 1
        try:
            self._run(self.received(payload, text))
        except Exception as exc:
            self.fail(exc)

    def _peer_closed(self, frame: WSFrame) -> None:
        """Answer a close frame with the same code (1002 for one a peer may not send)."""
        assert self.transport is not None
        if self.state is OPEN:
            code = frame.get_close_code().value if frame.payload_size >= 2 else 1000
            reply = code if valid_close_code(code) else 1002
            self.close_code = code
            self.state = CLOSING
            if self.outbox is not None:
                self.outbox.flush()
            self.app.detach(self)
            self.transport.send_close(WSCloseCode(reply))
        self.transport.disconnect()

    def _protocol_error(self, code: int, reason: str) -> None:
        self.app.stats.protocol_errors += 1
        self.close(code, reason)

    def _run(self, step: Step | None) -> None:
        """Run a handler's coroutine now, or after the ones still waiting.

        A class whose steps are known not to need a task (``eager``) has
        each run at once, up to its first wait, and pays for a task only
        then; others always run in a task, where asyncio.timeout() and
        current_task() work.
        """
        if step is None:
            return
        if self._queue is not None:
            self._queue.append(step)
            return
        first: Awaitable[None] = step
        if self.eager and self.app.eager:
            started = start_eagerly(step)
            if started is None:
                return
            first = finish(*started)
        self._queue = deque()
        self._task = asyncio.get_running_loop().create_task(self._finish(first))

    async def _finish(self, first: Awaitable[None]) -> None:
        try:
            await first
            while self._queue:
                await self._queue.popleft()
        except Exception as exc:
            self.fail(exc)
        finally:
            self._drop_queue()

    def _drop_queue(self) -> None:
        """Forget queued handler calls: the connection is closed or has failed."""
        queue, self._queue = self._queue, None
        while queue:
            queue.popleft().close()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
