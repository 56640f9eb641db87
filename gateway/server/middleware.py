"""One pure-ASGI layer in front of every route: request id, body-size cap, API key and its scope for the route,
process admission, the key's request budget, the request's trace span and its access-log line.

Pure ASGI (no BaseHTTPMiddleware) so a stream passes through untouched apart from one header on its start.
"""

from __future__ import annotations

import logging
import os
import re
import time

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.access.context import RequestContext, set_context
from gateway.access.keys import ANONYMOUS, KeyChecker
from gateway.access.scopes import EXACT, required_scope
from gateway.asgi import ASGIApp, ErrorRenderer, Message, Receive, Send, send_error
from gateway.errors import GatewayError, PayloadTooLarge, Unauthorized, error_body

REQUEST_ID_SAFE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
PROTECTED_PREFIX = "/v1/"
PROTECTED_OUTSIDE_V1 = frozenset({"/tokenize", "/detokenize"})  # vLLM's own paths for them, behind the same keys
KNOWN_PATHS = {path for _, path in EXACT}
SUBRESOURCES = {"items", "snapshot", "cancel", "content"}
access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")


UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries around an upload's file


def route_name(path: str) -> str:
    """A low-cardinality route for span names and logs: the fixed routes as they are, ids replaced elsewhere
    (/v1/collections/{id}/items/{id}, /v1/responses/{id}/cancel); an id holding slashes ends the name."""
    if path in KNOWN_PATHS:
        return path
    parts = path.split("/")
    named = parts[:3]
    for i, part in enumerate(parts[3:], start=3):
        if i % 2 == 1:
            named.append("{id}")
        elif part in SUBRESOURCES:
            named.append(part)
        else:
            break
    return "/".join(named)


class RandomIds:
    """128-bit random request ids as hex, from the OS's CSPRNG (a client must not guess another's id: vLLM keys
    its requests by it), read 256 ids at a time: one getrandom() call per id was ~2% of a proxied request."""

    BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * self.BATCH).hex().encode(), 0
        start = self._at
        self._at += 32
        return self._pool[start : start + 32]


_REQUEST_IDS = RandomIds()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds the gateway's limit of {limit} bytes.")


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        keys: KeyChecker,
        log_requests: bool = False,
        answer_errors: bool = False,
        render_error: ErrorRenderer = error_body,
        upload_bytes: int | None = None,
    ) -> None:
        """`answer_errors`: `app` is a raw endpoint with no error handling of its own, so an exception it raises
        before its response started is answered here (a 500 in OpenAI's shape) and logged, not re-raised."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        # POST /v1/files takes a batch's whole input file (streamed to disk, never held): its own cap.
        self.upload_bytes = upload_bytes or max_body_bytes
        self.keys = keys
        self.log_requests = log_requests
        self.answer_errors = answer_errors
        self.render_error = render_error  # the route's API dialect writes its errors (Anthropic's for /v1/messages)

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
            elif name == b"x-api-key" and authorization is None:  # Anthropic's SDKs send the key here
                authorization = b"Bearer " + value
        if request_id is None or not REQUEST_ID_SAFE.match(request_id):
            request_id = _REQUEST_IDS.next()
        request = request_id.decode()
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
                await send_error(send, too_large, extra_headers, render=self.render_error)

        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal started, status
            if too_large is not None and not started:
                await answer_too_large()
                return
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        limit = self.upload_bytes if scope["path"] == UPLOAD_PATH else self.max_body_bytes
        if content_length is not None and (not content_length.isdigit() or int(content_length) > limit):
            await send_error(send_with_id, _too_large(limit), render=self.render_error)
            return
        identity = ANONYMOUS
        protected = scope["path"].startswith(PROTECTED_PREFIX) or scope["path"] in PROTECTED_OUTSIDE_V1
        if self.keys.enabled and protected:
            found = self.keys.identify(authorization)
            if found is None:
                await send_error(send_with_id, Unauthorized(), render=self.render_error)
                return
            identity = found
        set_context(scope, RequestContext(request, identity))
        if not protected:
            await self.app(scope, receive, send_with_id)
            return
        gateway = scope["app"].state.gateway
        tracing = gateway.tracing
        began = time.perf_counter()
        route = route_name(scope["path"])
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

        with tracing.span(
            f"{scope['method']} {route}", kind=SpanKind.SERVER, parent=tracing.parent_from(scope["headers"])
        ) as span:
            if span is not None:
                span.set_attributes({"http.request.method": scope["method"], "http.route": route})
                span.set_attribute("gateway.request_id", request)
            try:
                try:
                    identity.require(required_scope(scope["method"], scope["path"]))
                    gateway.admission.check()
                    extra_headers += await gateway.limiter.admit(identity.key_id)
                except GatewayError as error:
                    await send_error(send_with_id, error, render=self.render_error)
                    return
                try:
                    await self.app(scope, capped_receive, send_with_id)
                except Exception as exc:
                    if isinstance(exc, PayloadTooLarge) and too_large is not None:
                        await answer_too_large()  # the cap, raised through a raw endpoint before it answered
                    elif not self.answer_errors:
                        raise
                    else:
                        log.exception("unhandled error")
                        if not started:
                            await send_error(send_with_id, GatewayError(), render=self.render_error)
                finally:
                    await gateway.limiter.leave(identity.key_id)
            finally:
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                if self.log_requests:
                    self._log(scope["method"], route, status, began, request, identity.key_id, span)

    @staticmethod
    def _log(
        method: str, route: str, status: int, began: float, request_id: str, key_id: str, span: Span | None
    ) -> None:
        trace_id = format(span.get_span_context().trace_id, "032x") if span is not None else None
        elapsed_ms = round((time.perf_counter() - began) * 1000, 1)
        access_log.info(
            "%s %s %d %.1fms",
            method,
            route,
            status,
            elapsed_ms,
            extra={
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": elapsed_ms,
                "request_id": request_id,
                "trace_id": trace_id,
                "key_id": key_id,
            },
        )
