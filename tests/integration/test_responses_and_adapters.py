"""The Responses API and LoRA adapters against a real gateway process and fake replicas on loopback: ids the
gateway mints and routes by, namespaces, refused fields, the stream's own error event, media counted and
replaced, adapter routing by what each replica lists, and loading adapters only from the configured roots.
(The same paths against real vLLM: tests/e2e/test_responses_lora_vllm.py.)"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.fake_upstream import Behaviour, FakeVllm
from tests.support import RunningGateway, eventually, png_data_url, run_gateway_async, two_fake_replicas, write_config

ALICE, BOB, ADMIN, ROGUE = "sk-alice", "sk-bob", "sk-admin", "sk-rogue"
ID = re.compile(r"resp_[0-9a-f]{64}")
CHAT = "/v1/chat/completions"


@pytest.fixture
async def gateway(tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm) -> AsyncIterator[RunningGateway]:
    fake_a.models["a1"] = "m"  # only replica A serves adapter a1
    keys = [
        {"key": ALICE, "namespace": "alice"},
        {"key": BOB},
        {"key": ADMIN, "scopes": ["read", "admin"], "namespace": "alice"},
        {"key": ROGUE, "scopes": ["read", "admin"], "namespace": "rogue"},  # an admin of another namespace
    ]
    local_root = tmp_path / "adapters"  # a root the gateway sees too: real paths are checked there
    (local_root / "good").mkdir(parents=True)
    (local_root / "escape").symlink_to("/etc")
    models = [
        {
            **two_fake_replicas((fake_a.url, fake_b.url), images=1, first_token=5, idle=1),
            "lora_modules": [{"name": "a1", "path": "/adapters/a1"}],
            "adapter_roots": ["/adapters", str(local_root)],
            "max_loaded_adapters": 3,
        }
    ]
    config = write_config(tmp_path / "g.yaml", models, keys=keys, health_check_interval=0.5)
    async with run_gateway_async(["--config", str(config)], log_dir) as running:

        def adapters_read() -> bool:  # a health check has read each replica's /v1/models: a1 is on A alone
            cards = httpx.get(f"{running.base_url}/v1/models", headers={"Authorization": f"Bearer {ALICE}"}).json()
            return any(c["id"] == "a1" and c["capabilities"]["replicas"]["total"] == 1 for c in cards["data"])

        assert await eventually(adapters_read)
        yield running


async def _call(
    gateway: RunningGateway, method: str, path: str, body: dict[str, Any] | None = None, key: str = ALICE
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        content = orjson.dumps(body) if body is not None else None
        return await client.request(method, path, content=content, headers=headers)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _create(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hello", "max_output_tokens": 8, **fields}


async def test_the_gateway_mints_the_id_and_forwards_the_clients_bytes(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    raw = b'{"model": "m",  "input": "hello", "max_output_tokens": 8}'
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        response = await client.post(
            "/v1/responses",
            content=raw,
            headers={"Authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )
    assert response.status_code == 200, response.text
    response_id = response.json()["id"]
    assert ID.fullmatch(response_id)
    sent = (fake_a.bodies + fake_b.bodies)[-1]
    assert sent == b'{"request_id":' + orjson.dumps(response_id) + b"," + raw[1:], "the client's bytes, id spliced in"
    assert gateway.metric("gateway_prompt_tokens_total", {"model": "m"}) == 5
    assert gateway.metric("gateway_completion_tokens_total", {"model": "m"}) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", "resp_mine"), ("cache_salt", "x"), ("mm_processor_kwargs", {}), ("kv_transfer_params", {})],
)
async def test_engine_steering_fields_and_a_client_id_are_refused(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm, field: str, value: Any
) -> None:
    error = _error(await _call(gateway, "POST", "/v1/responses", _create(**{field: value})), 400)
    assert error["param"] == field
    assert fake_a.hits + fake_b.hits == 0


async def test_bounds_and_budgets_hold_for_responses(gateway: RunningGateway, fake_a: FakeVllm) -> None:
    too_long = _error(await _call(gateway, "POST", "/v1/responses", _create(max_output_tokens=5000)), 400)
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "max_output_tokens"
    prompt = _error(await _call(gateway, "POST", "/v1/responses", _create(input="x" * 50_000)), 400)
    assert prompt["param"] == "input"
    file_part = {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}
    assert _error(await _call(gateway, "POST", "/v1/responses", _create(input=[file_part])), 400)["param"]
    reserved = _error(await _call(gateway, "POST", "/v1/responses", _create(instructions="<|im_start|>system")), 400)
    assert reserved["code"] == "reserved_token"
    assert fake_a.hits == 0


async def test_images_are_counted_then_prepared_in_place(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    image = {"type": "input_image", "image_url": png_data_url()}
    two = [{"role": "user", "content": [{"type": "input_text", "text": "what?"}, image, image]}]
    error = _error(await _call(gateway, "POST", "/v1/responses", _create(input=two)), 400)
    assert error["param"] == "input[0].content[2].image_url"
    one = [{"role": "user", "content": [{"type": "input_text", "text": "what?"}, image]}]
    assert (await _call(gateway, "POST", "/v1/responses", _create(input=one))).status_code == 200
    sent = orjson.loads((fake_a.bodies + fake_b.bodies)[-1])
    part = sent["input"][0]["content"][1]
    assert part["type"] == "input_image" and part["image_url"].startswith("data:image/")
    assert part["image_url"] != image["image_url"], "the gateway's prepared image, not the client's bytes"


async def test_previous_response_id_get_and_cancel_reach_the_replica_that_holds_it(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    first = (await _call(gateway, "POST", "/v1/responses", _create(store=True))).json()["id"]
    holder, other = (fake_a, fake_b) if first in fake_a.stored else (fake_b, fake_a)
    hits_before = other.hits
    previous = first
    for _ in range(4):  # least_outstanding would alternate; the chain stays on the holder
        response = await _call(gateway, "POST", "/v1/responses", _create(previous_response_id=previous))
        assert response.status_code == 200, response.text
        previous = response.json()["id"]
        assert previous in holder.stored
    assert other.hits == hits_before
    got = await _call(gateway, "GET", f"/v1/responses/{first}?stream=false&starting_after=3")
    assert got.status_code == 200 and got.json()["id"] == first
    assert holder.paths[-1] == f"GET /v1/responses/{first}?starting_after=3"
    cancel = _error(await _call(gateway, "POST", f"/v1/responses/{first}/cancel"), 400)
    assert "synchronous" in cancel["message"]
    assert holder.paths[-1] == f"POST /v1/responses/{first}/cancel"
    assert not any(first in path for path in other.paths)


async def test_another_namespaces_response_is_not_found(gateway: RunningGateway, fake_a: FakeVllm) -> None:
    alices = (await _call(gateway, "POST", "/v1/responses", _create())).json()["id"]
    for method, path, body in (
        ("GET", f"/v1/responses/{alices}", None),
        ("POST", f"/v1/responses/{alices}/cancel", None),
        ("POST", "/v1/responses", _create(previous_response_id=alices)),
    ):
        error = _error(await _call(gateway, method, path, body, key=BOB), 404)
        assert error["code"] == "response_not_found"
    forged = alices[:-4] + ("0000" if not alices.endswith("0000") else "1111")
    assert _error(await _call(gateway, "GET", f"/v1/responses/{forged}"), 404)["code"] == "response_not_found"
    assert _error(await _call(gateway, "GET", "/v1/responses/resp_" + "a" * 5000), 404)
    bad_query = _error(await _call(gateway, "GET", f"/v1/responses/{alices}?include=everything"), 400)
    assert "include" in bad_query["message"]


async def test_a_stream_relays_typed_events_and_ends_a_stall_with_an_error_event(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        body = orjson.dumps(_create(stream=True))
        headers = {"Authorization": f"Bearer {ALICE}", "content-type": "application/json"}
        async with client.stream("POST", "/v1/responses", content=body, headers=headers) as response:
            whole = b"".join([chunk async for chunk in response.aiter_raw()])
        assert whole.startswith(b"event: response.created\ndata: ") and b"event: response.completed" in whole
        assert gateway.metric("gateway_completion_tokens_total", {"model": "m"}) == 2
        fake_a.behaviour = fake_b.behaviour = Behaviour(mode="stall_mid")
        async with client.stream("POST", "/v1/responses", content=body, headers=headers) as response:
            stalled = b"".join([chunk async for chunk in response.aiter_raw()])
    events = [event for event in stalled.split(b"\n\n") if event]
    assert events[0].startswith(b"event: response.created")
    name, data = events[-1].split(b"\n", 1)
    assert name == b"event: error"
    error = orjson.loads(data.removeprefix(b"data: "))
    assert error["type"] == "error" and error["code"] == "upstream_timeout" and error["sequence_number"] == 1


async def test_an_adapter_goes_only_to_replicas_that_list_it(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    for _ in range(6):
        response = await _call(gateway, "POST", "/v1/responses", _create(model="a1"))
        assert response.status_code == 200, response.text
    chat = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(4):
        assert (await _call(gateway, "POST", "/v1/chat/completions", chat)).status_code == 200
    assert fake_b.hits == 0 and fake_a.hits == 10
    cards = {card["id"]: card for card in (await _call(gateway, "GET", "/v1/models")).json()["data"]}
    assert cards["a1"]["parent"] == "m" and cards["m"]["parent"] is None
    assert cards["a1"]["capabilities"]["replicas"] == {"healthy": 1, "total": 1}
    assert cards["m"]["capabilities"]["replicas"] == {"healthy": 2, "total": 2}
    unknown = _error(await _call(gateway, "POST", "/v1/chat/completions", {**chat, "model": "a2"}), 404)
    assert unknown["code"] == "model_not_found"


async def test_adapters_load_only_from_the_roots_and_come_back_after_a_restart(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    for path in ("/etc/passwd", "/adapters/../etc/passwd", "/adapters//x", "http://evil/x", "adapters/x", "/adapters"):
        error = _error(await _call(gateway, "POST", "/v1/adapters", {"name": "d1", "path": path}, key=ADMIN), 400)
        assert error["param"] == "path", path
    assert _error(await _call(gateway, "POST", "/v1/adapters", {"name": "d1", "path": "/adapters/d1"}), 403)
    taken = await _call(gateway, "POST", "/v1/adapters", {"name": "a1", "path": "/adapters/a1"}, key=ADMIN)
    assert _error(taken, 409)["param"] == "name"
    loaded = await _call(gateway, "POST", "/v1/adapters", {"name": "d1", "path": "/adapters/d1"}, key=ADMIN)
    assert loaded.status_code == 200 and loaded.json() == {"name": "d1", "parent": "m", "replicas": 2}
    assert fake_a.models["d1"] == fake_b.models["d1"] == "m"
    del fake_b.models["d1"]  # replica B restarted: vLLM forgets adapters loaded at runtime
    assert await eventually(lambda: fake_b.models.get("d1") == "m"), "re-applied at the next health check"
    assert (await _call(gateway, "POST", "/v1/responses", _create(model="d1"))).status_code == 200
    unloaded = await _call(gateway, "DELETE", "/v1/adapters/d1", key=ADMIN)
    assert unloaded.status_code == 200 and "d1" not in fake_a.models and "d1" not in fake_b.models
    assert _error(await _call(gateway, "POST", "/v1/responses", _create(model="d1")), 404)
    # vLLM's own adapter routes are not the gateway's: never proxied
    direct = await _call(gateway, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}, key=ADMIN)
    assert direct.status_code == 404
    assert _error(await _call(gateway, "POST", "/v1/load_lora_adapter", {"lora_name": "x"}), 403)


async def test_an_adapter_belongs_to_the_namespace_that_loaded_it(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm, tmp_path: Path
) -> None:
    """Hardening round 3, classes 2 and 3: owners, one name grammar, real paths, a bound per pool."""
    load = lambda name, path, key=ADMIN: _call(gateway, "POST", "/v1/adapters", {"name": name, "path": path}, key=key)  # noqa: E731
    assert (await load("d2", "/adapters/d2")).status_code == 200
    assert _error(await load("d2", "/adapters/mine", ROGUE), 409)["param"] == "name", "cannot re-point another's"
    assert fake_a.models["d2"] == "m"
    assert _error(await _call(gateway, "DELETE", "/v1/adapters/d2", key=ROGUE), 404), "nor unload it"
    seen_by = lambda key: _call(gateway, "GET", "/v1/models", key=key)  # noqa: E731
    assert "d2" in {c["id"] for c in (await seen_by(ALICE)).json()["data"]}
    assert "d2" not in {c["id"] for c in (await seen_by(ROGUE)).json()["data"]}
    assert "a1" in {c["id"] for c in (await seen_by(ROGUE)).json()["data"]}, "configured adapters are everyone's"
    chat = {"model": "d2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _error(await _call(gateway, "POST", "/v1/chat/completions", chat, key=ROGUE), 404)["param"] == "model"
    assert (await _call(gateway, "POST", "/v1/chat/completions", chat, key=ALICE)).status_code == 200
    # A batch names what the online path serves its caller: the owner's namespace may batch on its adapter.
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(orjson.dumps({"custom_id": "1", "method": "POST", "url": CHAT, "body": chat}) + b"\n")
    rogue, alice = (AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=k, max_retries=0) for k in (ROGUE, ALICE))
    upload = await rogue.files.create(file=lines.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="model 'd2' is not served"):
        await rogue.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    upload = await alice.files.create(file=lines.open("rb"), purpose="batch")
    batch = await alice.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")

    async def completed() -> bool:
        return (await alice.batches.retrieve(batch.id)).status == "completed"

    assert await eventually(completed)
    counts = (await alice.batches.retrieve(batch.id)).request_counts
    assert counts is not None and (counts.completed, counts.failed) == (1, 0)
    for name in (".", "..", "-", "-x", ".hidden", "a b", "a\n", "x/y", "a" * 257):
        assert _error(await load(name, "/adapters/x"), 400), name
    for name in ("m", "a1"):  # a base model, a configured adapter
        assert _error(await load(name, "/adapters/x"), 409)["param"] == "name"
    for path in ("/adapters/x\n", "/adapters/x\x7f", f"{tmp_path}/adapters/escape/passwd"):
        assert _error(await load("d3", path), 400)["param"] == "path", path
    assert (await load("d2", "/adapters/d2-v2")).status_code == 200, "its owner may re-point it"
    assert (await load("d3", f"{tmp_path}/adapters/good")).status_code == 200
    assert (await load("d4", "/adapters/d4")).status_code == 200
    full = await load("d5", "/adapters/d5")
    assert _error(full, 409)["param"] == "name" and "limit of 3" in full.json()["error"]["message"]
    for name in ("d2", "d3", "d4"):
        assert (await _call(gateway, "DELETE", f"/v1/adapters/{name}", key=ADMIN)).status_code == 200


async def test_any_gateway_with_the_same_secret_routes_anothers_ids(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    models = [{"name": "m", "upstreams": [fake_a.url, fake_b.url], "routing": "least_outstanding"}]

    def config(name: str, secret: str) -> list[str]:
        path = write_config(tmp_path / name, models, keys=[{"key": ALICE}], responses={"id_secret": secret})
        return ["--config", str(path)]

    async with (
        run_gateway_async(config("one.yaml", "shared-secret"), log_dir) as one,
        run_gateway_async(config("two.yaml", "shared-secret"), log_dir) as two,
        run_gateway_async(config("three.yaml", "another-secret"), log_dir) as three,
    ):
        made = (await _call(one, "POST", "/v1/responses", _create(store=True))).json()["id"]
        holder = fake_a if made in fake_a.stored else fake_b
        for _ in range(3):
            got = await _call(two, "GET", f"/v1/responses/{made}")
            assert got.status_code == 200 and got.json()["id"] == made
        assert sum(path.startswith("GET") for path in holder.paths) == 3
        assert _error(await _call(three, "GET", f"/v1/responses/{made}"), 404)["code"] == "response_not_found"
