"""The Messages dialect's error table and writer: Anthropic's envelope, so the `anthropic` SDK raises its own
exception classes (it picks them by status; the type names the class of failure to a reader).

    {"type": "error", "error": {"type": "invalid_request_error", "message": "..."}}

The status stays the gateway's own (a 503 is an `overloaded_error`, a 504 an `api_error`); the message is the
same sentence the OpenAI dialects send, naming the field when there is one. A stream the replica broke off ends
with Anthropic's `event: error`.
"""

from __future__ import annotations

import orjson

from gateway.errors import GatewayError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(error: GatewayError) -> bytes:
    message = error.message if error.param is None else f"{error.message} ({error.param})"
    kind = TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def anthropic_stream_error(error: GatewayError, tail: bytes) -> bytes:
    return b"event: error\ndata: " + anthropic_error_body(error) + b"\n\n"
