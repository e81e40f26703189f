"""Network allow-lists: which client addresses may use a key, and who the client is.

A user and a key may each carry a list of CIDRs (``--allow-ips``). A request must come from an
address inside *every* list that applies, so a key's list can only narrow its user's. The
client's address is the TCP peer, unless that peer is one of ``server.trusted_proxies``: then
``X-Forwarded-For`` is read from the right, skipping trusted proxies, and the first address that
isn't one is the client. With no trusted proxies (the default) the header is never believed, so
a client can't claim someone else's address.

Pure functions and small immutable objects: no I/O, parsed once (at config load, or when a key
is loaded into the cache), checked per request in O(list length).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_NETWORKS = 100


def parse_networks(items: Iterable[str], param: str = "allow_ips") -> tuple[Network, ...]:
    """CIDRs (or single addresses) to networks; ``ValueError`` naming the bad one."""
    out: list[Network] = []
    for raw in items:
        text = raw.strip() if isinstance(raw, str) else raw
        if not isinstance(text, str) or not text:
            raise ValueError(f"{param}: every entry must be an address or CIDR, e.g. 10.0.0.0/8")
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{param}: {text[:60]!r} is not an address or CIDR") from None
    if len(out) > MAX_NETWORKS:
        raise ValueError(f"{param}: at most {MAX_NETWORKS} entries")
    return tuple(dict.fromkeys(out))


def _mapped(ip: Address) -> Address:
    """``::ffff:10.0.0.1`` is ``10.0.0.1``: a dual-stack listener reports IPv4 peers that way."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Every list that applies to one key (its user's, its own); empty lists: no restriction."""

    lists: tuple[tuple[Network, ...], ...] = ()

    @classmethod
    def of(cls, *lists: Iterable[str] | None) -> NetworkPolicy:
        return cls(tuple(parse_networks(x) for x in lists if x is not None))

    @property
    def restricted(self) -> bool:
        return bool(self.lists)

    def allows(self, ip: Address | None) -> bool:
        if not self.lists:
            return True
        if ip is None:  # a peer we can't name (a Unix socket): fail closed
            return False
        ip = _mapped(ip)
        return all(any(ip in net for net in nets) for nets in self.lists)


UNRESTRICTED = NetworkPolicy()


def _address(text: str) -> Address | None:
    text = text.strip().strip("[]")
    if "%" in text:  # a zone id (fe80::1%eth0) names no routable peer
        text = text.split("%", 1)[0]
    try:
        return _mapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_address(
    peer: str | None, forwarded_for: bytes | None, trusted: tuple[Network, ...]
) -> Address | None:
    """The client's address: the peer, or, behind trusted proxies, X-Forwarded-For's."""
    ip = _address(peer) if peer else None
    if ip is None or not trusted or forwarded_for is None:
        return ip
    if not any(ip in net for net in trusted):
        return ip
    hops = forwarded_for.decode("latin-1").split(",")
    for hop in reversed(hops):
        h = _address(hop)
        if h is None:
            return None  # a garbled chain: name nobody, so an allow-list refuses it
        if not any(h in net for net in trusted):
            return h
        ip = h
    return ip  # every hop was a trusted proxy: the left-most one is as far as we can see
