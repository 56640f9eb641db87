"""Property tests of the SSRF guard: every spelling of an address gets the verdict of the address itself."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import MediaUrlRefused
from gateway.media.guard import MediaAccessPolicy, is_public_address, resolve_checked

PRIVATE_V4 = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "192.0.2.0/24",
    "198.18.0.0/15",
]


def _in(network: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    net = ipaddress.IPv4Network(network)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv4Address)


ipv4 = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), *[_in(n) for n in PRIVATE_V4])


def spellings(address: ipaddress.IPv4Address) -> list[str]:
    value = int(address)
    a, b, c, d = address.packed
    return [
        str(address),
        str(value),
        hex(value),
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"0{a:o}.{b}.{c}.{d}",
        f"::ffff:{address}",
        f"::ffff:{value >> 16:x}:{value & 0xFFFF:x}",
        f"64:ff9b::{address}",
    ]


def verdict(host: str) -> bool:
    try:
        asyncio.run(resolve_checked(host, 80, MediaAccessPolicy()))
    except MediaUrlRefused:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(ipv4)
def test_every_spelling_gets_the_address_verdict(address: ipaddress.IPv4Address) -> None:
    expected = is_public_address(address)
    for host in spellings(address):
        assert verdict(host) == expected, host


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
def test_ipv6_literals_get_their_verdict(address: ipaddress.IPv6Address) -> None:
    assert verdict(str(address)) == is_public_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.1.1",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "::",
        "ff02::1",
    ],
)
def test_known_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_known_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_trusted_networks_and_names() -> None:
    policy = MediaAccessPolicy(trusted_hosts=("10.20.0.0/16", "images.internal"))
    assert policy.address_allowed("x", ipaddress.ip_address("10.20.3.4"), 80)
    assert not policy.address_allowed("x", ipaddress.ip_address("10.21.3.4"), 80)
    assert policy.address_allowed("images.internal", ipaddress.ip_address("10.99.0.1"), 8080)
    assert policy.address_allowed("cdn.images.internal", ipaddress.ip_address("10.99.0.1"), 443)


def test_a_trusted_entry_with_a_port_trusts_that_port_only() -> None:
    """Trusting an internal image store must not open the other services on its host (its metrics, admin)."""
    policy = MediaAccessPolicy(trusted_hosts=("images.internal:8443", "10.30.0.0/16:80", "[fd00::/8]:443"))
    private = ipaddress.ip_address("10.99.0.1")
    assert policy.address_allowed("images.internal", private, 8443)
    assert not policy.address_allowed("images.internal", private, 9090)
    assert policy.address_allowed("x", ipaddress.ip_address("10.30.1.1"), 80)
    assert not policy.address_allowed("x", ipaddress.ip_address("10.30.1.1"), 8000)
    assert policy.address_allowed("x", ipaddress.ip_address("fd00::1"), 443)
    assert not policy.address_allowed("x", ipaddress.ip_address("fd00::1"), 22)


@pytest.mark.parametrize(
    ("url", "allowed", "denied", "ok"),
    [
        ("https://cdn.example.com/a.png", ("example.com",), (), True),
        ("https://example.com.evil.net/a.png", ("example.com",), (), False),
        ("https://evil.net/a.png", ("example.com",), (), False),
        ("https://bad.example.com/a.png", (), ("bad.example.com",), False),
        ("https://good.example.com/a.png", (), ("bad.example.com",), True),
        ("https://EXAMPLE.com./a.png", ("example.com",), (), True),
        ("http://[::1", (), (), False),
        ("http:///nohost", (), (), False),
    ],
)
def test_domain_lists(url: str, allowed: tuple[str, ...], denied: tuple[str, ...], ok: bool) -> None:
    policy = MediaAccessPolicy(allowed_domains=allowed, denied_domains=denied)
    if ok:
        policy.check_url(url, "p")
    else:
        with pytest.raises(MediaUrlRefused):
            policy.check_url(url, "p")
