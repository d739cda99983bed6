"""The client's address behind proxies: ``X-Forwarded-For`` from trusted peers only.

Behind a load balancer every TCP connection comes from the balancer, and
the client's own address is in the headers it adds: ``X-Forwarded-For``
(each proxy appends the address it was connected from) and ``X-Real-IP``.
Anyone can send those headers, so they are believed only from a peer in
``trusted_proxies``, and even then only as far as they were written by
trusted proxies: the list is read from the right (the hop nearest to the
node), trusted addresses are skipped, and the first address that is not
trusted is the client. Whatever lies left of it was written by the client
or by proxies nobody vouches for. From any other peer the headers are
ignored and the client is the peer.

No I/O here; :class:`fastws.node.Node` resolves each upgrade's address with
:meth:`TrustedProxies.client_ip`, and per-address limits and logs use it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Headers(Protocol):
    def getall(self, key: str, default: list[str], /) -> list[str]: ...


def parse_network(text: str) -> Network:
    """One entry of ``trusted_proxies``: a CIDR block or a single address."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not an address or a CIDR block such as 10.0.0.0/8 ({exc})"
        ) from None


def parse_address(text: str) -> Address | None:
    """An address from a header or a socket; IPv4-mapped IPv6 as IPv4; None if not one.

    A port some proxies append (``203.0.113.7:5123``, ``[2001:db8::1]:5123``)
    is dropped.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The proxies whose forwarding headers are believed, and the walk through them."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks = tuple(parse_network(c) for c in cidrs)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client_ip(self, peer: str, headers: Headers) -> str:
        """The client's address: ``peer`` unless a trusted peer forwarded another."""
        if not self.networks:
            return peer
        nearest = parse_address(peer)
        if nearest is None or not self.trusts(nearest):
            return peer
        hops = [
            hop.strip()
            for line in headers.getall("X-Forwarded-For", [])
            for hop in line.split(",")
            if hop.strip()
        ]
        if hops:
            for hop in reversed(hops):
                address = parse_address(hop)
                if address is None:
                    # Not an address: nothing written before it can be
                    # believed; the client is the last trusted hop.
                    break
                if not self.trusts(address):
                    return str(address)
                nearest = address
            return str(nearest)
        real = headers.getall("X-Real-IP", [])
        if len(real) == 1:
            address = parse_address(real[0])
            if address is not None:
                return str(address)
        return peer
