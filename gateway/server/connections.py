"""uvicorn's httptools protocol with the limits a public listener needs, enforced before any app code runs.

- The request line and headers are capped in bytes (`max_head_bytes`) while they arrive: 431 and close, before
  the parser buffers them.
- They must arrive within `head_timeout` (a connection that sends nothing, or dribbles its headers, is answered
  408 and closed). A body may not pause longer than `body_idle_timeout` between chunks, and must keep up at least
  `min_body_rate` bytes a second over every window of `BODY_RATE_WINDOW` seconds (or finish within the window
  when less is left): a body trickled a byte at a time is cut (the connection is closed; the app sees a
  disconnect).
- A request answered before its body arrived whole (a 401, a refusal, `/health/live`) closes its connection a
  moment (`LINGER`) after the answer is written, rather than reading the rest of the body at the client's pace.
- A connection whose request is being answered is never evicted; one idle between requests is.
- At most `max_connections` connections are open at once. At the cap a new connection evicts the oldest one
  still waiting for (or dribbling) its request head, else the oldest one still sending a body, so neither idle
  nor trickling connections can keep a probe of `/health/live` out; only when every connection holds a whole
  request being answered is the new one answered 503 and closed. File descriptors therefore never run out for
  the replica connections and health checks.
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


BODY_RATE_WINDOW = 5.0
LINGER = 1.0  # an answered connection still sent a body: read and dropped this long, then closed


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int
    head_timeout: float
    body_idle_timeout: float
    max_connections: int
    min_body_rate: int = 4096


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
        # Connections between requests or inside a request head, oldest first: the ones a new connection evicts
        # first; then those still sending a request body.
        _waiting: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()
        _uploading: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._tail = b""  # the last bytes of the previous read, for a head terminator split across reads
            self._timer: asyncio.TimerHandle | None = None
            self._rate_timer: asyncio.TimerHandle | None = None
            self._body_left: int | None = None  # bytes the body still owes (content-length), None if chunked
            self._window_bytes = 0
            self._lingering = False

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
            self._end_upload()
            self._waiting.pop(self, None)
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(refusal(status))
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > self._limits.max_connections:
                evictable = self._waiting or self._uploading
                if not evictable:
                    self._refuse(503)
                    return
                oldest, _ = evictable.popitem(last=False)
                oldest._refuse(408)
            self._waiting[self] = None
            self._arm(self._limits.head_timeout, 408)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._end_upload()
            self._waiting.pop(self, None)
            super().connection_lost(exc)

        def _start_upload(self) -> None:
            self._uploading[self] = None
            declared = next((value for name, value in self.headers if name == b"content-length"), None)
            self._body_left = int(declared) if declared is not None and declared.isdigit() else None
            self._window_bytes = 0
            self._rate_timer = self.loop.call_later(BODY_RATE_WINDOW, self._check_rate)

        def _end_upload(self) -> None:
            self._uploading.pop(self, None)
            if self._rate_timer is not None:
                self._rate_timer.cancel()
                self._rate_timer = None

        def _check_rate(self) -> None:
            """Once a window: the body kept up the minimum rate, or finished what it owed, or the connection goes."""
            self._rate_timer = None
            if self.transport.is_closing() or self not in self._uploading:
                return
            owed = int(self._limits.min_body_rate * BODY_RATE_WINDOW)
            if self._body_left is not None:
                owed = min(owed, self._body_left)
            if self._window_bytes < owed:
                self._refuse(408)
                return
            if self._body_left is not None:
                self._body_left -= self._window_bytes
            self._window_bytes = 0
            self._rate_timer = self.loop.call_later(BODY_RATE_WINDOW, self._check_rate)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._lingering:
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
                self._window_bytes += len(data)
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
                self._start_upload()
                self._say_close_if_answered_early(self.cycle)

        def _say_close_if_answered_early(self, cycle: Any) -> None:
            """An answer that starts before its request's body arrived whole says `connection: close`, so the
            client opens a new connection for its next request (this one lingers, then closes; see
            on_response_complete). uvicorn would close at once on that header: its keep-alive flag is restored
            once the header is out."""
            send = cycle.send

            async def sending(message: Any) -> None:
                if message["type"] != "http.response.start" or self._in_head:
                    await send(message)
                    return
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message["headers"] = [*headers, (b"connection", b"close")]
                await send(message)
                cycle.keep_alive = True

            cycle.send = sending

        def on_message_complete(self) -> None:
            self._disarm()
            self._end_upload()
            self._in_head = True  # whatever arrives next is the next request's head
            if self.cycle is None or self.cycle.response_complete:
                self._waiting[self] = None  # already answered: idle until its next request
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._in_head:
                self._waiting[self] = None  # idle between requests: the first a newcomer at the cap may evict
                return
            # Answered before its body arrived whole: what the client still sends is read and dropped for LINGER
            # seconds, so it can finish writing and read the answer (closing at once may reset the connection
            # under it), then the connection closes instead of reading on at the client's pace.
            self._end_upload()
            self._lingering = True
            self._uploading[self] = None  # evictable meanwhile
            self._arm(LINGER, None)

    return GuardedHttpToolsProtocol
