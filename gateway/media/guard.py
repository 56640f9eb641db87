"""Which media URLs the gateway may fetch, and which addresses it may connect to.

The host is resolved by the gateway, every resolved address is checked, and the connection goes to an address
that was checked (see `GuardedResolver`): no second lookup, so DNS rebinding cannot slip a private address in.
Numeric host spellings (`2130706433`, `0x7f000001`, `127.1`) resolve through the same libc call a connect would
use, so they are caught by the address check rather than by string matching.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.errors import MediaUrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")
# NAT64 and 6to4 wrap an IPv4 address inside IPv6; the wrapped one is what a connect reaches.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _unwrap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public_address(address: IPAddress) -> bool:
    """False for private, loopback, link-local, reserved, multicast, unspecified and shared (CGNAT) space."""
    inner = _unwrap(address)
    return inner.is_global and not inner.is_multicast and not inner.is_reserved


@dataclass(frozen=True)
class MediaAccessPolicy:
    """The operator's rules. `trusted_hosts` (names or CIDRs) may resolve to private addresses."""

    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    denied_domains: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()

    def _trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        networks = []
        for entry in self.trusted_hosts:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        return networks

    def host_is_trusted(self, host: str) -> bool:
        return _matches(host, self.trusted_hosts)

    def address_allowed(self, host: str, address: IPAddress) -> bool:
        if is_public_address(address) or self.host_is_trusted(host):
            return True
        return any(_unwrap(address) in network for network in self._trusted_networks())

    def check_url(self, url: str, param: str) -> tuple[str, str, int]:
        """(scheme, host, port) of a URL the policy lets the gateway try; raises MediaUrlRefused otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise MediaUrlRefused("The media URL is malformed.", param=param) from None
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise MediaUrlRefused(f"Media URLs must use http or https, not '{scheme or '?'}'.", param=param)
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise MediaUrlRefused("The media URL has no host.", param=param)
        if parts.username is not None or parts.password is not None:
            raise MediaUrlRefused("Media URLs must not carry credentials.", param=param)
        if _matches(host, self.denied_domains):
            raise MediaUrlRefused("The media host is not allowed.", param=param)
        if self.allowed_domains and not _matches(host, self.allowed_domains) and not self.host_is_trusted(host):
            raise MediaUrlRefused("The media host is not on the allow-list.", param=param)
        return scheme, host, port or (443 if scheme == "https" else 80)


def _matches(host: str, domains: Sequence[str]) -> bool:
    return any(host == d or host.endswith("." + d.lstrip(".")) for d in (x.lower().rstrip(".") for x in domains))


async def resolve_checked(
    host: str, port: int, policy: MediaAccessPolicy, *, family: int = socket.AF_UNSPEC
) -> list[tuple[int, str]]:
    """Resolve once; refuse the host if any address it resolves to is not allowed (not just the first)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaUrlRefused("The media host could not be resolved.") from None
    results: list[tuple[int, str]] = []
    for fam, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if not policy.address_allowed(host, address):
            raise MediaUrlRefused("The media URL points at a private or reserved address.")
        results.append((fam, str(sockaddr[0])))
    if not results:
        raise MediaUrlRefused("The media host could not be resolved.")
    return results


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that returns only checked addresses, so the socket connects to what was checked."""

    def __init__(self, policy: MediaAccessPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        checked = await resolve_checked(host, port, self.policy, family=family)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0, flags=socket.AI_NUMERICHOST)
            for fam, address in checked
        ]

    async def close(self) -> None:
        return None


def literal_address(host: str) -> IPAddress | None:
    """The address of an IP-literal host (aiohttp connects to literals without asking any resolver)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
