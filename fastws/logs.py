"""Log lines a machine can read, and the fields that tie them to one connection.

``log_format = "json"`` writes one JSON object per line: ``time``, ``level``,
``logger``, ``message`` and ``pid``, ``exc`` for a traceback, and on every
line about a connection its ``client`` id, ``user`` (empty when anonymous),
``remote`` address and ``trace`` id. ``"text"``, the default, writes the
same lines for people, the connection's fields at the end.

The trace id is the one a W3C ``traceparent`` header on the upgrade carried,
so that a connection's lines join the trace of whatever opened it (a
gateway, a backend's client); without a valid one the node makes one up.
Either way the welcome frame hands it to the client (docs/protocol.md).

A line is about a connection when it is logged through
:meth:`fastws.connection.Connection.log`, a :class:`ConnectionLog`: the
fields are read from the connection when the line is written, so they cost
nothing until then, and a user set by a token refresh shows from then on.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from fastws.connection import Connection

FORMATS = ("text", "json")

# The fields of a line about a connection, in the order JSON lines carry them.
CONNECTION_FIELDS = ("client", "user", "remote", "trace")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_HEX = frozenset("0123456789abcdef")


def _lower_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in _HEX for c in text)


def parse_traceparent(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` value, or None if it is not a valid one.

    ``version-traceid-parentid-flags``: two, 32, 16 and two lowercase hex
    digits. Version ``ff`` is invalid, as is an all-zero trace or parent
    id. Version 00 is exactly that; a later version may carry more after a
    further ``-``, and its first four fields are read the same way (W3C
    Trace Context, "Versioning of traceparent").
    """
    value = value.strip(" \t")
    head, rest = value[:55], value[55:]
    parts = head.split("-")
    if len(parts) != 4:
        return None
    version, trace, parent, flags = parts
    if not (
        _lower_hex(version, 2)
        and _lower_hex(trace, 32)
        and _lower_hex(parent, 16)
        and _lower_hex(flags, 2)
    ):
        return None
    if version == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return None
    if rest and (version == "00" or not rest.startswith("-")):
        return None
    return trace


def new_trace_id() -> str:
    """A made-up trace id: 16 random bytes in lowercase hex, as W3C trace ids are."""
    return secrets.token_hex(16)


def trace_id(values: Iterable[str]) -> str:
    """The trace id of an upgrade: its one valid ``traceparent`` header's, or a new one.

    Two or more ``traceparent`` headers are as invalid as a malformed one.
    """
    found = list(values)
    if len(found) == 1:
        parsed = parse_traceparent(found[0])
        if parsed is not None:
            return parsed
    return new_trace_id()


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose lines carry a connection's client, user, remote and trace fields."""

    def __init__(self, logger: logging.Logger, conn: Connection) -> None:
        super().__init__(logger, None)
        self.conn = conn

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        conn = self.conn
        fields = {
            "client": conn.id,
            "user": conn.user,
            "remote": conn.remote_ip,
            "trace": conn.trace,
        }
        extra = kwargs.get("extra")
        kwargs["extra"] = fields if extra is None else {**fields, **extra}
        return msg, kwargs


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in CONNECTION_FIELDS if hasattr(record, name)}


class JSONFormatter(logging.Formatter):
    """One JSON object per line (orjson): time, level, logger, message, pid, fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The plain format, with a connection's fields after the message when there are any."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return text


def _utc(created: float) -> str:
    """RFC 3339 time in UTC with milliseconds: ``2026-11-25T10:04:05.123Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JSONFormatter()
    return TextFormatter()


def configure(level: str, log_format: str = "text") -> int:
    """Log to stderr at ``level`` in ``log_format``; return the level as a number.

    As with :func:`logging.basicConfig`, a process whose root logger has
    handlers already (a library user's own setup) keeps them.
    """
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        number = logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=number, handlers=[handler])
    # picows logs every connection at INFO: too much for a node's log.
    logging.getLogger("picows").setLevel(max(number, logging.WARNING))
    return number
