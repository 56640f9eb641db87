"""The operator's port (`metrics_port`): `/metrics`, `/health/live` and `/health/ready`, apart from client traffic.

Kubernetes' probes and Prometheus' scrapes must be answered however the main listener is loaded: there, thousands
of slow or hostile connections can fill the connection cap. This port is a small asyncio server on the same event
loop (so liveness still proves the loop turns), with its own bounds: a few connections at once, a short head in a
short time, one request per connection. The exposition is rendered in a worker thread, off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson

from gateway.metrics import CONTENT_TYPE, GatewayMetrics

log = logging.getLogger("gateway.metrics_server")

MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 8 * 1024
HEAD_TIMEOUT = 5.0
REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}
Readiness = Callable[[], tuple[bool, dict[str, object]]]


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    return head % (status, REASONS[status], content_type, len(body)) + body


class MetricsServer:
    def __init__(self, metrics: GatewayMetrics, host: str, port: int | None, readiness: Readiness) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        if self._port is not None:
            self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_HEAD_BYTES)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(await self._answer(head.split(b"\r\n", 1)[0]))
            async with asyncio.timeout(HEAD_TIMEOUT):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, request_line: bytes) -> bytes:
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b'{"error": "method not allowed"}')
        if path == b"/metrics":
            body = await asyncio.to_thread(self._metrics.exposition)
            return _response(200, body, CONTENT_TYPE.encode())
        if path == b"/health/live":
            return _response(200, b'{"status": "ok"}')
        if path == b"/health/ready":
            ready, report = self._readiness()
            return _response(200 if ready else 503, orjson.dumps(report))
        return _response(404, b'{"error": "not found"}')
