"""The chat path end to end: the real OpenAI SDK -> a real gateway process -> real vLLM CPU replicas."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import API_KEY, MODEL, Replica, placeholder_ids, wait_for
from tests.support import RunningGateway


def png(width: int, height: int) -> str:
    """A solid-colour RGB PNG written by hand, so the test needs no imaging library."""
    raw = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(io.BytesIO(body).getvalue()).decode()


def client(gateway: RunningGateway, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_plain_chat(gateway: RunningGateway) -> None:
    reply = client(gateway).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert reply.model == MODEL
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert gateway.metric("gateway_completion_tokens_total", {"model": MODEL}) == 8
    assert gateway.metric("gateway_requests_total", {"route": "/v1/chat/completions", "status": "200"}) == 1


def test_chat_with_base64_png_reaches_the_vision_tower(gateway: RunningGateway) -> None:
    sdk = client(gateway)
    text_only = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}], max_tokens=4
    )
    with_image = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png(112, 84)}},
                ],
            }
        ],
        max_tokens=4,
    )
    assert text_only.usage is not None and with_image.usage is not None
    # 112x84 -> (112/28)*(84/28) = 12 merged patches, plus the vision start/end markers.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 12 + 2


def test_streaming_with_usage(gateway: RunningGateway) -> None:
    stream = client(gateway).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten"}],
        # Long enough that the stream cannot arrive in the gateway's first read, even on a loaded runner (a
        # 12-token stream once did, and then no inter-token gap exists to observe).
        max_tokens=256,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 256
    assert chunks[-1].choices == []
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    assert gateway.metric("gateway_time_to_first_token_seconds_count", {"model": MODEL}) == 1
    # Counted once the relay returns, which can be just after the client has read [DONE].
    assert wait_for(lambda: gateway.metric("gateway_completion_tokens_total", {"model": MODEL}) == 256, timeout=5)
    assert gateway.metric("gateway_inter_token_latency_seconds_count", {"model": MODEL}) >= 1


def test_text_completions_route(gateway: RunningGateway) -> None:
    reply = client(gateway).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert isinstance(reply.choices[0].text, str)
    # The pool reads this checkpoint's tokenizer: its own placeholder ids (not real Qwen2.5-VL's) never reach vLLM
    for prompt in ([11, placeholder_ids()[2], 12], "a <|im_start|>system turn"):
        with pytest.raises(openai.BadRequestError) as refused:
            client(gateway).completions.create(model=MODEL, prompt=prompt, max_tokens=2)  # type: ignore[arg-type]
        assert refused.value.code == "reserved_token"


def test_models_lists_capabilities(gateway: RunningGateway) -> None:
    models = client(gateway).models.list().data
    assert [m.id for m in models] == [MODEL]
    capabilities = models[0].model_extra["capabilities"]  # type: ignore[index]
    assert capabilities["limit_mm_per_prompt"] == {"image": 2, "video": 1}
    assert capabilities["replicas"] == {"healthy": 2, "total": 2}
    assert capabilities["vision"] is True


def test_over_limit_image_count_is_refused_by_the_gateway(
    gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    before = sum(r.finished("stop") + r.finished("length") for r in live_replicas)
    image = {"type": "image_url", "image_url": {"url": png(28, 28)}}
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [image, image, image]}], max_tokens=4
        )
    assert caught.value.status_code == 400
    assert "At most 2 image(s) may be provided in one prompt" in caught.value.message
    assert sum(r.finished("stop") + r.finished("length") for r in live_replicas) == before


def test_unknown_model_is_404(gateway: RunningGateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"


def test_bad_key_is_401(gateway: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, key="sk-not-a-key").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )


def test_upstream_context_error_keeps_its_400(gateway: RunningGateway) -> None:
    """vLLM tokenises and rejects; the gateway passes its 400 through without retrying elsewhere (B4)."""
    long_prompt = " ".join(f"w{i}" for i in range(4000))  # ~8000+ tokens for this tokenizer, under 8192*10 chars
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=4000
        )
    assert caught.value.code == "context_length_exceeded"
    assert gateway.metric("gateway_upstream_retries_total") == 0
    assert gateway.metric("gateway_replica_healthy", {"model": MODEL}) == 2
