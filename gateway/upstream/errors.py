"""The one place where the HTTP client's exceptions become the gateway's own (as httpx's `map_exceptions`).

Every caller of a replica, a media host or the retrieval service wraps its I/O in `map_upstream_errors()` and
handles only `TransportError` / `TransportTimeout`; what each means to the client is decided at the call site.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from gateway.errors import ServiceUnavailable, UpstreamTimeout


class TransportError(Exception):
    """The peer could not be reached, or its connection or body broke. `reason` is for logs, never for clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransportTimeout(TransportError):
    """A socket budget (connect or read) set on the client ran out."""


@contextmanager
def map_upstream_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ServerTimeoutError as exc:  # also a TimeoutError: must be matched before the general case
        raise TransportTimeout(type(exc).__name__) from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise TransportError(type(exc).__name__) from None


@contextmanager
def reaching_service(name: str) -> Iterator[None]:
    """I/O to another tier of the gateway (the retrieval service): its transport failures as the client's
    504 (no answer in time) or 503 (unreachable), naming the service and nothing of its address."""
    try:
        with map_upstream_errors():
            yield
    except (TimeoutError, TransportTimeout):
        raise UpstreamTimeout(f"The {name} did not answer in time.") from None
    except TransportError:
        raise ServiceUnavailable(f"The {name} is unreachable.", headers={"Retry-After": "1"}) from None


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (it is not read further). `content.read(n)` returns
    whatever one read brings, so a body split across reads would come back cut short."""
    body = bytearray()
    with map_upstream_errors():
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                return None
    return bytes(body)
