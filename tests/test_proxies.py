"""The client's address behind proxies: forwarding headers believed from trusted peers only.

Anyone can send ``X-Forwarded-For``; a node believes it only from a TCP peer
in ``trusted_proxies``, and then only as far as trusted proxies wrote it
(the right-most address that is not itself trusted). The walk is checked as
pure code, then on real nodes through the per-address connection limit,
whose 429 is what a client sees when its address is counted, and last
behind a real nginx running the shipped deploy/nginx.conf.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import HOST, NodeProcess, RawWS, ascrape, metric
from multidict import CIMultiDict
from test_nginx import start_nginx

from fastws.forwarded import TrustedProxies, parse_address

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------
# the walk, as pure code
# --------------------------------------------------------------------------

PROXIES = TrustedProxies(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"])


def client(peer: str, *headers: tuple[str, str], proxies: TrustedProxies = PROXIES) -> str:
    return proxies.client_ip(peer, CIMultiDict(headers))


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    spoofed = ("X-Forwarded-For", "1.2.3.4")
    assert client("203.0.113.9", spoofed, ("X-Real-IP", "1.2.3.4")) == "203.0.113.9"
    # Nothing is trusted by default, not even the loopback.
    assert client("127.0.0.1", spoofed, proxies=TrustedProxies([])) == "127.0.0.1"


def test_a_trusted_peer_forwards_the_right_most_untrusted_address() -> None:
    assert client("10.1.2.3", ("X-Forwarded-For", "198.51.100.4")) == "198.51.100.4"
    # What the client wrote itself (the left part) is not believed.
    chain = ("X-Forwarded-For", "6.6.6.6, 198.51.100.4, 10.9.9.9")
    assert client("10.1.2.3", chain) == "198.51.100.4"
    # One header per proxy counts as one list, in order.
    lines = (("X-Forwarded-For", "6.6.6.6, 198.51.100.4"), ("x-forwarded-for", "192.168.1.7"))
    assert client("10.1.2.3", *lines) == "198.51.100.4"


def test_when_every_hop_is_trusted_the_farthest_is_the_client() -> None:
    assert client("10.1.2.3", ("X-Forwarded-For", "10.0.0.5, 192.168.1.7")) == "10.0.0.5"


def test_an_entry_that_is_not_an_address_ends_the_walk() -> None:
    chain = ("X-Forwarded-For", "198.51.100.4, unknown, 10.0.0.5")
    assert client("10.1.2.3", chain) == "10.0.0.5"
    assert client("10.1.2.3", ("X-Forwarded-For", "garbage")) == "10.1.2.3"


def test_x_real_ip_counts_when_there_is_no_x_forwarded_for() -> None:
    assert client("10.1.2.3", ("X-Real-IP", "198.51.100.4")) == "198.51.100.4"
    both = (("X-Real-IP", "10.0.0.77"), ("X-Forwarded-For", "198.51.100.4"))
    assert client("10.1.2.3", *both) == "198.51.100.4"
    assert client("10.1.2.3", ("X-Real-IP", "nonsense")) == "10.1.2.3"


def test_addresses_are_normalised() -> None:
    assert client("::ffff:10.1.2.3", ("X-Forwarded-For", "198.51.100.4")) == "198.51.100.4"
    v6 = ("X-Forwarded-For", "2001:DB9:0:0::1, 2001:db8::1")
    assert client("2001:db8::2", v6) == "2001:db9::1"
    assert parse_address("198.51.100.4:5123") == parse_address("198.51.100.4")
    assert str(parse_address("[2001:db9::1]:443")) == "2001:db9::1"
    assert parse_address("not-an-address") is None


# --------------------------------------------------------------------------
# on real nodes: the per-address limit counts the resolved address
# --------------------------------------------------------------------------


async def upgrade(port: int, source: str, forwarded: str | None) -> RawWS:
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    ws = await RawWS.open(port, source=source, headers=headers)
    if ws.status == 101:
        await ws.welcome()
    return ws


async def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Each upgrade claims another address; all count as the real peer's: 429 at the limit."""
    node = node_factory(args=["--max-connections-per-ip", "2"])
    held = [
        await upgrade(node.port, "127.0.0.1", "198.51.100.1"),
        await upgrade(node.port, "127.0.0.1", "198.51.100.2"),
    ]
    try:
        assert [ws.status for ws in held] == [101, 101]
        refused = await upgrade(node.port, "127.0.0.1", "198.51.100.3")
        refused.close()
        assert refused.status == 429, (refused.status, refused.body)
        samples = await ascrape(node.port)
        refusals = metric(
            samples, "fastws_connections_refused_total", reason="max_connections_per_ip"
        )
        assert refusals == 1
    finally:
        for ws in held:
            ws.close()


