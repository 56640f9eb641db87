"""Property-based requests generated from the gateway's own OpenAPI schema: whatever arrives, never a 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.fake_upstream import FakeVllm
from tests.support import RunningGateway, run_gateway, write_config

KEY = "sk-schemathesis"
EXAMPLES_PER_OPERATION = 200  # 12 operations -> 2,400 generated requests


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[FakeVllm]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = asyncio.run_coroutine_threadsafe(FakeVllm().start(), loop).result(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, fake_upstream: FakeVllm
) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("schemathesis")
    models = [{"name": "m", "upstreams": [fake_upstream.url], "max_model_len": 4096}]
    config = write_config(
        root / "g.yaml",
        models,
        api_keys=[KEY],
        embeddings={"clip_model": "tiny-random"},
        search={"index_dir": str(root / "index")},
    )
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        client = httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {KEY}"})
        client.post("/v1/collections", json={"name": "docs"}).raise_for_status()
        yield running


def test_no_generated_request_gets_a_server_error(gateway: RunningGateway) -> None:
    api = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    sent = 0
    failures: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def call(case: schemathesis.Case) -> None:
            nonlocal sent
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            sent += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]}")
            elif response.status_code >= 400 and case.path.startswith("/v1/messages"):
                body = response.json()  # Anthropic's envelope, in the dialect the route speaks
                assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
            elif response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        call()
    assert failures == []
    assert sent >= 2000, f"only {sent} requests were generated"
