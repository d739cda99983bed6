"""Which web pages may open a WebSocket to the node: the ``Origin`` check.

A browser lets any page open a WebSocket to any site, sends that site's
cookies and HTTP credentials with the upgrade, and lets the page read what
comes back: the same-origin policy does not cover WebSockets. A node that
trusts those credentials and accepts every origin lets any page its users
visit act as them (cross-site WebSocket hijacking). The browser does say
which page asks, in the ``Origin`` header, which a page cannot change; so
an upgrade is accepted only when

- it has no ``Origin``: not a browser (a backend, a command-line client,
  which could send any header it liked, so the check means nothing there);
- its ``Origin`` is the node's own site: the origin's host and port are
  the request's ``Host``;
- or its ``Origin`` matches one of the ``allowed_origins`` patterns.

The pure functions here know nothing of sockets; :meth:`fastws.node.Node.route`
asks :meth:`OriginPolicy.allows` and answers 403 when it says no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# An origin as browsers write it (RFC 6454): scheme://host[:port], no path.
# In a pattern, `*` may stand for part of the host or for the port.
_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.*]+\]|[a-z0-9.*_-]+)(:([0-9]+|\*))?")

# What `*` in a pattern stands for: one or more characters of a host name
# or a port, never the `:` or `/` that would leave that part.
_WILDCARD = "[a-z0-9._-]+"

_DEFAULT_PORTS = {"http": "80", "ws": "80", "https": "443", "wss": "443"}


def check_pattern(pattern: str) -> str:
    """The pattern lower-cased, or ValueError saying what is wrong with it."""
    lowered = pattern.strip().lower()
    if lowered in ("*", "null"):
        return lowered
    if _PATTERN.fullmatch(lowered) is None:
        hint = ""
        if lowered.endswith("/"):
            hint = " (an origin has no path, not even '/')"
        elif "://" not in lowered:
            hint = " (an origin starts with its scheme, e.g. https://)"
        raise ValueError(
            f"{pattern!r} is not an origin pattern{hint}: write scheme://host or "
            "scheme://host:port, with `*` for part of the host or for the port "
            "(https://*.example.com), `null`, or `*` for every origin"
        )
    return lowered


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(_WILDCARD if c == "*" else re.escape(c) for c in pattern))


def _authority(origin: str) -> tuple[str, str] | None:
    """(host[:port] with the scheme's default port dropped, default port), or None."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not rest or "/" in rest:
        return None
    default = _DEFAULT_PORTS.get(scheme, "")
    if default and rest.endswith(":" + default):
        rest = rest[: -len(default) - 1]
    return rest, default


class OriginPolicy:
    """Decides from a request's ``Origin`` and ``Host`` whether its upgrade may go on."""

    __slots__ = ("allow_all", "exact", "wildcards")

    def __init__(self, patterns: Sequence[str]) -> None:
        checked = [check_pattern(p) for p in patterns]
        self.allow_all = "*" in checked
        self.exact = frozenset(p for p in checked if "*" not in p)
        self.wildcards = tuple(_compile(p) for p in checked if "*" in p and p != "*")

    def allows(self, origins: Sequence[str], host: str | None) -> bool:
        """Whether a request with these ``Origin`` headers (usually 0 or 1) and ``Host``
        may be upgraded. More than one ``Origin`` is never a browser's doing."""
        if not origins:
            return True
        if self.allow_all:
            return True
        if len(origins) > 1:
            return False
        origin = origins[0].strip().lower()
        if origin in self.exact:
            return True
        if any(w.fullmatch(origin) for w in self.wildcards):
            return True
        return host is not None and same_site(origin, host)


def same_site(origin: str, host: str) -> bool:
    """Whether a (lower-case) origin names the host and port in a ``Host`` header.

    A port left out on either side is the default port of the origin's
    scheme: ``https://example.com`` is ``example.com`` and ``example.com:443``.
    """
    parsed = _authority(origin)
    if parsed is None:
        return False  # "null", or not an origin at all
    authority, default = parsed
    host = host.strip().lower()
    if default and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    return authority == host
