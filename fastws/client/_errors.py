"""The client's exceptions: one base class, and one class per way a call can fail."""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error the client raises."""


class CommandError(ClientError):
    """The node refused a command: its reply was ``{"id", "error": {code, message}}``.

    ``code`` is one of the wire contract's error codes (``bad_request``,
    ``forbidden``, ``limit_exceeded``, ``not_available``...), or
    ``message_too_big`` when the node closed the connection with 1009 while
    the command was in flight: such a command is failed rather than sent
    again, since it would only be refused again.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ClientClosed(ClientError):
    """The client has stopped: ``close()`` was called, or the node refused it for good."""


class Rejected(ClientClosed):
    """The node refused this client in a way that retrying cannot fix.

    That is a close with 1008 (policy: bad or expired credentials, rate
    limit, too many bad commands) or an upgrade refused with HTTP 401 or
    403. ``code`` is the close code or the HTTP status.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"refused by the node with {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason
