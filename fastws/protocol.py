"""The channel protocol's commands and server messages, with no I/O.

``parse`` turns the payload of one TEXT frame into a command object or
raises :class:`CommandError` carrying the error code the client is told;
the ``encode_*`` functions produce the payloads of server messages. Nothing
here touches a socket, so the whole wire contract (docs/protocol.md) is
tested by feeding it bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

MAX_CHANNEL_LENGTH = 255


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNRECOVERABLE = "unrecoverable"
    NOT_AVAILABLE = "not_available"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal_error"


class CommandError(Exception):
    """A command that fails; the connection stays open and gets an error reply."""

    def __init__(self, code: ErrorCode, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a channel's history: the last seq it saw in an epoch."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Sub:
    id: int | None
    ch: str
    since: Position | None = None


@dataclass(frozen=True, slots=True)
class Unsub:
    id: int | None
    ch: str


@dataclass(frozen=True, slots=True)
class Pub:
    id: int | None
    ch: str
    data: Any


@dataclass(frozen=True, slots=True)
class History:
    id: int | None
    ch: str
    since: Position | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Presence:
    id: int | None
    ch: str


@dataclass(frozen=True, slots=True)
class Refresh:
    """A fresh token for the same user, before the connection's token expires."""

    id: int | None
    token: str = field(repr=False)  # a credential: kept out of logs and tracebacks


Command = Sub | Unsub | Pub | History | Presence | Refresh


def _bad(message: str, id: int | None) -> CommandError:
    return CommandError(ErrorCode.BAD_REQUEST, message, id)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _channel(obj: dict[str, Any], id: int | None) -> str:
    ch = obj.get("ch")
    if not isinstance(ch, str) or not ch:
        raise _bad("'ch' must be a non-empty string", id)
    if len(ch) > MAX_CHANNEL_LENGTH:
        raise _bad(f"'ch' is longer than {MAX_CHANNEL_LENGTH} characters", id)
    return ch


def _since(obj: dict[str, Any], id: int | None) -> Position | None:
    since = obj.get("since")
    if since is None:
        return None
    if (
        not isinstance(since, dict)
        or not isinstance(since.get("epoch"), str)
        or not _int(since.get("seq"))
        or since["seq"] < 0
    ):
        raise _bad('\'since\' must be {"epoch": str, "seq": int >= 0}', id)
    return Position(since["epoch"], since["seq"])


def _limit(obj: dict[str, Any], id: int | None) -> int | None:
    limit = obj.get("limit")
    if limit is None:
        return None
    if not _int(limit) or limit < 0:
        raise _bad("'limit' must be an integer >= 0", id)
    return int(limit)


def parse(payload: bytes | str) -> Command:
    """Parse one client frame into a command, or raise CommandError(bad_request)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _bad("not valid JSON", None) from None
    if not isinstance(obj, dict):
        raise _bad("a command must be a JSON object", None)
    id = obj.get("id")
    if id is not None and not _int(id):
        raise _bad("'id' must be an integer", None)
    op = obj.get("op")
    if op == "pub":
        if "data" not in obj:
            raise _bad("'pub' needs 'data'", id)
        return Pub(id, _channel(obj, id), obj["data"])
    if op == "sub":
        return Sub(id, _channel(obj, id), _since(obj, id))
    if op == "unsub":
        return Unsub(id, _channel(obj, id))
    if op == "history":
        return History(id, _channel(obj, id), _since(obj, id), _limit(obj, id))
    if op == "presence":
        return Presence(id, _channel(obj, id))
    if op == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise _bad("'token' must be a non-empty string", id)
        return Refresh(id, token)
    if not isinstance(op, str):
        raise _bad("'op' must be a string", id)
    raise _bad(f"unknown op {op!r}", id)


def encode_welcome(client: str, node: str, **extra: Any) -> bytes:
    return orjson.dumps({"welcome": {"client": client, "node": node, **extra}})


def encode_ok(id: int, **fields: Any) -> bytes:
    return orjson.dumps({"id": id, "ok": True, **fields})


def encode_error(id: int | None, code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"id": id, "error": {"code": code.value, "message": message}})


def encode_history(id: int, epoch: str, seq: int, pubs: list[bytes]) -> bytes:
    """The history reply, with the kept publications spliced in as they were encoded."""
    head = orjson.dumps({"id": id, "ok": True, "epoch": epoch, "seq": seq, "pubs": []})
    return head[:-2] + b",".join(pubs) + b"]}"  # head ends in `"pubs":[]}`


def encode_join(ch: str, info: dict[str, Any]) -> bytes:
    return orjson.dumps({"ch": ch, "join": info})


def encode_leave(ch: str, info: dict[str, Any]) -> bytes:
    return orjson.dumps({"ch": ch, "leave": info})


def encode_publication(ch: str, seq: int, data: Any) -> bytes:
    """Encode a publication; CommandError(bad_request) when data cannot be encoded.

    orjson reads JSON nested up to 1024 levels but writes at most 254, so a
    deep enough ``data`` is refused here, before it takes a ``seq``.
    """
    try:
        return orjson.dumps({"ch": ch, "seq": seq, "data": data})
    except orjson.JSONEncodeError as exc:
        raise CommandError(ErrorCode.BAD_REQUEST, f"'data' cannot be published: {exc}") from None
