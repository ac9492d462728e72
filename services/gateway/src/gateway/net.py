"""Who is asking: the client's IP address, also behind the TLS proxy.

Behind a proxy every request's TCP peer is the proxy, so per-IP limits keyed on the peer put
every visitor into one bucket. The proxy appends the address it saw to ``X-Forwarded-For``;
only hops added by proxies we trust (``GATEWAY_TRUSTED_PROXIES``) are believed, because a
client can send the header with any content it likes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

from chat_pipeline.config import IPNetwork
from gateway.keys import runtime_key

__all__ = ["client_ip", "client_ip_from", "rate_key"]

_MAX_HOP = 64  # an unparseable hop is used as it is, but never as an unbounded key


def client_ip(request: web.Request) -> str:
    """The client's address: the TCP peer, or when the peer is a trusted proxy, the right-most
    hop of ``X-Forwarded-For`` that is not one of our proxies."""
    trusted = request.app[runtime_key].settings.trusted_proxies
    return client_ip_from(request.remote, request.headers.getall("X-Forwarded-For", []), trusted)


def client_ip_from(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str:
    address = _parse(peer)
    if address is None:
        return peer[:_MAX_HOP] if peer else "unknown"
    if not _is_trusted(address, trusted):
        return str(address)
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    hops = [hop for hop in hops if hop]
    # Right to left: each trusted proxy appended the address it saw; the first hop that is not
    # ours is the client (everything left of it came from the client and proves nothing).
    for hop in reversed(hops):
        hop_address = _parse(hop)
        if hop_address is None:
            return hop[:_MAX_HOP]
        if not _is_trusted(hop_address, trusted):
            return str(hop_address)
    # every hop is one of ours: the left-most is the closest we know of the client
    return str(_parse(hops[0])) if hops else str(address)


def rate_key(ip: str) -> str:
    """The bucket of a per-IP limit: an IPv6 client usually holds a whole /64, so a limit per
    IPv6 address would be a limit per 2^64 addresses."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _parse(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _is_trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Iterable[IPNetwork]
) -> bool:
    return any(address.version == net.version and address in net for net in trusted)
