"""The Messages dialect's pure parts: Anthropic's error envelope, image blocks as media, and the affinity key it
shares with the OpenAI dialects. (The `anthropic` SDK against real vLLM: tests/e2e/test_messages_vllm.py.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.chat.checks import media_parts, parse_request
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.serving import routing_key
from gateway.errors import GatewayError, InvalidRequest, RateLimited, ServiceUnavailable, Unauthorized
from gateway.media.images import PreparedMedia
from gateway.messages.errors import anthropic_error_body, anthropic_stream_error
from gateway.messages.protocol import MessagesRequest
from gateway.messages.serving import MessagesDialect

DIALECT = MessagesDialect(MessagesRequest)
PHOTO = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidRequest("bad", param="max_tokens"), 400, "invalid_request_error"),
        (Unauthorized(), 401, "authentication_error"),
        (RateLimited("slow down"), 429, "rate_limit_error"),
        (ServiceUnavailable("busy"), 503, "overloaded_error"),
        (GatewayError(), 500, "api_error"),
    ],
)
def test_errors_are_anthropics_envelope(error: GatewayError, status: int, kind: str) -> None:
    body = orjson.loads(anthropic_error_body(error))
    assert error.status == status
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    if error.param:
        assert error.param in body["error"]["message"]
    event = anthropic_stream_error(error, b"")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")


def _messages(content: list[dict[str, Any]]) -> tuple[dict[str, Any], MessagesRequest]:
    body = {
        "model": "m",
        "max_tokens": 8,
        "system": "You describe photos.",
        "messages": [{"role": "user", "content": content}],
    }
    return parse_request(orjson.dumps(body), MessagesRequest)


def test_image_blocks_are_media_and_come_back_as_base64_blocks() -> None:
    data, request = _messages(
        [
            {"type": "text", "text": "what?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        ]
    )
    media = DIALECT.media(request)
    assert [(m.part.url, m.part.param) for m in media] == [
        (PHOTO, "messages[0].content[1]"),
        ("https://example.com/a.jpg", "messages[0].content[2]"),
    ]
    prepared = [PreparedMedia("data:image/jpeg;base64,QUJD", "a" * 64, 28, 28, 1, 10)] * 2
    DIALECT.replace_media(data, media, prepared)
    assert data["messages"][0]["content"][2] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"},
    }


def test_a_conversation_keys_alike_in_both_dialects() -> None:
    _, anthropic_request = _messages(
        [
            {"type": "text", "text": "Describe"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        ]
    )
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You describe photos."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": PHOTO}}],
            },
        ],
    }
    _, chat_request = parse_request(orjson.dumps(chat), ChatCompletionRequest)
    prepared = [PreparedMedia("data:image/jpeg;base64,QUJD", "b" * 64, 28, 28, 1, 10)]
    ours = DIALECT.routing_key(anthropic_request, "ns", None, DIALECT.media(anthropic_request), prepared)
    theirs = routing_key(chat_request, "ns", None, media_parts(chat_request), prepared)
    assert ours == theirs
    other = [PreparedMedia("data:image/jpeg;base64,QUJD", "c" * 64, 28, 28, 1, 10)]
    assert DIALECT.routing_key(anthropic_request, "ns", None, DIALECT.media(anthropic_request), other) != ours


@pytest.mark.parametrize(
    "content",
    [
        [
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "image", "source": {"type": "url", "url": "x"}}],
            }
        ],
        [{"type": "image", "source": {"type": "base64", "media_type": "image/svg+xml", "data": "AA=="}}],
        [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
        [{"type": "text", "text": "hi", "unknown": 1}],
    ],
)
def test_shapes_that_would_bypass_the_checks_are_refused(content: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequest):
        _messages(content)
