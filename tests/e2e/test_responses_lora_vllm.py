"""The Responses API and LoRA adapters end to end: the real OpenAI SDK -> a real gateway process -> two real vLLM
CPU replicas, which store responses (`VLLM_ENABLE_RESPONSES_API_STORE=1`) and serve the tiny LoRA adapter that
scripts/setup builds with peft (`--enable-lora --lora-modules tiny-lora=...`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from tests.e2e.conftest import ADAPTER, API_KEY, MODEL, Replica, gateway_args, lora_dir, wait_for
from tests.e2e.test_chat_vllm import png
from tests.support import RunningGateway, run_gateway

OTHER_KEY = "sk-e2e-other-namespace"
ID = re.compile(r"resp_[0-9a-f]{64}")


def _gateway(tmp_path: Path, log_dir: Path, replicas: list[Replica], **pool: object) -> Iterator[RunningGateway]:
    args = gateway_args(tmp_path, replicas, routing="least_outstanding", **pool)
    config = Path(args[1])
    config.write_text(config.read_text() + yaml.safe_dump({"keys": [{"key": OTHER_KEY}]}))
    with run_gateway(args, log_dir) as running:
        yield running


@pytest.fixture
def gateway(tmp_path: Path, log_dir: Path, live_replicas: list[Replica]) -> Iterator[RunningGateway]:
    adapters = [{"name": ADAPTER, "path": str(lora_dir())}]
    yield from _gateway(tmp_path, log_dir, live_replicas, lora_modules=adapters)


def sdk(gateway: RunningGateway, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_responses_text_image_and_stream(gateway: RunningGateway) -> None:
    client = sdk(gateway)
    text = client.responses.create(
        model=MODEL, input="Hello there", max_output_tokens=8, extra_body={"ignore_eos": True}
    )
    assert ID.fullmatch(text.id), text.id
    assert text.usage is not None and text.usage.output_tokens == 8
    assert isinstance(text.output_text, str)
    parts = [{"type": "input_text", "text": "Hello there"}, {"type": "input_image", "image_url": png(112, 84)}]
    image = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": parts}],
        max_output_tokens=4,  # type: ignore[list-item]
    )
    assert image.usage is not None and image.usage.input_tokens > text.usage.input_tokens + 8, "the image's tokens"
    events = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=6, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    completed = events[-1]
    assert completed.type == "response.completed" and ID.fullmatch(completed.response.id)
    assert gateway.metric("gateway_requests_total", {"route": "/v1/responses", "status": "200"}) == 3
    assert gateway.metric("gateway_prompt_tokens_total", {"model": MODEL}) >= text.usage.input_tokens * 2
    too_many = [*parts, *parts[1:], *parts[1:]]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": too_many}])  # type: ignore[list-item]
    assert refused.value.body["param"] == "input[0].content[3].image_url"  # type: ignore[index]


def test_a_stored_response_is_found_on_its_replica_and_only_by_its_namespace(
    gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    client = sdk(gateway)
    first = client.responses.create(model=MODEL, input="Remember me", max_output_tokens=4, store=True)
    done_before = [replica.requests_done() for replica in live_replicas]
    previous = first.id
    for turn in range(4):  # least_outstanding alone would alternate replicas: vLLM answers 404 on the wrong one
        reply = client.responses.create(
            model=MODEL, input=f"And then {turn}", max_output_tokens=4, previous_response_id=previous
        )
        previous = reply.id
    done_after = [replica.requests_done() for replica in live_replicas]
    assert sorted(after - before for before, after in zip(done_before, done_after, strict=True)) == [0, 4]
    assert client.responses.retrieve(first.id).id == first.id
    assert client.responses.retrieve(previous).previous_response_id is not None
    with pytest.raises(openai.BadRequestError, match="synchronous"):
        client.responses.cancel(first.id)  # vLLM's own answer for a finished, non-background response
    other = sdk(gateway, OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="steal", max_output_tokens=2, previous_response_id=first.id)


def _vllm_models(replica: Replica) -> dict[str, str | None]:
    cards = httpx.get(f"{replica.url}/v1/models", timeout=10).json()["data"]
    return {card["id"]: card.get("parent") for card in cards}


def test_an_adapter_is_served_by_name_and_only_where_it_is_loaded(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica]
) -> None:
    a, b = live_replicas
    loaded = httpx.post(
        f"{a.url}/v1/load_lora_adapter", json={"lora_name": "only-a", "lora_path": str(lora_dir())}, timeout=120
    )
    assert loaded.status_code == 200, loaded.text
    adapters = [{"name": ADAPTER, "path": str(lora_dir())}, {"name": "only-a", "path": str(lora_dir())}]
    try:
        for gateway in _gateway(tmp_path, log_dir, live_replicas, lora_modules=adapters):
            assert wait_for(lambda g=gateway: _listed(g)["only-a"]["replicas"]["total"] == 1, 15)
            client = sdk(gateway)
            cards = {model.id: model for model in client.models.list()}
            assert getattr(cards[ADAPTER], "parent", None) == MODEL and cards["only-a"].parent == MODEL
            greedy = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
            messages = [{"role": "user", "content": "Describe the picture"}]
            base = client.chat.completions.create(model=MODEL, messages=messages, **greedy)  # type: ignore[arg-type]
            tuned = client.chat.completions.create(model=ADAPTER, messages=messages, **greedy)  # type: ignore[arg-type]
            assert tuned.model == ADAPTER
            assert tuned.choices[0].message.content != base.choices[0].message.content, "the adapter's weights acted"
            done_on_b = b.requests_done()
            for _ in range(3):
                client.chat.completions.create(model="only-a", messages=messages, max_tokens=2)  # type: ignore[arg-type]
                client.responses.create(model="only-a", input="hi", max_output_tokens=2)
            assert b.requests_done() == done_on_b, "never to the replica without the adapter"
    finally:
        httpx.post(f"{a.url}/v1/unload_lora_adapter", json={"lora_name": "only-a"}, timeout=60)


def _listed(gateway: RunningGateway) -> dict[str, dict[str, object]]:
    cards = httpx.get(f"{gateway.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    return {card["id"]: card["capabilities"] for card in cards.json()["data"]}


def test_an_adapter_loaded_through_the_gateway_reaches_every_replica(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica]
) -> None:
    roots = [str(lora_dir().parent)]
    for gateway in _gateway(tmp_path, log_dir, live_replicas, adapter_roots=roots):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        outside = httpx.post(
            f"{gateway.base_url}/v1/adapters", json={"name": "dyn", "path": "/etc"}, headers=headers, timeout=30
        )
        assert outside.status_code == 400 and outside.json()["error"]["param"] == "path"
        loaded = httpx.post(
            f"{gateway.base_url}/v1/adapters",
            json={"name": "dyn", "path": str(lora_dir())},
            headers=headers,
            timeout=180,
        )
        assert loaded.status_code == 200, loaded.text
        assert loaded.json() == {"name": "dyn", "parent": MODEL, "replicas": 2}
        assert all(_vllm_models(replica).get("dyn") == MODEL for replica in live_replicas)
        client = sdk(gateway)
        assert client.chat.completions.create(model="dyn", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        removed = httpx.delete(f"{gateway.base_url}/v1/adapters/dyn", headers=headers, timeout=60)
        assert removed.status_code == 200
        assert all("dyn" not in _vllm_models(replica) for replica in live_replicas)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="dyn", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
