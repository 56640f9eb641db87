"""Anthropic's Messages API through the gateway, driven by the `anthropic` SDK against two real vLLM replicas
(CASES G9): text, image blocks (base64, and a URL the gateway fetches), a stream, count_tokens, a refused loopback
URL, a wrong key, a key's budget, and one conversation on one replica whichever dialect carries it."""

from __future__ import annotations

import base64
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from tests.e2e.conftest import API_KEY, MODEL, Replica, gateway_args
from tests.e2e.test_affinity_vllm import _photo, _served, _which
from tests.e2e.test_chat_vllm import client as openai_client
from tests.media_server import png_bytes
from tests.support import RunningGateway, run_gateway

BUDGETED = "sk-messages-budget"
SYSTEM = "You describe photos."


class _Images(SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Images.hits.append(self.path)
        super().do_GET()

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def image_host(tmp_path: Path) -> Iterator[tuple[str, int]]:
    root = tmp_path / "images"
    root.mkdir()
    (root / "photo.png").write_bytes(png_bytes(320, 240))
    _Images.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Images, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    server.shutdown()


@pytest.fixture
def gateway(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica], image_host: tuple[str, int]
) -> Iterator[RunningGateway]:
    args = gateway_args(tmp_path, live_replicas)
    config = Path(args[1])
    data = yaml.safe_load(config.read_text())
    data["media"] = {"trusted_hosts": [f"127.0.0.1:{image_host[1]}"]}  # the image host's port, and no other
    data["keys"] = [{"key": BUDGETED, "rate_limits": {"requests_per_minute": 2}}]
    config.write_text(yaml.safe_dump(data))
    with run_gateway(args, log_dir) as running:
        yield running


def _sdk(gateway: RunningGateway, key: str = API_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)


def _image_block(data_url: str) -> dict[str, Any]:
    media_type, _, data = data_url.removeprefix("data:").partition(";base64,")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def test_the_anthropic_sdk_through_the_gateway(
    gateway: RunningGateway, live_replicas: list[Replica], image_host: tuple[str, int]
) -> None:
    sdk = _sdk(gateway)
    hello = [{"role": "user", "content": "Hello there"}]
    text = sdk.messages.create(model=MODEL, max_tokens=8, messages=hello)  # type: ignore[arg-type]
    assert text.type == "message" and text.role == "assistant"
    assert text.usage.input_tokens > 0 and 1 <= text.usage.output_tokens <= 8
    counted = sdk.messages.count_tokens(model=MODEL, messages=hello)  # type: ignore[arg-type]
    assert counted.input_tokens == text.usage.input_tokens

    photo = "data:image/png;base64," + base64.b64encode(png_bytes(112, 84)).decode()
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, _image_block(photo)]}]
    seen = sdk.messages.create(model=MODEL, max_tokens=4, messages=with_image)  # type: ignore[arg-type]
    assert seen.usage.input_tokens > text.usage.input_tokens, "the image's visual tokens reached vLLM"

    url, _ = image_host
    by_url = [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": f"{url}/photo.png"}}]}]
    assert sdk.messages.create(model=MODEL, max_tokens=4, messages=by_url).usage.input_tokens > 0  # type: ignore[arg-type]
    assert _Images.hits == ["/photo.png"], "fetched once, by the gateway (vLLM got base64)"

    with sdk.messages.stream(model=MODEL, max_tokens=6, messages=hello) as stream:  # type: ignore[arg-type]
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert final.usage.output_tokens >= 1

    loopback = f"http://127.0.0.1:{live_replicas[0].port}/metrics"  # vLLM's own metrics: a classic SSRF target
    refused = [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": loopback}}]}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk.messages.create(model=MODEL, max_tokens=4, messages=refused)  # type: ignore[arg-type]
    body: Any = bad.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in body["error"]["message"]

    with pytest.raises(anthropic.AuthenticationError):
        _sdk(gateway, "sk-not-a-key").messages.create(model=MODEL, max_tokens=4, messages=hello)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="no-such-model", max_tokens=4, messages=hello)  # type: ignore[arg-type]

    budgeted = _sdk(gateway, BUDGETED)
    for _ in range(2):
        budgeted.messages.create(model=MODEL, max_tokens=2, messages=hello)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):
        budgeted.messages.create(model=MODEL, max_tokens=2, messages=hello)  # type: ignore[arg-type]
    # text, base64 image, URL image, stream, two budgeted (count_tokens has its own route)
    assert gateway.metric("gateway_requests_total", {"route": "/v1/messages", "status": "200"}) == 6
    assert gateway.metric("gateway_requests_total", {"route": "/v1/messages/count_tokens", "status": "200"}) == 1

    # vLLM's prompt sizing, through the same keys (Authorization here; the SDK's x-api-key works too)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    sized = httpx.post(f"{gateway.base_url}/tokenize", json={"model": MODEL, "messages": hello}, headers=auth)
    assert sized.status_code == 200 and sized.json()["count"] == text.usage.input_tokens
    tokens = httpx.post(f"{gateway.base_url}/tokenize", json={"model": MODEL, "prompt": "a red car"}, headers=auth)
    back = httpx.post(
        f"{gateway.base_url}/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]}, headers=auth
    )
    assert back.status_code == 200 and back.json()["prompt"] == "a red car"
    assert httpx.post(f"{gateway.base_url}/tokenize", json={"model": MODEL, "prompt": "x"}).status_code == 401


def test_one_conversation_lands_on_one_replica_in_either_dialect(
    gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    """The same system prompt, words and photo, sent as an OpenAI data URL and as an Anthropic base64 block: the
    same affinity key, so vLLM's caches for that image are on the replica both requests reach."""
    for seed in range(6):
        photo = _photo(seed)
        before = [_served(r) for r in live_replicas]
        openai_client(gateway).chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": SYSTEM},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe"},
                        {"type": "image_url", "image_url": {"url": photo}},
                    ],
                },
            ],  # type: ignore[list-item]
            max_tokens=2,
        )
        first = _which(live_replicas, before)
        before = [_served(r) for r in live_replicas]
        _sdk(gateway).messages.create(
            model=MODEL,
            max_tokens=2,
            system=SYSTEM,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Describe"}, _image_block(photo)]}],  # type: ignore[list-item]
        )
        assert _which(live_replicas, before) is first, f"photo {seed} moved between dialects"
