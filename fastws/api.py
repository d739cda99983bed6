"""The server HTTP API: what a backend asks of a deployment, without a WebSocket.

With ``api_port`` set, a node also listens there (on ``api_host``, the
loopback address by default) for a handful of JSON requests, each
authenticated with ``api_key`` (docs/api.md):

==========================  ==================================================
``POST /api/publish``        ``{"channel", "data"}`` -> ``{"seq"}``
``POST /api/broadcast``      ``{"channels": [...], "data"}`` -> ``{"seqs", "errors"}``
``GET /api/presence``        ``?channel=`` -> ``{"clients"}``
``GET /api/history``         ``?channel=&since_epoch=&since_seq=&limit=``
                             -> ``{"epoch", "seq", "publications"}``
``POST /api/disconnect``     ``{"user", "code", "reason"}`` -> ``{"disconnected", ...}``
``GET /api/info``            ``{"node", "nodes", "connections", "channels", ...}``
==========================  ==================================================

It is a small HTTP/1.1 server on asyncio streams, written here rather than
taken from a framework: the API needs requests with a ``Content-Length``
body, keep-alive and nothing else, and the node's runtime dependencies stay
what they are. The parser is strict and bounded: a request line and
headers of at most :data:`MAX_HEAD` bytes, a body of at most
:data:`MAX_BODY`, each read within :data:`READ_TIMEOUT`; no chunked bodies
(411), no folded headers, one ``Content-Length``. An error that leaves the
connection's bytes in doubt (a bad head, a body not read) closes it.

Every failure is a JSON ``{"error": {"code", "message"}}`` with a fitting
status, so that a backend can tell its mistakes (4xx) from the
deployment's (503: the broker cannot reach Redis; try again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from fastws import control
from fastws.brokers.base import Unavailable
from fastws.protocol import MAX_CHANNEL_LENGTH, CommandError, Position, encode_publication

if TYPE_CHECKING:
    from fastws.node import Node

logger = logging.getLogger("fastws.api")

# The request line and headers, at most; more gets 431.
MAX_HEAD = 16384

# The body, at most; more gets 413. A publication this large is already
# as large as a subscriber's whole send buffer by default (max_send_buffer).
MAX_BODY = 1 << 20

# Seconds a client has to send a request head (on a new connection, or on a
# kept-alive one between two requests) and then its body.
READ_TIMEOUT = 15.0

# Channels one broadcast may name.
MAX_BROADCAST = 1000

# Digits a number in a query may have: a seq or a limit fits in 18.
MAX_DIGITS = 18


class ApiError(Exception):
    """A request that fails with ``status`` and ``{"error": {"code", "message"}}``.

    ``extra`` goes into the body beside ``error``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, list[str]]  # names in lower case, values in order
    keep_alive: bool
    length: int = 0  # of the body, from Content-Length
    body: bytes = b""
    read: bool = False  # whether the body has been read (or there was none)


Handler = Callable[[Request], Awaitable[Any]]


@dataclass
class _Route:
    method: str
    handler: Handler
    takes_body: bool = field(default=False)


