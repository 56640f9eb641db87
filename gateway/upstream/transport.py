"""The generation requests' HTTP client: pyreqwest (Rust's reqwest and hyper, driven from asyncio).

On one core a bare pass-through under uvicorn relayed ~17,500 req/s through pyreqwest against ~7,600 through
aiohttp (`loadtests/bench_proxies.py` and README, "Why these libraries"), so the hot path (chat, completions,
Responses) goes through it. Cold calls — health checks, adapter loading, the retrieval service, media fetches
(which need aiohttp's resolver hook to connect only to checked addresses) — keep the aiohttp session.

Every pyreqwest exception is turned into the gateway's `TransportError` / `TransportTimeout` here, so callers
handle the same two errors whichever client carried the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta

from pyreqwest import exceptions as reqwest_errors
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.request import StreamRequest
from pyreqwest.response import Response, ResponseBodyReader

from gateway.config import Timeouts
from gateway.upstream.errors import TransportError, TransportTimeout

POOL_IDLE_SECONDS = 30


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    try:
        yield
    except reqwest_errors.RequestTimeoutError as exc:  # a TransportError too: matched first
        raise TransportTimeout(type(exc).__name__) from None
    except (reqwest_errors.RequestError, ConnectionError) as exc:
        raise TransportError(type(exc).__name__) from None


class UpstreamResponse:
    """An answered request whose body is read chunk by chunk as the replica writes it."""

    __slots__ = ("_closed", "_reader", "_request", "_response", "status")

    def __init__(self, request: StreamRequest, response: Response) -> None:
        self.status = response.status
        self._request = request
        self._response = response
        self._reader: ResponseBodyReader = response.body_reader
        self._closed = False

    def header(self, name: str) -> str | None:
        return self._response.get_header(name)

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrived (b"" once the body ended). A read cancelled before its bytes arrive
        loses nothing: they are returned by the next read."""
        async with _mapped():
            chunk = await self._reader.read_chunk()
        return b"" if chunk is None else bytes(chunk)

    async def read_all(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def read_bounded(self, limit: int) -> bytes | None:
        """The rest of the body, or None once it passes `limit` bytes (it is not read further)."""
        body = bytearray()
        while chunk := await self.read_chunk():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    async def close(self) -> None:
        """Done with the response: a body read to its end leaves the connection pooled; otherwise the connection
        is dropped, which is how the replica learns to stop generating."""
        if not self._closed:
            self._closed = True
            await self._request.__aexit__(None, None, None)


class ReplicaTransport:
    """Pooled connections to the replicas, one client per pair of socket budgets (pyreqwest sets them per client;
    each pool names its own), created on first use.

    A cancelled pyreqwest request that is still waiting for its headers is not aborted: it runs on until the
    replica answers (pyreqwest 0.15 drops the task's handle, not the task). The socket's read timeout is what
    closes it, and closing is what makes vLLM abort the generation, so the read timeout is the first-token
    budget: a replica silent that long after the request was written is cut off from inside the client, at the
    moment the gateway's own first-token timer gives up. The same timeout bounds every later silence, so a stream
    ends after min(idle, first_token) without a byte. A request given up on after its headers is closed at once
    by `UpstreamResponse.close`."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._clients: dict[tuple[float, float], Client] = {}

    def _client(self, timeouts: Timeouts) -> Client:
        budgets = (timeouts.connect, timeouts.first_token)
        client = self._clients.get(budgets)
        if client is None:
            client = (
                ClientBuilder()
                .no_proxy()  # replicas are addressed directly; a proxy from the environment must not apply
                .http1_only()
                .gzip(False)
                .brotli(False)
                .zstd(False)
                .deflate(False)  # no Accept-Encoding: bodies are relayed byte for byte
                .tcp_nodelay(True)
                .max_connections(self._max_connections)
                .pool_idle_timeout(timedelta(seconds=POOL_IDLE_SECONDS))
                .connect_timeout(timedelta(seconds=budgets[0]))
                .read_timeout(timedelta(seconds=budgets[1]))
                .build()
            )
            self._clients[budgets] = client
        return client

    async def send(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts
    ) -> UpstreamResponse:
        """Send the request and wait for the status line and headers (not for any of the body)."""
        builder = self._client(timeouts).request(method, url).headers(dict(headers))
        if body:
            builder = builder.body_bytes(body)
        # A buffer limit of 0: return at the headers, then hand over each chunk as it arrives (pyreqwest's
        # default would first wait for 64 KiB of body, which holds back a stream's first token).
        request = builder.streamed_read_buffer_limit(0).build_streamed()
        async with _mapped():
            response = await request.__aenter__()
        return UpstreamResponse(request, response)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
