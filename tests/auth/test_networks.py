"""Network allow-lists and the client address behind trusted proxies: tables of cases."""

from __future__ import annotations

import ipaddress

import pytest

from fleetgate.auth.networks import NetworkPolicy, client_address, parse_networks

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("lists", "addr", "allowed"),
    [
        ((), "203.0.113.9", True),
        ((["10.0.0.0/8"],), "10.1.2.3", True),
        ((["10.0.0.0/8"],), "11.0.0.1", False),
        ((["10.0.0.0/8"], ["10.1.0.0/16"]), "10.1.2.3", True),  # a key narrows its user's list
        ((["10.0.0.0/8"], ["10.1.0.0/16"]), "10.2.0.1", False),
        ((["10.1.0.0/16"], ["192.168.0.0/16"]), "10.1.0.1", False),  # can't widen: both apply
        ((["10.0.0.0/8", "192.168.1.0/24"],), "192.168.1.7", True),
        ((["2001:db8::/32"],), "2001:db8::1", True),
        ((["2001:db8::/32"],), "2001:db9::1", False),
        ((["127.0.0.1"],), "::ffff:127.0.0.1", True),  # dual-stack listeners report v4 so
        ((["10.0.0.0/8"],), None, False),  # an unnamed peer: fail closed
    ],
)
def test_every_list_must_allow_the_address(lists, addr, allowed):
    policy = NetworkPolicy.of(*lists)
    assert policy.allows(ip(addr) if addr else None) is allowed


@pytest.mark.parametrize(
    "bad", [["10.0.0.0/33"], ["not-an-ip"], [""], ["10.0.0.0/8", "x"], ["1.2.3.4/8/9"]]
)
def test_bad_cidrs_are_refused_with_the_entry_named(bad):
    with pytest.raises(ValueError, match="allow_ips"):
        parse_networks(bad)


def test_at_most_100_entries():
    with pytest.raises(ValueError, match="at most"):
        parse_networks([f"10.0.{i // 256}.{i % 256}" for i in range(101)])


TRUSTED = parse_networks(["127.0.0.1", "10.9.0.0/16"])


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.5", None, (), "203.0.113.5"),
        # Without trusted proxies the header is never believed.
        ("203.0.113.5", b"10.0.0.1", (), "203.0.113.5"),
        ("127.0.0.1", b"10.0.0.1", (), "127.0.0.1"),
        # From a trusted proxy: the right-most address that isn't a trusted proxy.
        ("127.0.0.1", b"198.51.100.7", TRUSTED, "198.51.100.7"),
        ("127.0.0.1", b"6.6.6.6, 198.51.100.7", TRUSTED, "198.51.100.7"),  # a forged left part
        ("127.0.0.1", b"198.51.100.7, 10.9.1.1", TRUSTED, "198.51.100.7"),  # two proxies
        # A peer that isn't trusted can't forward for anyone.
        ("203.0.113.5", b"10.0.0.1", TRUSTED, "203.0.113.5"),
        ("127.0.0.1", b"garbage", TRUSTED, None),
        ("127.0.0.1", b"", TRUSTED, None),
        ("127.0.0.1", None, TRUSTED, "127.0.0.1"),
        ("127.0.0.1", b"10.9.0.1", TRUSTED, "10.9.0.1"),  # all trusted: the furthest seen
        ("::ffff:127.0.0.1", b"198.51.100.7", TRUSTED, "198.51.100.7"),
        (None, b"198.51.100.7", TRUSTED, None),
    ],
)
def test_client_address(peer, xff, trusted, expected):
    got = client_address(peer, xff, trusted)
    assert got == (ip(expected) if expected else None)
