"""Which media URLs the gateway may fetch, and which addresses it may connect to.

The host is resolved and every address it resolves to is checked before the fetch starts (`resolve_checked`);
the connection then resolves through `GuardedResolver`, which checks every address again and hands the socket
only addresses it checked. So there are two lookups, each checked: a DNS answer that changes between them
(rebinding) is refused by the second check rather than connected to.
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


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, `10.0.0.0/8:443` → (host, port); a bare name, address or CIDR → (it, None)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = entry.rpartition(":")
    if sep and host.count(":") == 0 and port.isdigit():
        return host, int(port)
    return entry, None


@dataclass(frozen=True)
class MediaAccessPolicy:
    """The operator's rules. `trusted_hosts` (names or CIDRs, each optionally with `:port`) may resolve to
    private addresses; an entry with a port trusts that port only, so trusting an image store does not open the
    other services on its host."""

    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    denied_domains: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()

    def _trusted(self) -> list[tuple[str, int | None]]:
        return [_split_port(entry) for entry in self.trusted_hosts]

    def _trusted_networks(self, port: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        networks = []
        for entry, only in self._trusted():
            if only is not None and only != port:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        return networks

    def host_is_trusted(self, host: str, port: int | None = None) -> bool:
        """Whether `host` is trusted (on `port`; with no port given, on some port — for the allow-list)."""
        return any(
            _matches(host, (name,)) and (only is None or port is None or only == port) for name, only in self._trusted()
        )

    def address_allowed(self, host: str, address: IPAddress, port: int) -> bool:
        if is_public_address(address) or self.host_is_trusted(host, port):
            return True
        return any(_unwrap(address) in network for network in self._trusted_networks(port))

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
        if not policy.address_allowed(host, address, port):
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
