"""ASGI type aliases and the one error writer: `send_error` on raw ASGI paths, `error_response` for FastAPI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.responses import Response

from gateway.errors import GatewayError, Unauthorized, error_body

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


def error_headers(error: GatewayError, body: bytes) -> list[tuple[bytes, bytes]]:
    headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    return headers


ErrorRenderer = Callable[[GatewayError], bytes]


async def send_error(
    send: Send,
    error: GatewayError,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    render: ErrorRenderer = error_body,
) -> None:
    """The error as the caller's API dialect writes it (`render`: OpenAI's envelope unless a dialect says)."""
    body = render(error)
    headers = error_headers(error, body) + list(extra_headers)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response(error: GatewayError) -> Response:
    body = error_body(error)
    headers = {k.decode(): v.decode() for k, v in error_headers(error, body) if k != b"content-length"}
    return Response(body, status_code=error.status, headers=headers)


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send`, adding `headers` to the response start (e.g. a handler's rate-limit headers)."""
    if not headers:
        return send

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)

    return sending
