"""One pure-ASGI layer in front of every route: request id, body-size cap, API key and its scope for the route,
process admission and the key's request budget.

Pure ASGI (no BaseHTTPMiddleware) so a stream passes through untouched apart from one header on its start.
"""

from __future__ import annotations

import os
import re

from gateway.access.keys import ANONYMOUS, KeyChecker
from gateway.access.scopes import required_scope
from gateway.asgi import ASGIApp, Message, Receive, Send, send_error
from gateway.errors import GatewayError, PayloadTooLarge, Unauthorized

REQUEST_ID_SAFE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
PROTECTED_PREFIX = "/v1/"


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds the gateway's limit of {limit} bytes.")


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, keys: KeyChecker) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keys = keys

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = content_length = authorization = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"content-length":
                content_length = value
            elif name == b"authorization":
                authorization = value
        if request_id is None or not REQUEST_ID_SAFE.match(request_id):
            request_id = os.urandom(16).hex().encode()  # as random as uuid4, at a fraction of its cost
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        id_header = (b"x-request-id", request_id)

        extra_headers = [id_header]
        # Set when the body outgrew the cap: whatever answer the route then tries (FastAPI turns the error raised
        # inside its body read into a 400) is replaced by the 413, once.
        too_large: PayloadTooLarge | None = None
        started = replaced = False

        async def answer_too_large() -> None:
            nonlocal replaced
            if too_large is not None and not started and not replaced:
                replaced = True
                await send_error(send, too_large, extra_headers)

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if too_large is not None and not started:
                await answer_too_large()
                return
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        limit = self.max_body_bytes
        if content_length is not None and (not content_length.isdigit() or int(content_length) > limit):
            await send_error(send_with_id, _too_large(limit))
            return
        identity = ANONYMOUS
        protected = scope["path"].startswith(PROTECTED_PREFIX)
        if self.keys.enabled and protected:
            found = self.keys.identify(authorization)
            if found is None:
                await send_error(send_with_id, Unauthorized())
                return
            identity = found
        state["identity"] = identity
        if not protected:
            await self.app(scope, receive, send_with_id)
            return
        gateway = scope["app"].state.gateway
        try:
            identity.require(required_scope(scope["method"], scope["path"]))
            gateway.admission.check()
            extra_headers += await gateway.limiter.admit(identity.key_id)
        except GatewayError as error:
            await send_error(send_with_id, error)
            return

        received = 0

        async def capped_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = _too_large(limit)
                    raise too_large
            return message

        try:
            await self.app(scope, capped_receive, send_with_id)
        except PayloadTooLarge:  # raised through a raw endpoint before it answered
            if too_large is None:
                raise
            await answer_too_large()
        finally:
            await gateway.limiter.leave(identity.key_id)
