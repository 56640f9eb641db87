from __future__ import annotations

import orjson
import pytest

from gateway.access.keys import KeyChecker
from gateway.config import load_settings
from gateway.errors import (
    ContextLengthExceeded,
    PermissionDenied,
    RateLimited,
    UpstreamError,
    error_body,
    error_for_status,
    sse_error_frame,
)


def test_key_checker_accepts_only_configured_keys() -> None:
    checker = KeyChecker(load_settings(api_keys=["sk-alpha", "sk-beta"]))
    assert checker.enabled
    alpha = checker.identify(b"Bearer sk-alpha")
    assert alpha is not None and len(alpha.key_id) == 12 and "sk-alpha" not in alpha.key_id
    assert alpha.namespace == alpha.key_id and alpha.scopes == {"read", "write", "admin", "operator"}
    beta = checker.identify(b"bearer sk-beta")
    assert beta is not None and beta.key_id != alpha.key_id
    for header in (None, b"", b"Bearer", b"Bearer sk-gamma", b"Basic sk-alpha", b"sk-alpha"):
        assert checker.identify(header) is None


def test_no_keys_means_auth_disabled() -> None:
    assert not KeyChecker(load_settings()).enabled


def test_error_bodies_have_the_openai_shape() -> None:
    body = orjson.loads(error_body(ContextLengthExceeded("too long", param="messages")))
    assert body == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


def test_sse_error_frame_ends_the_stream() -> None:
    frame = sse_error_frame(UpstreamError())
    event, done, tail = frame.split(b"\n\n")
    assert orjson.loads(event.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    assert done == b"data: [DONE]" and tail == b""


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (429, "rate_limit_error"),
        (418, "invalid_request_error"),
        (599, "internal_error"),
    ],
)
def test_error_for_status_keeps_the_status(status: int, kind: str) -> None:
    error = error_for_status(status, "m")
    assert error.status == status and error.type == kind and error.message == "m"


def test_errors_carry_headers_without_sharing_them() -> None:
    limited = RateLimited("slow down", headers={"Retry-After": "3"})
    assert limited.headers == {"Retry-After": "3"}
    assert RateLimited().headers == {}


def test_scoped_keys_carry_scopes_and_namespace() -> None:
    settings = load_settings(
        keys=[
            {"key": "sk-reader", "scopes": ["read"], "namespace": "team-a"},
            {"key": "sk-writer", "scopes": ["read", "write"], "namespace": "team-a"},
        ]
    )
    assert "sk-reader" not in settings.model_dump_json()
    checker = KeyChecker(settings)
    reader, writer = checker.identify(b"Bearer sk-reader"), checker.identify(b"Bearer sk-writer")
    assert reader is not None and writer is not None
    assert reader.namespace == writer.namespace == "team-a"
    reader.require("read")
    with pytest.raises(PermissionDenied):
        reader.require("write")
    writer.require("write")
