"""uvicorn's httptools protocol with the limits a public listener needs, enforced before any app code runs.

- The request line and headers are capped in bytes (`max_head_bytes`) while they arrive: 431 and close, before
  the parser buffers them.
- They must arrive within `head_timeout` (a connection that sends nothing, or dribbles its headers, is answered
  408 and closed), and a body may not pause longer than `body_idle_timeout` between chunks (the connection is
  closed; the app sees a disconnect).
- At most `max_connections` connections are open at once. At the cap a new connection evicts the oldest one
  still waiting for (or dribbling) its request head, so idle or slow connections cannot keep a probe of
  `/health/live` out; only when every connection is busy with a request is the new one answered 503 and closed.
  File descriptors therefore never run out for the replica connections and health checks.
uvicorn's own keep-alive timeout closes idle connections between requests.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.asgi import error_headers
from gateway.errors import GatewayError, HeadersTooLarge, RequestTimeout, ServiceUnavailable, error_body

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
REFUSALS: dict[int, GatewayError] = {
    408: RequestTimeout(),
    431: HeadersTooLarge(),
    503: ServiceUnavailable("Too many open connections; retry shortly.", headers={"Retry-After": "1"}),
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int
    head_timeout: float
    body_idle_timeout: float
    max_connections: int


def refusal(status: int) -> bytes:
    """A complete OpenAI-shaped error response that closes the connection (written by the one error writer's
    header and body functions, on a socket that has no ASGI cycle yet)."""
    error = REFUSALS[status]
    body = error_body(error)
    head = [b"HTTP/1.1 %d %s" % (status, REASONS[status]), b"connection: close"]
    head += [name + b": " + value for name, value in error_headers(error, body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A protocol class bound to `limits` (uvicorn instantiates it once per connection)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _limits = limits
        # Connections between requests or inside a request head, oldest first: the ones a new connection may evict.
        _waiting: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._tail = b""  # the last bytes of the previous read, for a head terminator split across reads
            self._timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float, status: int | None) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expire, status)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self, status: int | None) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if status is not None and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(refusal(status))
            self.transport.close()

        def _refuse(self, status: int) -> None:
            self._disarm()
            self._waiting.pop(self, None)
            self.transport.write(refusal(status))
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > self._limits.max_connections:
                if not self._waiting:
                    self._refuse(503)
                    return
                oldest, _ = self._waiting.popitem(last=False)
                oldest._refuse(408)
            self._waiting[self] = None
            self._arm(self._limits.head_timeout, 408)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._waiting.pop(self, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._in_head:
                # Count only up to the blank line that ends the head: the same read may carry body bytes.
                seen = self._tail + data
                end = seen.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = data[-3:]
                if self._head_bytes > self._limits.max_head_bytes:
                    self._refuse(431)
                    return
                if self._timer is None:  # the first bytes of a kept-alive connection's next request
                    self._arm(self._limits.head_timeout, 408)
            elif self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
                self._arm(self._limits.body_idle_timeout, None)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._waiting.pop(self, None)
            self._in_head = False
            self._head_bytes = 0
            self._tail = b""
            self._disarm()
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.more_body:
                self._arm(self._limits.body_idle_timeout, None)

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_head = True  # whatever arrives next is the next request's head
            self._waiting[self] = None
            super().on_message_complete()

    return GuardedHttpToolsProtocol
