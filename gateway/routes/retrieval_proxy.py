"""Role "proxy": the retrieval routes are forwarded, unchanged, to the retrieval service.

The retrieval service owns the encoder and the index (one writer per collection), so any number of stateless
proxies can sit in front of it; a write through one proxy is visible to a search through another. The caller's
Authorization travels along: the retrieval service checks the key and derives the namespace itself.
"""

from __future__ import annotations

import aiohttp
from starlette.routing import Route

from gateway.asgi import Message, Receive, Send, read_body, send_error
from gateway.errors import ServiceUnavailable, UpstreamTimeout
from gateway.state import GatewayState

FORWARDED_HEADERS = (b"content-type", b"authorization", b"x-request-id")
PATHS = ["/v1/embeddings", "/v1/search", "/v1/collections", "/v1/collections/{rest:path}"]


class RetrievalForwarder:
    """A raw ASGI endpoint (an instance, so Starlette does not wrap it as a request/response function)."""

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        gateway: GatewayState = scope["app"].state.gateway
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in FORWARDED_HEADERS}
        headers["x-request-id"] = scope["state"]["request_id"]
        url = f"{gateway.settings.retrieval_url}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode()
        try:
            async with gateway.upstream.session.request(
                scope["method"],
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=300, sock_connect=5),
            ) as response:
                payload = await response.read()
                out = [(b"content-type", response.headers.get("Content-Type", "application/json").encode())]
                if "Retry-After" in response.headers:
                    out.append((b"retry-after", response.headers["Retry-After"].encode()))
                await send({"type": "http.response.start", "status": response.status, "headers": out})
                await send({"type": "http.response.body", "body": payload, "more_body": False})
        except TimeoutError:
            await send_error(send, UpstreamTimeout("The retrieval service did not answer in time."))
        except aiohttp.ClientError:
            await send_error(
                send, ServiceUnavailable("The retrieval service is unreachable.", headers={"Retry-After": "1"})
            )


routes = [Route(path, RetrievalForwarder(), methods=["GET", "POST", "DELETE"]) for path in PATHS]