class Api:
    """The server API of one node: its listener and its handlers."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.app = node.app
        self.config = node.config
        if not self.config.api_key:
            raise ValueError("the server API needs api_key")
        self._key = self.config.api_key.encode()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # one per connection
        self._idle: set[asyncio.Task[Any]] = set()  # those waiting for a request
        self._closing = False
        self._routes = {
            "/api/publish": _Route("POST", self._publish, True),
            "/api/broadcast": _Route("POST", self._broadcast, True),
            "/api/presence": _Route("GET", self._presence),
            "/api/history": _Route("GET", self._history),
            "/api/disconnect": _Route("POST", self._disconnect, True),
            "/api/info": _Route("GET", self._info),
        }

    async def start(self) -> None:
        config = self.config
        self._server = await asyncio.start_server(
            self._serve,
            config.api_host,
            config.api_port,
            limit=MAX_HEAD,
            reuse_address=True,
            # Workers share the API port as they share the WebSocket port;
            # every request means the same on any of them.
            reuse_port=config.workers > 1,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("server API listening on %s:%d", config.api_host, self.port)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop listening; requests under way get ``grace`` seconds to be answered."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in self._idle:
            task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0] if peer else "?"
        try:
            while not self._closing:
                self._idle.add(task)
                try:
                    request = await self._read_head(reader)
                except ApiError as exc:
                    await self._send(writer, *self._failure(exc), close=True)
                    await _linger(reader, writer)
                    return
                finally:
                    self._idle.discard(task)
                if request is None:
                    return
                status, body, headers = await self._respond(request, reader, writer, peer_ip)
                close = not request.keep_alive or not request.read or self._closing
                await self._send(writer, status, body, headers, close=close)
                if close:
                    if not request.read:
                        await _linger(reader, writer)
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away, or stopped sending or reading
        except Exception:
            logger.exception("API connection from %s failed", peer_ip)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request's line and headers; None at the end of the connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise ApiError(400, "bad_request", "incomplete request") from None
            return None
        except asyncio.LimitOverrunError:
            raise ApiError(431, "head_too_large", f"request head over {MAX_HEAD} bytes") from None
        except TimeoutError:
            return None
        return _parse_head(head.lstrip(b"\r\n"))

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        close: bool,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)

    # requests

    async def _respond(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_ip: str,
    ) -> tuple[int, bytes, dict[str, str]]:
        try:
            self._authenticate(request, peer_ip)
            route = self._routes.get(request.path)
            if route is None:
                raise ApiError(404, "not_found", f"no endpoint {request.path}")
            if request.method != route.method:
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{request.path} takes {route.method}, not {request.method}",
                    headers={"Allow": route.method},
                )
            if route.takes_body:
                _check_json(request)
            await self._read_body(request, reader, writer)
            result = await route.handler(request)
        except ApiError as exc:
            return self._failure(exc)
        except Unavailable as exc:
            return self._failure(
                ApiError(503, "unavailable", str(exc), headers={"Retry-After": "1"})
            )
        except CommandError as exc:
            return self._failure(ApiError(400, exc.code.value, exc.message))
        except Exception:
            logger.exception("API %s %s failed", request.method, request.path)
            return self._failure(ApiError(500, "internal_error", "an unexpected error"))
        logger.debug("API %s %s from %s: 200", request.method, request.path, peer_ip)
        return 200, result if isinstance(result, bytes) else orjson.dumps(result), {}

    @staticmethod
    def _failure(exc: ApiError) -> tuple[int, bytes, dict[str, str]]:
        body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}, **exc.extra})
        return exc.status, body, exc.headers

    def _authenticate(self, request: Request, peer_ip: str) -> None:
        """The key, as a bearer token or X-API-Key; if both, or twice, the same each time."""
        presented = list(request.headers.get("x-api-key", []))
        for value in request.headers.get("authorization", []):
            scheme, _, credentials = value.partition(" ")
            presented.append(credentials.strip() if scheme.lower() == "bearer" else "")
        if presented and all(
            hmac.compare_digest(key.encode("latin-1"), self._key) for key in presented
        ):
            return
        why = "wrong API key" if presented else "missing API key"
        logger.info("API %s %s from %s refused: %s", request.method, request.path, peer_ip, why)
        raise ApiError(
            401,
            "unauthorized",
            f"{why}: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="fastws-api"'},
        )

    async def _read_body(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.length > MAX_BODY:
            raise ApiError(413, "too_large", f"the body is over {MAX_BODY} bytes")
        if request.length:
            expect = ",".join(request.headers.get("expect", [])).lower()
            if expect == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.body = await asyncio.wait_for(reader.readexactly(request.length), READ_TIMEOUT)
        request.read = True

    # endpoints

    async def _publish(self, request: Request) -> Any:
        body = _object(request, {"channel", "data"})
        channel = _channel(body["channel"], "channel")
        return {"seq": await self.app.publish(channel, body["data"])}

    async def _broadcast(self, request: Request) -> Any:
        body = _object(request, {"channels", "data"})
        names = body["channels"]
        if not isinstance(names, list) or not names:
            raise _bad("'channels' must be a non-empty list of channel names")
        if len(names) > MAX_BROADCAST:
            raise _bad(f"'channels' names more than {MAX_BROADCAST} channels")
        channels = [_channel(name, f"channels[{i}]") for i, name in enumerate(names)]
        if len(set(channels)) != len(channels):
            raise _bad("'channels' names a channel more than once")
        data = body["data"]
        encode_publication("", 0, data)  # data that cannot be published fails once, now
        results = await asyncio.gather(
            *(self.app.publish(channel, data) for channel in channels), return_exceptions=True
        )
        seqs: dict[str, int] = {}
        errors: dict[str, dict[str, str]] = {}
        for channel, result in zip(channels, results, strict=True):
            if isinstance(result, int):
                seqs[channel] = result
            elif isinstance(result, Unavailable):
                errors[channel] = {"code": "unavailable", "message": str(result)}
            elif isinstance(result, Exception):
                logger.error("API broadcast to %s failed", channel, exc_info=result)
                errors[channel] = {"code": "internal_error", "message": "an unexpected error"}
            else:
                raise result  # cancelled
        if not seqs:
            unavailable = all(error["code"] == "unavailable" for error in errors.values())
            raise ApiError(
                503 if unavailable else 500,
                "unavailable" if unavailable else "internal_error",
                "nothing was published: " + next(iter(errors.values()))["message"],
                headers={"Retry-After": "1"} if unavailable else None,
                extra={"errors": errors},
            )
        return {"seqs": seqs, "errors": errors}

    async def _presence(self, request: Request) -> Any:
        query = _query(request, {"channel"})
        channel = _channel(query["channel"], "channel")
        if not self.app.namespaces(channel).presence:
            raise ApiError(400, "not_available", f"presence is off in the namespace of {channel!r}")
        return {"clients": await self.app.broker.presence(channel)}

    async def _history(self, request: Request) -> Any:
        query = _query(request, {"channel"}, {"since_epoch", "since_seq", "limit"})
        channel = _channel(query["channel"], "channel")
        since = None
        if ("since_epoch" in query) != ("since_seq" in query):
            raise _bad("'since_epoch' and 'since_seq' go together")
        if "since_epoch" in query:
            since = Position(query["since_epoch"], _count(query["since_seq"], "since_seq"))
        limit = _count(query["limit"], "limit") if "limit" in query else None
        position, kept = await self.app.broker.history(channel, since, limit)
        if kept is None:
            raise ApiError(
                409,
                "unrecoverable",
                "the history no longer reaches back to since_epoch/since_seq; "
                "start again from the epoch and seq given here",
                extra={"epoch": position.epoch, "seq": position.seq},
            )
        # The publications as subscribers got them, spliced in as they are kept.
        head = orjson.dumps({"epoch": position.epoch, "seq": position.seq, "publications": []})
        return head[:-2] + b",".join(stored.payload for stored in kept) + b"]}"

    async def _disconnect(self, request: Request) -> Any:
        body = _object(request, {"user"}, {"code", "reason"})
        user = body["user"]
        code = body.get("code", 1008)
        reason = body.get("reason", "disconnected")
        problem = control.refusal(user, code, reason)
        if problem is not None:
            raise _bad(problem)
        return await self.app.disconnect(user, code, reason)

    async def _info(self, request: Request) -> Any:
        _query(request, set())
        app = self.app
        try:
            registry = await app.broker.nodes()
        except Unavailable:
            registry = app.broker.known_nodes  # as last read: most useful when Redis is away
        return {
            "node": app.node_name,
            "nodes": {**registry, app.node_name: self.node.info()},
            "connections": len(app.connections),
            "channels": len(app.hub.channel_names()),
            "broker_ready": app.broker.ready,
        }


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after an error with bytes of the request unread: our side first, then
    read what the client still sends, for a moment. Closing at once, with data
    unread, would send a reset that can destroy the error response on its way."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            while await reader.read(65536):
                pass


def _parse_head(head: bytes) -> Request:
    """Request line and headers (RFC 9112), refusing what a careful server should."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ApiError(400, "bad_request", "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise ApiError(505, "bad_version", "HTTP/1.1 only")
        raise ApiError(400, "bad_request", "malformed request line")
    if not target.startswith("/"):
        raise ApiError(400, "bad_request", "the target must be a path")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(" \t"):
            raise ApiError(400, "bad_request", f"malformed header line {line[:40]!r}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    path, _, query = target.partition("?")
    connection = {t.strip() for v in headers.get("connection", []) for t in v.lower().split(",")}
    request = Request(
        method,
        path,
        query,
        headers,
        keep_alive=version == "HTTP/1.1" and "close" not in connection,
    )
    if "transfer-encoding" in headers:
        raise ApiError(
            411,
            "length_required",
            "send the body with Content-Length; Transfer-Encoding is not supported",
        )
    lengths = {v.strip() for value in headers.get("content-length", []) for v in value.split(",")}
    if len(lengths) > 1 or any(not (v.isascii() and v.isdigit()) for v in lengths):
        raise ApiError(400, "bad_request", "a malformed Content-Length")
    if lengths:
        request.length = int(lengths.pop())
    elif method == "POST":
        raise ApiError(411, "length_required", "a POST needs Content-Length")
    request.read = not request.length
    return request


def _check_json(request: Request) -> None:
    types = request.headers.get("content-type", [])
    if len(types) != 1 or types[0].split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")


def _object(request: Request, required: Set[str], optional: Set[str] = frozenset()) -> Any:
    """The body: a JSON object with every required field and no unknown one."""
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return _fields(body, required, optional)


def _query(request: Request, required: Set[str], optional: Set[str] = frozenset()) -> Any:
    """The query parameters, each at most once, the required ones there and no others."""
    try:
        pairs = parse_qsl(
            request.query,
            keep_blank_values=True,
            strict_parsing=bool(request.query),
            errors="strict",
            max_num_fields=16,
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"a malformed query: {exc}") from None
    query = dict(pairs)
    if len(query) != len(pairs):
        raise _bad("a query parameter is given more than once")
    return _fields(query, required, optional)


def _fields(values: dict[str, Any], required: Set[str], optional: Set[str]) -> Any:
    unknown = sorted(values.keys() - required - optional)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}")
    missing = sorted(required - values.keys())
    if missing:
        raise _bad(f"{missing[0]!r} is missing")
    return values


def _channel(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{what!r} must be a non-empty string")
    if len(value) > MAX_CHANNEL_LENGTH:
        raise _bad(f"{what!r} is longer than {MAX_CHANNEL_LENGTH} characters")
    return value


def _count(value: str, what: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise _bad(f"{what!r} must be an integer >= 0")
    return int(value)
