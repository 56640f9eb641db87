"""Role "proxy": the retrieval, files and batches routes are forwarded, unchanged, to the retrieval service (the
tier that owns state).

The retrieval service owns the encoder and the index (one writer per collection), so any number of stateless
proxies can sit in front of it; a write through one proxy is visible to a search through another. The caller's
Authorization travels along: the retrieval service checks the key and derives the namespace itself.

The path goes on exactly as the client sent it (`raw_path`, never re-encoded from the decoded one), so the
retrieval service decodes it once, as it would for a direct call (a double-encoded item id names the same item
through both). A dot segment or an encoded slash is refused: forwarded, `/v1/collections/%2e%2e/...` would reach
routes this proxy does not exist to forward.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import unquote

import aiohttp
from starlette.routing import Route
from yarl import URL

from gateway.access.context import context_of
from gateway.asgi import Message, Receive, Send, send_error
from gateway.errors import GatewayError, InvalidRequest
from gateway.server.state import GatewayState
from gateway.upstream.errors import reaching_service

FORWARDED_HEADERS = (b"content-type", b"authorization", b"x-request-id")
PATHS = [
    "/v1/embeddings",
    "/v1/search",
    "/v1/collections",
    "/v1/collections/{rest:path}",
    "/v1/files",
    "/v1/files/{rest:path}",
    "/v1/batches",
    "/v1/batches/{rest:path}",
]
# Both ways in chunks: a batch's input file (up to batch.max_file_bytes) or output is never held whole here.
CHUNK = 256 * 1024


def forwardable_path(raw_path: bytes) -> str:
    """The path to send on, as received; refuses dot segments however they are percent-encoded."""
    path = raw_path.decode("ascii", "strict") if raw_path.isascii() else ""
    if not path.startswith("/v1/"):
        raise InvalidRequest("The request path is malformed.")
    for segment in path.split("/"):
        # Decoded once, as the retrieval service decodes it: what it would route on must hold no dot segment
        # and no slash that was not a slash here (`%2F..%2F` would become one there).
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise InvalidRequest("Dot segments and encoded slashes are not allowed in the request path.")
    return path


class RetrievalForwarder:
    """A raw ASGI endpoint (an instance, so Starlette does not wrap it as a request/response function)."""

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        gateway: GatewayState = scope["app"].state.gateway
        try:
            path = forwardable_path(scope.get("raw_path") or scope["path"].encode())
        except InvalidRequest as error:
            await send_error(send, error)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in FORWARDED_HEADERS}
        headers["x-request-id"] = context_of(scope).request_id
        target = f"{gateway.settings.retrieval_url}{path}"
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            with reaching_service("retrieval service"):
                await self._forward(gateway, scope["method"], URL(target, encoded=True), receive, headers, tracked)
        except GatewayError as error:
            if started:
                raise  # the answer is under way: the connection ends, the client sees a cut body
            await send_error(send, error)

    @staticmethod
    async def _forward(
        gateway: GatewayState, method: str, url: URL, receive: Receive, headers: dict[str, str], send: Send
    ) -> None:
        session = gateway.upstream.session
        timeout = aiohttp.ClientTimeout(total=gateway.settings.retrieval_timeout, sock_connect=5)
        async with session.request(method, url, data=_body(receive), headers=headers, timeout=timeout) as response:
            out = [(b"content-type", response.headers.get("Content-Type", "application/json").encode())]
            for name in ("Retry-After", "Content-Length"):
                if name in response.headers:
                    out.append((name.lower().encode(), response.headers[name].encode()))
            chunk = await response.content.read(CHUNK)
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            while True:
                following = await response.content.read(CHUNK) if chunk else b""
                await send({"type": "http.response.body", "body": chunk, "more_body": bool(following)})
                if not following:
                    return
                chunk = following


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


routes = [Route(path, RetrievalForwarder(), methods=["GET", "POST", "DELETE"]) for path in PATHS]