async def test_a_trusted_proxy_gives_each_forwarded_client_its_own_allowance(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--max-connections-per-ip", "2", "--trusted-proxies", "127.0.0.1"])
    held: list[RawWS] = []
    try:
        # Two clients behind the same proxy, two connections each.
        for forwarded in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.2"):
            held.append(await upgrade(node.port, "127.0.0.1", forwarded))
            assert held[-1].status == 101, (forwarded, held[-1].status, held[-1].body)
        for forwarded in ("198.51.100.1", "198.51.100.2"):
            refused = await upgrade(node.port, "127.0.0.1", forwarded)
            refused.close()
            assert refused.status == 429, (forwarded, refused.status)
        # "a, b" with b trusted is a: the chain's trusted hop is skipped.
        chain = await upgrade(node.port, "127.0.0.1", "198.51.100.1, 127.0.0.1")
        chain.close()
        assert chain.status == 429, chain.status
        held.append(await upgrade(node.port, "127.0.0.1", "198.51.100.3, 127.0.0.1"))
        assert held[-1].status == 101
        # The proxy's own connections (no header) are its own address's.
        held.append(await upgrade(node.port, "127.0.0.1", None))
        assert held[-1].status == 101
        # A peer that is not a proxy cannot borrow a forwarded client's allowance...
        other = await upgrade(node.port, "127.0.0.2", "198.51.100.1")
        held.append(other)
        assert other.status == 101, other.status
        # ...nor free itself of its own: it is counted as itself.
        second = await upgrade(node.port, "127.0.0.2", "198.51.100.9")
        held.append(second)
        assert second.status == 101  # its second connection
        third = await upgrade(node.port, "127.0.0.2", "198.51.100.10")
        third.close()
        assert third.status == 429, third.status
    finally:
        for ws in held:
            ws.close()


async def test_behind_the_shipped_nginx_each_client_address_has_its_own_allowance(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """deploy/nginx.conf in front of a node that trusts it: the limit counts clients.

    Clients reach nginx from 127.0.0.2 and 127.0.0.3; the node sees only
    nginx (127.0.0.1), and counts the address nginx forwards.
    """
    node = node_factory(args=["--max-connections-per-ip", "1", "--trusted-proxies", HOST])
    # The shipped file has three upstream servers; here all three are this node.
    proxy = start_nginx([node.port] * 3, tmp_path)
    held: list[RawWS] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            held.append(await upgrade(proxy.port, source, None))
            assert held[-1].status == 101, (source, held[-1].status, held[-1].body)
        again = await upgrade(proxy.port, "127.0.0.2", None)
        again.close()
        assert again.status == 429, (again.status, again.body)
        # What a client writes itself stays left of its real address in the
        # header nginx passes on, and is not read.
        spoofed = await upgrade(proxy.port, "127.0.0.2", "198.51.100.77")
        spoofed.close()
        assert spoofed.status == 429, spoofed.status
        # nginx passes the Host on with its port, so a page of the site
        # nginx serves is the node's own site (docs/origins.md).
        own = await RawWS.open(
            proxy.port, source="127.0.0.4", headers={"Origin": f"http://{HOST}:{proxy.port}"}
        )
        held.append(own)
        assert own.status == 101, (own.status, own.body)
        samples = await ascrape(node.port)
        reason = "max_connections_per_ip"
        assert metric(samples, "fastws_connections_refused_total", reason=reason) == 2
        assert metric(samples, "fastws_connections_open") == 3
    finally:
        for ws in held:
            ws.close()
        proxy.stop()
        proxy.cleanup_files()
