"""The Origin check: pages of other sites get HTTP 403 before the upgrade.

The seed design accepted every origin, so any web page a user visited could
open a WebSocket to the node as that user (cross-site WebSocket hijacking).
Now an upgrade carrying an Origin is accepted only when it is the node's
own site or matches ``allowed_origins``; one without Origin is not a
browser's and goes on. The policy is checked as pure code, then on a real
node with real clients (the browser's own ``Origin: null`` is in
tests/test_browser_client.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import HOST, NodeProcess, RawWS, ascrape, metric, proto_client
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from fastws.origins import OriginPolicy, check_pattern, same_site

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------
# the policy, as pure code
# --------------------------------------------------------------------------


def allows(patterns: list[str], origin: str | None, host: str = "node.example:8080") -> bool:
    return OriginPolicy(patterns).allows([] if origin is None else [origin], host)


def test_by_default_only_no_origin_and_the_nodes_own_are_accepted() -> None:
    assert allows([], None)
    assert allows([], "http://node.example:8080")
    assert allows([], "https://NODE.example:8080")  # host names are case-insensitive
    assert not allows([], "https://evil.example")
    assert not allows([], "http://node.example:8081")  # same host, other port: another origin
    assert not allows([], "http://node.example")
    assert not allows([], "null")  # sandboxed frames, file:// pages, blank tabs
    assert not allows([], "http://node.example:8080/")  # not an origin as browsers send it


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("https://app.example", "app.example", True),
        ("https://app.example", "app.example:443", True),
        ("http://app.example", "app.example:80", True),
        ("https://app.example", "app.example:80", False),
        ("http://app.example:8080", "app.example", False),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://[::1]", "[::1]:80", True),
        ("null", "null", False),
        ("app.example", "app.example", False),
    ],
)
def test_same_site_compares_host_and_port_with_default_ports_filled_in(
    origin: str, host: str, same: bool
) -> None:
    assert same_site(origin, host) is same


def test_patterns_match_whole_origins_and_a_star_stays_in_its_part() -> None:
    patterns = ["https://app.example.com", "https://*.example.org", "http://localhost:*"]
    for ok in (
        "https://app.example.com",
        "HTTPS://App.Example.COM",
        "https://a.example.org",
        "https://a.b.example.org",
        "http://localhost:3000",
    ):
        assert allows(patterns, ok), ok
    for refused in (
        "http://app.example.com",  # another scheme is another origin
        "https://app.example.com:8443",
        "https://example.org",  # `*.` needs a label before the dot
        "https://a.example.org:8443",
        "https://a.example.org.evil.example",
        "https://evilexample.org",
        "http://localhost",
        "https://localhost:3000",
        "null",
    ):
        assert not allows(patterns, refused), refused


def test_null_and_star_are_allowed_only_when_listed() -> None:
    assert allows(["null"], "null")
    assert not allows(["null"], "https://evil.example")
    assert allows(["*"], "https://evil.example")
    assert allows(["*"], "null")


def test_two_origin_headers_are_refused_unless_every_origin_is() -> None:
    policy = OriginPolicy(["https://a.example"])
    assert not policy.allows(["https://a.example", "https://a.example"], "node.example")
    assert OriginPolicy(["*"]).allows(["https://a.example", "https://b.example"], "x")


@pytest.mark.parametrize(
    "pattern",
    ["https://app.example/", "https://app.example/path", "app.example", "*.example.com", ""],
)
def test_patterns_that_are_not_origins_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="not an origin pattern"):
        check_pattern(pattern)


# --------------------------------------------------------------------------
# on a real node
# --------------------------------------------------------------------------


async def upgrade(port: int, origin: str | None) -> RawWS:
    """An upgrade with this Origin (none for None); the caller closes it."""
    return await RawWS.open(port, headers={} if origin is None else {"Origin": origin})


async def status_of(port: int, origin: str | None) -> int:
    ws = await upgrade(port, origin)
    try:
        if ws.status == 101:
            await ws.welcome()
        return ws.status
    finally:
        ws.close()


async def test_a_default_node_refuses_other_sites_with_403(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory()
    own = f"http://{HOST}:{node.port}"
    assert await status_of(node.port, None) == 101
    assert await status_of(node.port, own) == 101
    for other in ("https://evil.example", "null", f"http://{HOST}:{node.port + 1}"):
        ws = await upgrade(node.port, other)
        ws.close()
        assert ws.status == 403, (other, ws.status, ws.body)
        assert ws.body == b"origin not allowed\n"
        assert "upgrade" not in ws.headers, ws.headers
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_connections_refused_total", reason="origin") == 3
    assert metric(samples, "fastws_connections_accepted_total") == 2


async def test_a_real_client_sending_a_foreign_origin_sees_403(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(node.ws_url(), origin=Origin("https://evil.example"), open_timeout=5):
            pass
    assert refused.value.response.status_code == 403
    # Without an Origin (what websockets sends by default) it is not a browser.
    async with proto_client(node.ws_url()) as c:
        assert c.welcome is not None


async def test_allowed_origins_lets_the_listed_sites_in(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--allowed-origins", "https://app.example, https://*.example.org"])
    for ok in ("https://app.example", "https://eu.example.org", f"http://{HOST}:{node.port}"):
        assert await status_of(node.port, ok) == 101, ok
    for other in ("https://evil.example", "https://example.org", "null"):
        assert await status_of(node.port, other) == 403, other
    async with proto_client(node.ws_url(), origin=Origin("https://a.b.example.org")) as c:
        assert c.welcome is not None


async def test_star_accepts_every_origin(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(env={"FASTWS_ALLOWED_ORIGINS": "*"})
    for origin in ("https://evil.example", "null", "chrome-extension://abcdef"):
        assert await status_of(node.port, origin) == 101, origin
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_connections_refused_total", reason="origin") == 0
