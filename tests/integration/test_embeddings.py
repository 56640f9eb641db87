"""/v1/embeddings through a real gateway process with the built-in tiny CLIP, driven by the OpenAI SDK."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from gateway.embeddings.encoder import OpenClipEncoder
from gateway.media.images import decode_image
from gateway.retrieval_settings import EmbeddingsSettings
from tests.media_server import png_bytes
from tests.support import RunningGateway, run_gateway, write_config

MODEL = "clip-tiny-random"


@pytest.fixture(scope="module")
def encoder() -> OpenClipEncoder:
    """The same seeded tiny CLIP the gateway builds, called directly in this process."""
    return OpenClipEncoder(EmbeddingsSettings(clip_model="tiny-random"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[RunningGateway]:
    config = write_config(
        tmp_path_factory.mktemp("emb") / "g.yaml",
        [],
        embeddings={"clip_model": "tiny-random", "max_queue": 64, "max_batch": 32, "max_wait_ms": 5},
    )
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        yield running


def sdk(gateway: RunningGateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def image_url(width: int, height: int, colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, colour)).decode()


def test_text_matches_a_direct_encoder_call_in_both_formats(gateway: RunningGateway, encoder: OpenClipEncoder) -> None:
    texts = ["a photo of a cat", "a diagram of a gateway", "émoji 🚀 and ünïcode"]
    direct = encoder.encode_text(encoder.tokenize(texts))
    via_base64 = sdk(gateway).embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 by default
    via_float = sdk(gateway).embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for reply in (via_base64, via_float):
        assert [d.index for d in reply.data] == [0, 1, 2]
        for row, item in zip(direct, reply.data, strict=True):
            assert cosine(row, np.array(item.embedding)) >= 0.9999
            assert abs(np.linalg.norm(item.embedding) - 1) < 1e-5
    assert via_base64.usage.prompt_tokens == sum(int((t != 0).sum()) for t in encoder.tokenize(texts))


def test_images_and_mixed_inputs_share_the_space(gateway: RunningGateway, encoder: OpenClipEncoder) -> None:
    red, blue = image_url(120, 90, (220, 10, 10)), image_url(64, 64, (10, 10, 220))
    inputs = [
        "a red square",
        {"type": "image_url", "image_url": {"url": red}},
        {"type": "text", "text": "a blue square"},
        {"type": "image_url", "image_url": {"url": blue}},
    ]
    reply = sdk(gateway).embeddings.create(model=MODEL, input=inputs, encoding_format="float")  # type: ignore[arg-type]
    expected = [
        encoder.encode_text(encoder.tokenize(["a red square"]))[0],
        encoder.encode_image(
            [
                encoder.preprocess(
                    decode_image(
                        png_bytes(120, 90, (220, 10, 10)), max_decode_pixels=10**8, formats=("PNG",), param="p"
                    )
                )
            ]
        )[0],
        encoder.encode_text(encoder.tokenize(["a blue square"]))[0],
        encoder.encode_image(
            [
                encoder.preprocess(
                    decode_image(png_bytes(64, 64, (10, 10, 220)), max_decode_pixels=10**8, formats=("PNG",), param="p")
                )
            ]
        )[0],
    ]
    for want, got in zip(expected, reply.data, strict=True):
        assert cosine(want, np.array(got.embedding)) >= 0.9999
    text_tokens = sum(int((t != 0).sum()) for t in encoder.tokenize(["a red square", "a blue square"]))
    assert reply.usage.prompt_tokens == text_tokens + 2 * encoder.image_tokens


def test_dimensions_truncate_and_renormalise(gateway: RunningGateway, encoder: OpenClipEncoder) -> None:
    full = encoder.encode_text(encoder.tokenize(["short"]))[0]
    reply = sdk(gateway).embeddings.create(model=MODEL, input="short", dimensions=16)
    vector = np.array(reply.data[0].embedding)
    assert vector.shape == (16,)
    assert cosine(vector, full[:16]) >= 0.9999 and abs(np.linalg.norm(vector) - 1) < 1e-5
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).embeddings.create(model=MODEL, input="short", dimensions=65)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]


def test_text_beyond_clips_context_is_truncated(gateway: RunningGateway) -> None:
    shared = " ".join(f"word{i}" for i in range(200))
    reply = sdk(gateway).embeddings.create(model=MODEL, input=[shared + " cats", shared + " dogs"])
    a, b = (np.array(d.embedding) for d in reply.data)
    assert cosine(a, b) >= 0.9999, "only the first 77 tokens are read; the differing tails are cut"


def test_token_arrays_are_clip_ids(gateway: RunningGateway, encoder: OpenClipEncoder) -> None:
    ids = [int(t) for t in encoder.tokenize(["hello world"])[0] if t != 0]
    reply = sdk(gateway).embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    direct = encoder.encode_text(encoder.tokenize(["hello world"]))[0]
    assert cosine(direct, np.array(reply.data[0].embedding)) >= 0.9999
    with pytest.raises(openai.BadRequestError):
        sdk(gateway).embeddings.create(model=MODEL, input=[[49406, 10**6, 49407]])


async def test_64_concurrent_callers_get_exactly_their_own_vectors(
    gateway: RunningGateway, encoder: OpenClipEncoder
) -> None:
    client = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    texts = [f"caller number {i} asks about topic {i * 7919 % 101}" for i in range(64)]
    batches_before = gateway.metric("gateway_embedding_batch_size_count", {"modality": "text"})
    replies = await asyncio.gather(*[client.embeddings.create(model=MODEL, input=t) for t in texts])
    direct = encoder.encode_text(encoder.tokenize(texts))
    for i, reply in enumerate(replies):
        got = np.array(reply.data[0].embedding)
        assert cosine(direct[i], got) >= 0.9999
        others = [cosine(direct[j], got) for j in range(64) if j != i]
        assert max(others) < cosine(direct[i], got)
    batches = gateway.metric("gateway_embedding_batch_size_count", {"modality": "text"}) - batches_before
    assert batches < 64, "callers were merged into shared forward passes"


def test_input_caps(gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as many:
        sdk(gateway).embeddings.create(model=MODEL, input=["x"] * 50_000)
    assert many.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:
        sdk(gateway).embeddings.create(model=MODEL, input=["y" * 1_000_000])
    assert long.value.body["param"] == "input[0]"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk(gateway).embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError):
        sdk(gateway).embeddings.create(model=MODEL, input=[])


def test_images_obey_the_media_rules(gateway: RunningGateway) -> None:
    for url, code, says in (
        ("http://127.0.0.1:1/x.png", "media_url_refused", "private or reserved address"),
        ("file:///etc/passwd", "media_url_refused", "must use http or https"),
        ("data:image/png;base64,aGVsbG8=", "invalid_image", "image"),
    ):
        response = httpx.post(
            f"{gateway.base_url}/v1/embeddings",
            content=orjson.dumps({"model": MODEL, "input": [{"type": "image_url", "image_url": {"url": url}}]}),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert says in error["message"], error
        assert {k: error[k] for k in ("type", "param", "code")} == {
            "type": "invalid_request_error",
            "param": "input[0].image_url",
            "code": code,
        }


async def test_full_queue_answers_429_with_retry_after_and_nothing_breaks(gateway: RunningGateway) -> None:
    body = orjson.dumps({"model": MODEL, "input": [f"flood {i}" for i in range(40)]})
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:
        responses = await asyncio.gather(
            *[
                client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
                for _ in range(24)
            ]
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert sdk(gateway).embeddings.create(model=MODEL, input="after the flood").data


def test_models_and_readiness_list_the_encoder(gateway: RunningGateway) -> None:
    card = next(m for m in sdk(gateway).models.list().data if m.id == MODEL)
    assert card.model_extra["capabilities"]["dimensions"] == 64  # type: ignore[index]
    assert MODEL in httpx.get(f"{gateway.base_url}/health/ready").json()["servable_models"]


async def test_one_callers_long_texts_do_not_hold_up_anothers_word(
    tmp_path: Path, log_dir: Path, encoder: OpenClipEncoder
) -> None:
    """600 texts of 8,000 characters are cut to what CLIP reads and tokenised a chunk at a time, so a one-word
    request sent after them is answered first; the long texts embed as their first 77 tokens."""
    config = write_config(tmp_path / "g.yaml", [], embeddings={"clip_model": "tiny-random"})
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        texts = [f"{i}" + "x" * 8_000 for i in range(600)]  # single long words: BPE's slowest case
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=running.base_url, timeout=120) as client:

            async def call(name: str, inputs: list[str]) -> httpx.Response:
                response = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": "float"}
                )
                finished.append(name)
                return response

            big = asyncio.create_task(call("big", texts))
            await asyncio.sleep(0.3)
            small = await call("small", ["cat"])
            big_response = await big
        assert small.status_code == 200 and big_response.status_code == 200, big_response.text
        assert finished == ["small", "big"]
        vectors = np.array([row["embedding"] for row in big_response.json()["data"][:2]], np.float32)
        direct = encoder.encode_text(encoder.tokenize(texts[:2]))
        assert all(cosine(a, b) > 0.9999 for a, b in zip(vectors, direct, strict=True))


def test_remote_image_urls_per_request_are_capped(gateway: RunningGateway) -> None:
    parts = [{"type": "image_url", "image_url": {"url": f"http://images.example/{i}.png"}} for i in range(17)]
    response = httpx.post(f"{gateway.base_url}/v1/embeddings", json={"model": MODEL, "input": parts})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input[16].image_url"
    assert "At most 16 remote image URLs" in response.json()["error"]["message"]
