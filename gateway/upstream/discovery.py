"""Replica discovery through DNS: one name, one address per replica (a Kubernetes headless Service).

Behind a ClusterIP Service every vLLM pod hides behind one address, so least-outstanding routing, health
checks and breakers would see a single replica; resolving a headless Service's name gives each pod its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, urlsplit

# (host, port) -> the addresses the name resolves to now; an empty list means "no replicas" (scaled to zero).
Resolver = Callable[[str, int], Awaitable[list[str]]]


class DiscoveryFailed(Exception):
    """The name could not be resolved for a reason that says nothing about the replicas (a DNS outage)."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve through the system resolver (getaddrinfo in a thread, as asyncio does)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        # A headless Service with no ready pod has no records: that is a pool scaled to zero, not an outage.
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise DiscoveryFailed(f"{host}: {exc.strerror or exc}") from None
    return [str(info[4][0]) for info in infos]


def _port(parts: SplitResult) -> int:
    return parts.port or 80  # discover URLs are http only (gateway/config.py)


def replica_urls(discover_url: str, addresses: list[str]) -> list[str]:
    """The base URL of each replica: the discovery URL with its host replaced by each address, in a stable order."""
    parts = urlsplit(discover_url)
    port = _port(parts)
    urls = set()
    for address in addresses:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        urls.add(f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}")
    return sorted(urls)


async def discover(discover_url: str, resolver: Resolver) -> list[str]:
    parts = urlsplit(discover_url)
    assert parts.hostname is not None  # the config validator requires a host
    return replica_urls(discover_url, await resolver(parts.hostname, _port(parts)))
