"""The one error table: every failure the gateway reports, its HTTP status and its OpenAI error body.

Handlers raise these; exactly one place (`error_body` / `sse_error_frame`) turns them into bytes. Messages are
written for clients: an exception's text or an upstream's internals never reach one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = "internal_error"
    message: str = "The gateway failed to handle the request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        super().__init__(self.message)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code: str | None = "invalid_api_key"
    message = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code: str | None = "insufficient_scope"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code: str | None = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code: str | None = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code: str | None = "payload_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code: str | None = "request_timeout"
    message = "The request did not arrive in time."


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code: str | None = "headers_too_large"
    message = "The request line and headers are too large."


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code: str | None = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The replica answered with something unusable (5xx, broken stream)."""

    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"
    message = "The model server failed to answer the request."


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code: str | None = "service_unavailable"
    message = "No model server is available to answer the request."


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code: str | None = "upstream_timeout"
    message = "The model server did not answer in time."


# Media (the gateway fetches and checks images/videos before any replica sees them).
class MediaUrlRefused(InvalidRequest):
    code = "media_url_refused"


class MediaFetchFailed(InvalidRequest):
    code = "media_fetch_failed"


class ImageRefused(InvalidRequest):
    code = "invalid_image"


class VideoRefused(InvalidRequest):
    code = "invalid_video"


class MediaTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code: str | None = "media_too_large"


class MediaFetchTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code: str | None = "media_fetch_timeout"


# Search collections.
class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code: str | None = "conflict"


class StorageFailed(GatewayError):
    status = 507
    type = "storage_error"
    code: str | None = "index_storage_failed"
    message = "The index could not be written durably; nothing was acknowledged. Retry later."


class IndexUnavailable(ServiceUnavailable):
    """The vector database (Milvus) did not answer or refused: nothing was acknowledged."""

    code: str | None = "index_unavailable"
    message = "The vector database is unavailable; nothing was acknowledged. Retry shortly."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


STATUS_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    429: RateLimited,
    502: UpstreamError,
    503: ServiceUnavailable,
    504: UpstreamTimeout,
}


def error_for_status(status: int, message: str | None = None) -> GatewayError:
    """An error of the right class for an HTTP status (e.g. Starlette's 404/405, an upstream's 4xx)."""
    cls = STATUS_ERRORS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else GatewayError
    error = cls(message)
    error.status = status
    return error


def error_payload(error: GatewayError) -> dict[str, object]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_body(error: GatewayError) -> bytes:
    return orjson.dumps(error_payload(error))


def sse_error_frame(error: GatewayError) -> bytes:
    """After the first byte of a stream the status is sent; the error travels as an event, then the terminator."""
    return b"data: " + error_body(error) + b"\n\ndata: [DONE]\n\n"


# Pydantic inserts these labels into an error's location for union branches; they are not request fields.
UNION_BRANCH_LABELS = ("str", "int", "float", "bool", "dict", "list", "none")
# FastAPI prefixes a location with where the value came from; only that first segment is dropped.
REQUEST_SOURCES = ("body", "query", "path", "header", "cookie")


def _param_from_loc(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content[2].image_url` from pydantic's location, minus the union-branch labels it inserts."""
    path = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in UNION_BRANCH_LABELS or "[" in part or part.startswith(("function-", "literal", "constrained-")):
            continue
        elif part != previous:  # a tagged union repeats its tag ("image_url") before the field of that name
            path += f".{part}" if path else part
        previous = part
    return path


def validation_error(errors: Iterable[Mapping[str, Any]], *, located_by_source: bool = False) -> InvalidRequest:
    """The one mapping from pydantic's errors to a 400: the deepest error (with unions pydantic reports one per
    branch; the deepest names the real culprit), its field path as `param`, its message without pydantic's
    "Value error, " prefix. `located_by_source`: FastAPI's locations start with "body"/"query"/..., dropped."""
    found = [dict(error) for error in errors]
    if not found:
        return InvalidRequest("The request is invalid.")
    for error in found:
        loc = tuple(error.get("loc", ()))
        if located_by_source and loc and loc[0] in REQUEST_SOURCES:
            loc = loc[1:]
        error["loc"] = loc
    deepest = max(found, key=lambda error: len(error["loc"]))
    param = _param_from_loc(deepest["loc"])
    message = str(deepest.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param or None)
