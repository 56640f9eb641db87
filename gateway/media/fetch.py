"""Fetch media bytes for a request: `data:` URLs decoded, http(s) URLs fetched behind the SSRF guard.

Every read is capped at limit+1 bytes, so a lying or missing Content-Length cannot grow memory; connect, read and
total timeouts stop drip-feeding hosts; a semaphore bounds concurrent fetches across all requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import urljoin

import aiohttp

from gateway.config import MediaSettings
from gateway.errors import InvalidRequest, MediaFetchFailed, MediaFetchTimeout, MediaTooLarge, MediaUrlRefused
from gateway.media.guard import GuardedResolver, MediaAccessPolicy, resolve_checked
from gateway.upstream.errors import TransportError, TransportTimeout, map_upstream_errors

REDIRECTS = (301, 302, 303, 307, 308)
READ_CHUNK = 64 * 1024


def decode_data_url(url: str, max_bytes: int, param: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 `data:` URL; the size is checked before decoding."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidRequest("Media data URLs must be base64: data:<type>;base64,<data>.", param=param)
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise MediaTooLarge(f"The media item is larger than the limit of {max_bytes} bytes.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The media data URL is not valid base64.", param=param) from None
    if len(data) > max_bytes:
        raise MediaTooLarge(f"The media item is larger than the limit of {max_bytes} bytes.", param=param)
    return header[5:-7].lower(), data


class MediaFetcher:
    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        self.policy = MediaAccessPolicy(
            allowed_domains=tuple(settings.allowed_domains),
            denied_domains=tuple(settings.denied_domains),
            trusted_hosts=tuple(settings.trusted_hosts),
        )
        self._slots = asyncio.Semaphore(settings.max_concurrent_fetches)
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=settings.max_concurrent_fetches
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # a gzip bomb stays compressed; non-identity encodings are refused below
            headers={"Accept-Encoding": "identity", "User-Agent": "vlm-gateway-media"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def fetch(self, url: str, max_bytes: int, param: str) -> bytes:
        if not self.settings.allow_remote_urls:
            raise MediaUrlRefused("Remote media URLs are disabled on this gateway; send data: URLs.", param=param)
        settings = self.settings
        try:
            async with self._slots, asyncio.timeout(settings.total_timeout):
                for _ in range(settings.max_redirects + 1):
                    _scheme, host, port = self.policy.check_url(url, param)
                    try:
                        await resolve_checked(host, port, self.policy)
                    except MediaUrlRefused as refused:
                        refused.param = param
                        raise
                    location = await self._get(url, max_bytes, param)
                    if isinstance(location, bytes):
                        return location
                    url = urljoin(url, location)
                raise MediaFetchFailed("The media URL redirected too many times.", param=param)
        except TimeoutError:
            raise MediaFetchTimeout("The media host did not deliver in time.", param=param) from None

    async def _get(self, url: str, max_bytes: int, param: str) -> bytes | str:
        """The body, or the Location of a redirect (to be checked hop by hop by the caller)."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
        )
        try:
            with map_upstream_errors():
                return await self._read_response(url, max_bytes, param, timeout)
        except TransportTimeout:
            raise MediaFetchTimeout("The media host did not deliver in time.", param=param) from None
        except TransportError:
            raise MediaFetchFailed("The media URL could not be fetched.", param=param) from None

    async def _read_response(self, url: str, max_bytes: int, param: str, budgets: aiohttp.ClientTimeout) -> bytes | str:
        async with self._session.get(url, allow_redirects=False, timeout=budgets) as response:
            if response.status in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise MediaFetchFailed("The media URL redirected without a Location.", param=param)
                return location
            if response.status != 200:
                raise MediaFetchFailed(f"The media URL answered HTTP {response.status}.", param=param)
            if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                raise MediaFetchFailed("The media host sent a compressed encoding.", param=param)
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise MediaTooLarge(f"The media item is larger than the limit of {max_bytes} bytes.", param=param)
            body = bytearray()
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise MediaTooLarge(f"The media item is larger than the limit of {max_bytes} bytes.", param=param)
            return bytes(body)
